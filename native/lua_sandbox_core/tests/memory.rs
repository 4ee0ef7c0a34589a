//! The arena allocator's count is exact, its limit holds, and memory goes back to the OS.

mod common;

use common::{eval, new_slot, MIB};

#[test]
fn the_count_is_lua_s_own_to_the_byte() {
    let mut slot = new_slot(64 * MIB);
    for code in [
        "return collectgarbage('count') * 1024",
        "local t = {} for i = 1, 1000 do t[i] = {} end return collectgarbage('count') * 1024",
        "local s = string.rep('x', 100000) return collectgarbage('count') * 1024",
    ] {
        slot.restore();
        let lua_count: f64 = eval(&mut slot, code).unwrap().parse().unwrap();
        // The count was read inside the chunk; the tostring of the result allocated a little
        // since, so compare with what the heap held at that moment, bounded from both sides.
        let heap = slot.used() as f64;
        assert!(
            (heap - lua_count).abs() < 512.0,
            "{code}: heap {heap} lua {lua_count}"
        );
    }
}

#[test]
fn the_limit_is_enforced_and_refusals_are_counted() {
    let mut slot = new_slot(256 * MIB);
    slot.restore();
    slot.set_limit(4 * MIB);
    let e = eval(
        &mut slot,
        "local s = string.rep('x', 8 * 1024 * 1024) return #s",
    )
    .unwrap_err();
    assert_eq!(e.message, "not enough memory");
    assert!(slot.refusals() >= 1);
    assert!(slot.peak() <= 4 * MIB);
    // Within the limit the same state works.
    assert_eq!(
        eval(&mut slot, "return #string.rep('x', 1024 * 1024)").unwrap(),
        "1048576"
    );
    // A restore lifts the limit and clears the refusal count.
    slot.restore();
    assert_eq!(slot.refusals(), 0);
    assert_eq!(
        eval(&mut slot, "return #string.rep('x', 8 * 1024 * 1024)").unwrap(),
        "8388608"
    );
}

#[test]
fn many_small_allocations_respect_the_limit_exactly() {
    let mut slot = new_slot(64 * MIB);
    slot.restore();
    let limit = slot.used() + 2 * MIB;
    slot.set_limit(limit);
    let e = eval(&mut slot, "local t = {} for i = 1, 1e7 do t[i] = {i} end").unwrap_err();
    assert_eq!(e.message, "not enough memory");
    assert!(slot.peak() <= limit, "{} > {limit}", slot.peak());
}

#[test]
fn pages_above_the_snapshot_go_back_to_the_os() {
    let mut slot = new_slot(256 * MIB);
    slot.restore();
    let baseline = slot.resident();
    assert!(
        baseline <= slot.snapshot_len() + 64 * 1024,
        "baseline {baseline}"
    );
    eval(
        &mut slot,
        "local t = {} for i = 1, 50 do t[i] = string.rep(string.char(64 + i), 1024 * 1024) end return #t",
    )
    .unwrap();
    assert!(slot.resident() > 50 * MIB, "{}", slot.resident());
    slot.restore();
    assert!(
        slot.resident() <= baseline + 64 * 1024,
        "after restore {} vs baseline {baseline}",
        slot.resident()
    );
    // The arena still works after the pages were dropped (they read as zeros again).
    assert_eq!(
        eval(&mut slot, "return #string.rep('y', 2 * 1024 * 1024)").unwrap(),
        "2097152"
    );
}

#[test]
fn an_untouched_reservation_costs_no_memory() {
    let slots: Vec<_> = (0..16).map(|_| new_slot(4096 * MIB)).collect();
    for s in &slots {
        assert_eq!(s.capacity(), 4096 * MIB);
        assert!(s.resident() < 256 * 1024, "{}", s.resident());
    }
}

#[test]
fn growing_and_shrinking_stacks_reuse_the_arena() {
    // Each "error in error handling" grows the stack to its limit and shrinks it again; with
    // blocks kept in their shrunk size's class this exhausted a 128 MiB arena in 60 ms.
    let mut slot = new_slot(16 * MIB);
    slot.restore();
    slot.set_limit(8 * MIB);
    let code = "for i = 1, 3000 do xpcall(function() error('a') end, function(e) error('b') end) end \
                local t = {} for i = 1, 200 do t[i % 4] = string.rep('x', i * 1000) end return 'done'";
    assert_eq!(eval(&mut slot, code).unwrap(), "done");
    assert!(slot.peak() <= 8 * MIB);
}
