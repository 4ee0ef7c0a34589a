//! `written::disable` (a jailed worker calls it before its seccomp filter forbids
//! `userfaultfd` and `open`): from then on checkpoints never start write tracking, and a
//! rollback still returns exactly to the checkpoint, by whole copies. Its own test binary: the
//! switch is process-wide.

mod common;

use common::{eval, new_slot, MIB};

#[test]
fn after_disable_checkpoints_never_track_and_rollback_still_returns() {
    let mut tracked = new_slot(64 * MIB);
    tracked.restore();
    tracked.set_track_from(0);
    tracked.checkpoint().expect("a checkpoint");
    // Where the kernel has no tracking, this test checks only the disabled path.
    let kernel_tracks = tracked.tracking();

    lua_sandbox_core::written::disable();
    let mut slot = new_slot(64 * MIB);
    slot.restore();
    slot.set_track_from(0);
    eval(&mut slot, "counter = 1 return 1").unwrap();
    slot.checkpoint().expect("a checkpoint");
    assert!(!slot.tracking(), "tracking started after disable()");
    eval(
        &mut slot,
        "counter = counter + 1 big = string.rep('b', 1 << 20) return 1",
    )
    .unwrap();
    slot.rollback();
    assert_eq!(
        eval(&mut slot, "return tostring(counter) .. tostring(big)").unwrap(),
        "1nil"
    );
    assert!(!slot.tracking());
    eprintln!("kernel tracks writes: {kernel_tracks}");
}
