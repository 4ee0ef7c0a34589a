//! The run's budget: instruction count, kill checks and the sticky abort flag.
//!
//! A run is *active* on a thread while the call that executes it is on the stack: its
//! [`Scope`](crate::scope::Scope) is activated, and the instruction ticker, the hardened
//! builtins and the sandbox wrappers (`pcall`, `coroutine.resume`, ...) charge and check the
//! scope's [`Control`].
//!
//! All work is measured by one countdown in the Lua state (vendor/lua-src/PATCHES.md): one
//! unit per VM instruction, and units in proportion to the work of string operations,
//! metamethod chains, table chains, the parser and the C builtins, charged by the VM patch,
//! by the C copies in `csrc/` and by [`charge_steps`] on the Rust side. When it runs out the
//! VM calls `tick`, which books the units into the run's [`Control`], checks the limit and
//! whether the caller is alive, and re-arms it.
//!
//! Aborts are *sticky* and take effect at the source: setting one makes the very next VM
//! instruction or charge raise (`lua_sandboxabort`), the allocator's refusal trips the
//! memory abort before any handler runs (`LUA_TICK_MEMERR`), and every later tick raises
//! again, so no amount of `pcall`, `xpcall`, `coroutine.resume` or `__close` lets a script
//! keep running or change the reported kind.

use std::ffi::{c_char, c_int};
use std::ptr;
use std::time::Duration;

use crate::ffi;

use crate::control::lua_sandboxabort;
pub use crate::control::{
    byte_units, Abort, AliveCheck, Caller, Control, BYTES_PER_UNIT, PIECE, TICK_INTERVAL,
};

/// Runs `f` with the active run's control and caller, if a run is active on this thread.
fn with_control<R>(f: impl FnOnce(&Control, Caller) -> R) -> Option<R> {
    crate::scope::with_active(|scope, caller| f(&scope.control, caller))
}

/// Counts a capability the active run was denied (a no-op outside a run).
pub fn note_denied(prefix: &[u8], name: &[u8]) {
    with_control(|control, _| control.note_denied(prefix, name));
}

/// Charges `steps` units of work to the budget and checks for a kill.
///
/// Once the ticker is installed this is the VM's own countdown (`lua_sandboxpoll`), the
/// same one the instructions, the VM patches and the C builtins charge; before that (and in
/// unit tests without a state) it charges the `Control` directly. Returns the abort reason
/// once one is set. Never raises.
#[track_caller]
pub fn charge_steps(steps: u64) -> Result<(), Abort> {
    #[cfg(feature = "stretch")]
    let site = std::panic::Location::caller();
    let state = with_control(|control, _| control.state.get()).unwrap_or(0);
    if state != 0 {
        // SAFETY: `state` is the main thread of the active run's state (see
        // `Control::set_abort`);
        // `lua_sandboxpoll` subtracts from the countdown and, when it ran out, calls the
        // ticker, which never raises and never touches the stack.
        unsafe {
            lua_sandboxpoll(
                state as *mut ffi::lua_State,
                steps.min(i64::MAX as u64) as _,
            )
        };
        return current_abort().map_or(Ok(()), Err);
    }
    with_control(|control, env| {
        // A check like the ticker's (the abort, the budget, the caller, the deadline), so the
        // hole finder counts it: marshaling a result after the script ended charges here.
        #[cfg(feature = "stretch")]
        crate::stretch::check(
            std::ptr::null_mut(),
            &format!("charge outside the VM at {site}"),
        );
        if let Some(why) = control.abort() {
            return Err(why);
        }
        control.used.set(control.used.get().saturating_add(steps));
        if control.used.get() >= control.max {
            control.set_abort(Abort::Instructions);
        } else if let Some(why) = control.stopped(env) {
            control.set_abort(why);
        }
        control.abort().map_or(Ok(()), Err)
    })
    .unwrap_or(Ok(()))
}

/// [`charge_steps`], then a check now (the kill, the deadline, the budget) whatever the
/// countdown says: for work done outside the VM in pieces (copying a string as large as the
/// heap), one check per piece, however few units a piece is worth.
#[track_caller]
pub fn charge_and_check(steps: u64) -> Result<(), Abort> {
    charge_steps(steps)?;
    let state = with_control(|control, _| control.state.get()).unwrap_or(0);
    if state != 0 {
        // `state` is the active run's main thread, as in `charge_steps`; the ticker books
        // the units taken from the countdown since it was last armed and re-arms it, so an
        // extra call is exact accounting. It never raises and never touches the stack.
        tick(state as *mut ffi::lua_State, LUA_TICK_WORK);
        return current_abort().map_or(Ok(()), Err);
    }
    // Without a state `charge_steps` checked already.
    Ok(())
}

pub use crate::clock::thread_cpu;

/// Checks the kill and the deadline now (before resuming a run: a tool may have taken the
/// time, and the countdown only ticks when it runs out).
pub fn check_now() -> Result<(), Abort> {
    with_control(|control, env| {
        if control.abort().is_none() {
            if let Some(why) = control.stopped(env) {
                control.set_abort(why);
            }
        }
        control.abort().map_or(Ok(()), Err)
    })
    .unwrap_or(Ok(()))
}

/// The active run's own CPU time (`os.clock`), zero outside a run.
pub fn active_cpu_time() -> Duration {
    with_control(|control, _| control.cpu_time()).unwrap_or(Duration::ZERO)
}

/// The abort reason of the active run, if any.
pub fn current_abort() -> Option<Abort> {
    with_control(|control, _| control.abort()).flatten()
}

/// Sets an abort on the active run (used by output and tool limits); the very next
/// instruction or charge of the run raises.
pub fn trip(why: Abort) {
    with_control(|control, _| control.set_abort(why));
}

/// Bytes the state's heap holds (Lua's own count).
pub(crate) fn used_memory(l: *mut ffi::lua_State) -> usize {
    // SAFETY: `lua_gc` with LUA_GCCOUNT/COUNTB only reads the collector's counters; it never
    // allocates or raises, so it is safe to call from the ticker.
    unsafe {
        let kb = ffi::lua_gc(l, ffi::LUA_GCCOUNT, 0) as usize;
        let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB, 0) as usize;
        kb * 1024 + b
    }
}

type Ticker = extern "C" fn(*mut ffi::lua_State, c_int) -> *const c_char;

const LUA_TICK_WORK: c_int = 0;
const LUA_TICK_MEMERR: c_int = 1;

// The work ticker of our Lua build (vendor/lua-src/PATCHES.md, ldebug.c): one countdown per
// state, one unit per VM instruction and units in proportion to the work of the VM patches
// and the C builtins, and a callback when it runs out or the allocator refused. A count hook
// makes Lua 5.4 trap on *every* instruction (2.4x slower on fib(27) here), must be set per
// thread, is switched off in error handlers and finalizers, and sees nothing of the work done
// inside C functions; the ticker has none of these gaps.
extern "C-unwind" {
    fn lua_setticker(l: *mut ffi::lua_State, f: Option<Ticker>, interval: c_int);
    fn lua_getticksleft(l: *mut ffi::lua_State) -> ffi::lua_Integer;
    fn lua_sandboxpoll(l: *mut ffi::lua_State, n: ffi::lua_Integer) -> *const c_char;
    fn lua_sandboxmainthread(l: *mut ffi::lua_State) -> *mut ffi::lua_State;
}

/// Installs the ticker on the state of `l` (every thread of it: the countdown is global) and
/// records the state so aborts and Rust-side charges reach its countdown. Installing it again
/// on the same state first books the work pending in the countdown.
///
/// # Safety
/// `l` must be a thread of a live state, and the state must outlive every use of `control`
/// that may reach it (its aborts, charges and settles), as a run's slot outlives its budget.
pub unsafe fn install_ticker(l: *mut ffi::lua_State, control: &Control) {
    // SAFETY: `l` is a valid thread of a live state; the getter reads one field.
    let main = unsafe { lua_sandboxmainthread(l) };
    if control.state.get() == main as usize && control.abort().is_none() {
        control.book(l);
    }
    control.state.set(main as usize);
    control.arm(l);
}

/// [`install_ticker`] on the main state of `lua` (tests of the charging builtins).
#[cfg(test)]
pub fn install_ticker_on(lua: &mlua::Lua, control: &Control) -> mlua::Result<()> {
    // SAFETY: `exec_raw` hands the closure the main state inside a protected call;
    // `install_ticker` only reads and stores fields of the global state, never raises and
    // leaves the stack untouched. `control` outlives every use of the recorded state: the
    // caller owns both for the run.
    unsafe { lua.exec_raw::<()>((), |l| install_ticker(l, control)) }
}

impl Control {
    /// Arms the countdown of `l` for the next interval, or for an immediate tick when the run
    /// is aborted.
    fn arm(&self, l: *mut ffi::lua_State) {
        // SAFETY: `l` is a valid thread of a live state (callers: `install_ticker`, which
        // gets it from its owner, and the ticker, which gets it from the VM); both functions
        // only store fields of the global state and never raise.
        unsafe {
            lua_setticker(l, Some(tick), self.next_interval());
            if self.abort().is_some() {
                lua_sandboxabort(l);
            }
        }
    }

    /// Books the units taken from the countdown of `l` since it was last armed.
    fn book(&self, l: *mut ffi::lua_State) {
        // SAFETY: `l` is a valid state; the getter only reads one field of the global state.
        let left = unsafe { lua_getticksleft(l) };
        let interval = self.interval.get() as i64;
        if left <= interval {
            let ran = (interval as i128 - left as i128).max(0) as u64;
            self.used.set(self.used.get().saturating_add(ran));
        }
    }
}

/// Books the work done since the last tick, to make `stats.instructions` exact, and re-arms.
pub fn settle_instructions(l: *mut ffi::lua_State, control: &Control) {
    if control.abort().is_none() {
        control.book(l);
    }
    control.arm(l);
}

/// The ticker. It never raises (the VM raises the message it returns) and never touches the
/// Lua stack; `extern "C"`, so a panic aborts instead of unwinding into C.
extern "C" fn tick(l: *mut ffi::lua_State, event: c_int) -> *const c_char {
    #[cfg(feature = "stretch")]
    crate::stretch::check(
        l,
        if event == LUA_TICK_MEMERR {
            "memory error"
        } else {
            "tick"
        },
    );
    let verdict = with_control(|control, env| {
        if event == LUA_TICK_MEMERR {
            // The allocator refused: the abort is tripped here, before any handler, `__close`
            // or `pcall` could replace the error. The countdown keeps going until `arm`.
            control.set_abort(Abort::Memory);
            return None;
        }
        control.note_memory(used_memory(l));
        control.clock_mark();
        if control.abort().is_none() {
            control.book(l);
            if control.used.get() >= control.max {
                control.set_abort(Abort::Instructions);
            } else if let Some(why) = control.stopped(env) {
                control.set_abort(why);
            }
        }
        control.arm(l);
        control.abort()
    });
    match verdict {
        Some(Some(why)) => why.c_message().as_ptr(),
        _ => ptr::null(),
    }
}

/// Installs the ticker on the main state of `lua` (tests of the charging builtins).
#[cfg(test)]
pub(crate) fn install_on(lua: &mlua::Lua, control: &Control) {
    install_ticker_on(lua, control).unwrap();
}

/// Books the pending work of the main state of `lua` (tests of the charging builtins).
#[cfg(test)]
pub(crate) fn settle_on(lua: &mlua::Lua, control: &Control) {
    // SAFETY (test): as in `install_on`.
    unsafe { lua.exec_raw::<()>((), |l| settle_instructions(l, control)) }.unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;
    use std::time::Instant;

    /// The value of `#define <name>` in a C header of the vendored build (its first token,
    /// casts and parentheses stripped, a `*` product evaluated).
    fn c_define(header: &str, name: &str) -> usize {
        let line = header
            .lines()
            .find(|l| l.starts_with("#define") && l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no #define {name}"));
        let value = line.split_once(name).unwrap().1;
        let value = value.replace("(size_t)", "").replace(['(', ')', 'u'], "");
        value
            .split('*')
            .map(|f| {
                f.trim()
                    .parse::<usize>()
                    .unwrap_or_else(|_| panic!("{line}"))
            })
            .product()
    }

    #[test]
    fn the_rust_cost_model_is_the_vms() {
        let lua_h = include_str!("../../../vendor/lua-src/lua-5.4.9/lua.h");
        let ldebug_h = include_str!("../../../vendor/lua-src/lua-5.4.9/ldebug.h");
        let sb_budget_h = include_str!("../csrc/sb_budget.h");
        assert_eq!(c_define(lua_h, "LUA_SBPIECE"), PIECE);
        assert_eq!(1 << c_define(ldebug_h, "SB_BYTESHIFT"), BYTES_PER_UNIT);
        assert_eq!(c_define(sb_budget_h, "SB_BYTES_PER_STEP"), BYTES_PER_UNIT);
    }

    #[test]
    fn charge_without_activation_is_free() {
        assert!(charge_steps(u64::MAX).is_ok());
        assert_eq!(current_abort(), None);
    }

    #[test]
    fn charge_trips_the_limit_and_sticks() {
        let scope = Scope::budget(Control::new(100));
        let control = &scope.control;
        let _a = scope.activate(Caller::none());
        assert!(charge_steps(99).is_ok());
        assert_eq!(charge_steps(1), Err(Abort::Instructions));
        assert_eq!(charge_steps(0), Err(Abort::Instructions));
        assert_eq!(control.instructions(), 100);
    }

    #[test]
    fn a_past_deadline_times_the_run_out() {
        let scope = Scope::budget(Control::new(u64::MAX));
        let control = &scope.control;
        let _a = scope.activate(Caller::none());
        assert!(charge_steps(1).is_ok());
        control.set_deadline(Instant::now());
        assert_eq!(charge_steps(0), Err(Abort::Timeout));
        let (r, _) = run_with_ticker_deadline(u64::MAX, "while true do end", Some(0));
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("run exceeded its timeout"));
    }

    #[test]
    fn first_abort_reason_wins() {
        let scope = Scope::budget(Control::new(100));
        let _a = scope.activate(Caller::none());
        trip(Abort::Output);
        trip(Abort::Memory);
        assert_eq!(current_abort(), Some(Abort::Output));
    }

    #[test]
    fn activation_is_undone_on_drop() {
        let scope = Scope::budget(Control::new(1));
        {
            let _a = scope.activate(Caller::none());
            assert!(charge_steps(5).is_err());
        }
        assert!(charge_steps(5).is_ok());
    }

    fn run_with_ticker(max: u64, code: &str) -> (mlua::Result<()>, u64) {
        run_with_ticker_deadline(max, code, None)
    }

    fn run_with_ticker_deadline(
        max: u64,
        code: &str,
        deadline_ms: Option<u64>,
    ) -> (mlua::Result<()>, u64) {
        let lua = mlua::Lua::new();
        let scope = Scope::budget(Control::new(max));
        let control = &scope.control;
        if let Some(ms) = deadline_ms {
            control.set_deadline(Instant::now() + std::time::Duration::from_millis(ms));
        }
        let _a = scope.activate(Caller::none());
        let f = lua.load(code).into_function().unwrap();
        let thread = lua.create_thread(f).unwrap();
        // SAFETY (test): the thread's state outlives `control`'s use in this function.
        unsafe { install_ticker(thread.state(), control) };
        let r = thread.resume::<()>(());
        settle_instructions(thread.state(), control);
        (r, control.instructions())
    }

    #[test]
    fn the_ticker_counts_exactly_and_stops_loops() {
        let (r, n) = run_with_ticker(1_000_000, "local s = 0 for i = 1, 1000 do s = s + i end");
        assert!(r.is_ok());
        // two instructions per iteration plus the loop's setup and return
        assert!((2000..2020).contains(&n), "{n}");
        let (r, n) = run_with_ticker(5000, "while true do end");
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("instruction limit exceeded"));
        assert_eq!(n, 5000);
    }

    #[test]
    fn the_ticker_runs_in_coroutines_and_handlers() {
        for code in [
            "coroutine.wrap(function() while true do end end)()",
            "coroutine.wrap(function() coroutine.wrap(function() while true do end end)() end)()",
            // a message handler of an error raised by the ticker itself
            "xpcall(function() while true do end end, function() while true do end end)",
            "local ok = pcall(function() while true do end end) while true do end",
        ] {
            let (r, n) = run_with_ticker(20_000, code);
            assert!(r.is_err(), "{code}");
            assert_eq!(n, 20_000, "{code}");
        }
    }

    #[test]
    fn an_abort_makes_the_very_next_instruction_raise() {
        let lua = mlua::Lua::new();
        let scope = Scope::budget(Control::new(1_000_000));
        let control = &scope.control;
        let _a = scope.activate(Caller::none());
        install_on(&lua, control);
        let trip_output = lua
            .create_function(|_, ()| {
                trip(Abort::Output);
                Ok(())
            })
            .unwrap();
        lua.globals().set("trip_output", trip_output).unwrap();
        // Before: the countdown was not reset and ~1000 more instructions ran.
        let r = lua
            .load("pcall(trip_output) after = 1 for i = 1, 100 do after = i end")
            .exec();
        assert!(r.unwrap_err().to_string().contains("output limit exceeded"));
        assert_eq!(lua.globals().get::<Option<i64>>("after").unwrap(), None);
        assert_eq!(control.abort(), Some(Abort::Output));
    }

    #[test]
    fn rust_charges_use_the_vm_countdown() {
        let lua = mlua::Lua::new();
        let scope = Scope::budget(Control::new(10_000));
        let control = &scope.control;
        let _a = scope.activate(Caller::none());
        install_on(&lua, control);
        assert!(charge_steps(5_000).is_ok());
        // the units are pending in the countdown until a tick or a settle books them
        settle_on(&lua, control);
        assert_eq!(control.instructions(), 5_000);
        assert_eq!(charge_steps(5_000), Err(Abort::Instructions));
        // sticky: the next instruction raises
        assert!(lua.load("local x = 1").exec().is_err());
    }
}
