//! Deep recursions are checked as they go (issue 16): the walks along their frames and open
//! upvalues — moving or shrinking their stack, freeing their `CallInfo`s, the unwinding of an
//! error at their bottom, its traceback, the collector's marks — check every few thousand steps
//! (vendor/lua-src/PATCHES.md, "Walks along a deep recursion's lists"). Measured as bulk.rs
//! measures: the longest stretch of the run thread's CPU time between two checks.

mod common;
mod stretches;

use std::time::Duration;

use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::exec::Limits;
use lua_sandbox_core::output::Print;

use stretches::*;

/// The CallInfos a deep recursion leaves are freed with checks between pieces (issue 16, the
/// run's end): the shrink after an error (`luaE_shrinkCI`: half of the ~280 000 here, then
/// half of the rest) freed them in one loop, 0.8-2.3 ms with no check, and now asks the
/// ticker every `SB_WALKPIECE` steps of all walks (lstate.c, ldebug.h). Counted as checks:
/// the script with the error after the recursion makes several more than the one without (1-2
/// more without the pieces: the stack's shrink debits its size, which ticks once).
#[test]
fn freeing_a_deep_recursions_callinfos_checks_between_pieces() {
    let deep = "local function f(n) if n == 0 then return 0 end return 1 + f(n - 1) end f(280000) ";
    let (without, with) = checks_without_and_with(deep, "local ok = pcall(error, 'x')");
    assert!(
        with >= without + 5,
        "{with} checks with the shrink, {without} without"
    );
}

/// A recursion ~190 000 deep moves its stack as it grows, and the collector's atomic phase
/// measures every thread's stack in use (ldo.c `movestackpointers`, `stackinuse`): stock walked
/// every CallInfo twice in one go at each growth (offsets out, pointers back) and once per
/// collection, with no check: 2.9–3.5 ms between two checks for the growth, 2.1–2.6 ms for the
/// collections once the growth was checked. Now one walk each, checked every 4 096 steps.
/// Bounded at 2 ms, not [`BOUND`]: the walks are short, and the shortest of three tries
/// counts (0.3–0.9 ms measured).
#[test]
fn deep_recursions_check_while_their_stack_moves() {
    let cases = [
        "local function f(n) if n == 0 then return 0 end return 1 + f(n - 1) end \
         assert(f(190000) == 190000)"
            .to_string(),
        "local function f(n) if n == 0 then for i = 1, 5 do collectgarbage() end return 0 end \
         return 1 + f(n - 1) end assert(f(190000) == 190000)"
            .to_string(),
    ];
    assert_checked_within(&cases, Duration::from_millis(2));
}

#[test]
fn moving_a_long_stack_segment_checks_between_pieces() {
    // Rotating or moving ~10^6 stack values (`lua_rotate`: `pcall`'s `lua_insert(L, 1)` under
    // its arguments; `lua_xmove`: a resume's arguments) ran with no check, and `table.pack`
    // rotated its table under every element (~1.6 ms for 5e5 in the stretch build). Now a
    // check every 32 768 values moved, and `table.pack` copies into a table left on top; the
    // results' move back to the caller (ldo.c `moveresults`) checks too. 2.7–3.4 ms before,
    // 0.2–0.7 ms now: bounded at 2 ms, as the deep recursions.
    let s = "local s = {} for i = 1, 900000 do s[i] = i end ";
    let cases = [
        format!("{s} local t = table.pack(table.unpack(s)) assert(t.n == 900000)"),
        // a Lua function's results, moved back over its own frame (`moveresults`)
        format!(
            "{s} local function f() return table.unpack(s) end \
             local t = table.pack(f()) assert(t.n == 900000)"
        ),
        format!(
            "{s} local ok, a = pcall(function(a) return a end, table.unpack(s)) assert(a == 1)"
        ),
        format!(
            "{s} local co = coroutine.wrap(function(a) return a end) \
             assert(co(table.unpack(s)) == 1)"
        ),
    ];
    assert_checked_within(&cases, Duration::from_millis(2));
}

/// An error at the bottom of a recursion ~150 000 deep, and the walks its handling makes:
/// the search for the `pcall` (ldo.c `findpcall`, from a memory error: 2.5–3.6 ms), the
/// traceback of the run's message handler and of `debug.traceback` (csrc/sb_baselib.c
/// `lastlevel` looked for the last level with ~36 walks from the top: 7–10 ms), `error`'s
/// level (`lua_getstack` walks to it), closing one upvalue per frame (lfunc.c
/// `luaF_closeupval`: 2–3 ms) and the collector's marks of open upvalues (lgc.c
/// `traversethread`, `remarkupvals`), and freeing their thread (~3 ms). Each ran with no
/// check; now every 4 096 frames (SB_WALKPIECE), 0.3–0.8 ms measured. Bounded at 2 ms, as
/// the deep recursions.
#[test]
fn errors_in_deep_recursions_unwind_between_checks() {
    let deep = "local function f(n, g) if n == 0 then g() return 0 end return 1 + f(n - 1, g) end ";
    let up = "local function f(n) local x = n local g = function() return x end \
              if n == 0 then error('x') end return g() + f(n - 1) end ";
    let mib = |n: usize| Limits {
        max_memory: n << 20,
        ..big_limits()
    };
    let cases = [
        (
            "local function f() return 1 + f() end return f()".to_string(),
            mib(32),
            Err(SandboxError::MemoryLimit),
        ),
        (
            format!("{deep} f(150000, function() error('x') end)"),
            mib(64),
            Err(SandboxError::Runtime(String::new())),
        ),
        (
            format!("{deep} f(150000, function() for i = 1, 10 do debug.traceback() end end)"),
            mib(64),
            Ok(()),
        ),
        (
            format!("{deep} f(150000, function() for i = 1, 10 do pcall(error, 'x', 1e9) end end)"),
            mib(64),
            Ok(()),
        ),
        (
            format!("{up} assert(not pcall(f, 150000))"),
            mib(64),
            Ok(()),
        ),
        // testes/cstack.lua: an error through nested coroutines of 1 000 frames each, a walk
        // shorter than a piece in each (uncounted when each walk counted its own steps; the
        // steps are counted in the global state now, all walks together)
        (
            "local lim = 1000 local function stack(n) if n > 0 then return stack(n - 1) + 1 \
             else coroutine.wrap(function() stack(lim) end)() end end \
             local st, msg = xpcall(stack, function() return 'ok' end, lim) \
             assert(not st and msg == 'ok')"
                .to_string(),
            mib(64),
            Ok(()),
        ),
        (
            "local keep local function f(n) local x = n local g = function() return x end \
             if n == 0 then keep = g coroutine.yield() end return g() + f(n - 1) end \
             local co = coroutine.create(f) coroutine.resume(co, 150000) co = nil \
             collectgarbage() collectgarbage() assert(keep() == 0)"
                .to_string(),
            mib(64),
            Ok(()),
        ),
    ];
    let slow: Vec<String> = cases
        .iter()
        .map(|(src, limits, expected)| {
            let bound = Duration::from_millis(2);
            let longest = shortest_stretch(bound, || {
                let (outcome, longest) = longest_stretch_with(src, *limits, Print::Discard);
                assert_eq!(&outcome, expected, "{src}");
                eprintln!("{longest:?} between two checks: {src}");
                longest
            });
            (longest, bound, src)
        })
        .filter(|(longest, bound, _)| longest >= bound)
        .map(|(longest, _, src)| format!("{longest:?} between two checks: {src}"))
        .collect();
    assert!(slow.is_empty(), "{slow:#?}");
}
