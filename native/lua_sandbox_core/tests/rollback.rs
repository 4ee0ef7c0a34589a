//! A rollback returns the state to its checkpoint byte for byte, whether the checkpoint is a
//! full copy or kept up to date from the pages written (`written.rs`), across garbage
//! collections, growth, trimming and many calls.

mod common;

use common::{eval, new_slot, MIB};
use proptest::prelude::*;

/// What a call does to the state: each keeps some of its changes, frees some, or fails
/// halfway (an error after writes).
const OPS: &[&str] = &[
    "g = g or {} g[#g + 1] = string.rep('a', 100) return #g",
    "g = g or {} for i = 1, 200 do g[#g + 1] = {i, tostring(i)} end return #g",
    "if g then for i = 1, #g, 3 do g[i] = false end end return 1",
    "g = nil return 1",
    "collectgarbage() return 1",
    "collectgarbage('step', 10) return 1",
    "big = string.rep('b', 3 * 1024 * 1024) return #big",
    "big = nil collectgarbage() return 1",
    "counter = (counter or 0) + 1 return counter",
    "counter = (counter or 0) + 1 error('after a write')",
    "local t = {} for i = 1, 50000 do t[i] = i end keep = t error('after growth')",
    "base[#base % 997 + 1] = #base return 1",
];

/// A state of a few MiB (so tracking starts at the default threshold too), with a table that
/// later calls write into here and there.
fn loaded(track_from: usize) -> lua_sandbox_core::Slot {
    let mut slot = new_slot(256 * MIB);
    slot.restore();
    slot.set_track_from(track_from);
    eval(
        &mut slot,
        "base = {} for i = 1, 997 do base[i] = string.rep('s', 2000) .. i end return 1",
    )
    .unwrap();
    slot
}

/// Runs `calls` (an op, then keep or roll back), comparing every rollback against a full copy
/// taken at its checkpoint, and the Lua-visible state against the same run without rollbacks.
fn check(track_from: usize, calls: &[(usize, bool)]) {
    let mut slot = loaded(track_from);
    for &(op, keep) in calls {
        slot.checkpoint().expect("a checkpoint");
        let reference = slot.image().expect("an image");
        let before = digest(&mut slot);
        let outcome = eval(&mut slot, OPS[op]);
        if keep && outcome.is_ok() {
            continue;
        }
        slot.rollback();
        assert!(
            slot.image().expect("an image") == reference,
            "op {op}: the state differs from its checkpoint after the rollback"
        );
        assert_eq!(digest(&mut slot), before, "op {op}");
    }
    if track_from == 0 {
        assert!(slot.tracking(), "the checkpoints tracked written pages");
    }
}

/// What Lua sees of the state (the digest call itself is rolled back by the caller's copy).
fn digest(slot: &mut lua_sandbox_core::Slot) -> String {
    eval(
        slot,
        "local n = 0 for k, v in pairs(base) do n = n + #tostring(v) end \
         return table.concat({n, tostring(g and #g), tostring(big and #big), \
         tostring(counter), tostring(keep)}, ',')",
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rollback_returns_to_the_checkpoint_with_tracking(
        calls in prop::collection::vec((0..OPS.len(), any::<bool>()), 1..40)
    ) {
        check(0, &calls);
    }

    #[test]
    fn rollback_returns_to_the_checkpoint_with_full_copies(
        calls in prop::collection::vec((0..OPS.len(), any::<bool>()), 1..20)
    ) {
        check(usize::MAX, &calls);
    }
}

#[test]
fn a_small_call_on_a_big_state_copies_only_what_it_wrote() {
    let mut slot = loaded(lua_sandbox_core::slot::TRACK_FROM);
    eval(
        &mut slot,
        "filler = string.rep('f', 16 * 1024 * 1024) return 1",
    )
    .unwrap();
    slot.checkpoint().expect("a checkpoint");
    assert!(slot.tracking(), "a 16 MiB state is tracked");
    let time = |slot: &mut lua_sandbox_core::Slot| {
        let t = std::time::Instant::now();
        for _ in 0..50 {
            slot.checkpoint().expect("a checkpoint");
            eval(slot, "counter = (counter or 0) + 1 return counter").unwrap();
            slot.rollback();
        }
        t.elapsed()
    };
    let tracked = time(&mut slot);
    slot.set_track_from(usize::MAX);
    slot.restore();
    slot.set_track_from(usize::MAX);
    eval(
        &mut slot,
        "filler = string.rep('f', 16 * 1024 * 1024) return 1",
    )
    .unwrap();
    let copied = time(&mut slot);
    assert!(!slot.tracking());
    // A full copy each way moves 32 MiB per call; the tracked calls move a few pages. Wide
    // margin: the machine is shared.
    assert!(
        tracked * 5 < copied,
        "tracked {tracked:?} vs copied {copied:?} for 50 calls"
    );
}
