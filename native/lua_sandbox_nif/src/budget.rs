//! The run's budget: instruction count, kill checks and the sticky abort flag.
//!
//! A run is *active* on a thread while the NIF that executes it is on the stack. The
//! activation lives in a thread-local so the instruction ticker, the hardened builtins and the
//! sandbox wrappers (`pcall`, `coroutine.resume`, ...) all see the same state without going
//! through the Lua registry on the hot path.
//!
//! Aborts are *sticky*: once a limit tripped or the caller died, every later tick,
//! every wrapper return and every builtin step raises again, so no amount of `pcall`,
//! `xpcall`, `coroutine.resume` or `__close` lets a script keep running.

use std::cell::Cell;
use std::ffi::c_int;
use std::ptr;

use lua_sandbox_core::ffi;
use rustler::sys::ErlNifEnv;

/// How many VM instructions run between two ticks: the kill check's granularity (a few
/// microseconds of Lua). The per-instruction cost of the ticker does not depend on it.
pub const TICK_INTERVAL: u64 = 1000;

/// Why a run was stopped from the outside of the script's control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// `max_instructions` used up.
    Instructions,
    /// `max_memory` reached (the allocator refused).
    Memory,
    /// `max_output` exceeded.
    Output,
    /// The Erlang process that runs the NIF is no longer alive.
    Killed,
    /// `max_tool_calls` exceeded.
    ToolCalls,
}

impl Abort {
    /// The message raised inside Lua; it only surfaces if Lua formats the error itself.
    #[cfg(test)]
    pub fn message(self) -> &'static str {
        match self {
            Abort::Instructions => "instruction limit exceeded",
            Abort::Memory => "not enough memory",
            Abort::Output => "output limit exceeded",
            Abort::Killed => "run killed",
            Abort::ToolCalls => "tool call limit exceeded",
        }
    }

    pub(crate) fn c_message(self) -> &'static std::ffi::CStr {
        match self {
            Abort::Instructions => c"instruction limit exceeded",
            Abort::Memory => c"not enough memory",
            Abort::Output => c"output limit exceeded",
            Abort::Killed => c"run killed",
            Abort::ToolCalls => c"tool call limit exceeded",
        }
    }
}

/// Per-run accounting. Lives in a `Box` owned by the run, so its address is stable while an
/// activation points at it.
#[derive(Debug)]
pub struct Control {
    used: Cell<u64>,
    max: u64,
    abort: Cell<Option<Abort>>,
    memory_peak: Cell<usize>,
    interval: Cell<u64>,
}

impl Control {
    pub fn new(max_instructions: u64) -> Self {
        Control {
            used: Cell::new(0),
            max: max_instructions,
            abort: Cell::new(None),
            memory_peak: Cell::new(0),
            interval: Cell::new(TICK_INTERVAL),
        }
    }

    pub fn instructions(&self) -> u64 {
        self.used.get().min(self.max)
    }

    pub fn abort(&self) -> Option<Abort> {
        self.abort.get()
    }

    /// Records an abort; the first reason wins so the reported kind is the root cause.
    pub fn set_abort(&self, why: Abort) {
        if self.abort.get().is_none() {
            self.abort.set(Some(why));
        }
    }

    pub fn memory_peak(&self) -> usize {
        self.memory_peak.get()
    }

    pub fn note_memory(&self, bytes: usize) {
        if bytes > self.memory_peak.get() {
            self.memory_peak.set(bytes);
        }
    }

    /// Instructions left before the limit; the tick interval never overshoots it.
    fn next_interval(&self) -> c_int {
        let left = self.max.saturating_sub(self.used.get());
        let next = left.clamp(1, TICK_INTERVAL);
        self.interval.set(next);
        next as c_int
    }
}

#[derive(Clone, Copy)]
struct Active {
    control: *const Control,
    env: *mut ErlNifEnv,
}

thread_local! {
    static ACTIVE: Cell<Active> = const {
        Cell::new(Active { control: ptr::null(), env: ptr::null_mut() })
    };
}

/// Marks `control` as the running budget of this thread until dropped.
///
/// `env` is the NIF environment of the call that runs Lua (null in Rust unit tests); it is
/// only used for `enif_is_current_process_alive` and sending print output, and only while
/// this guard lives, which is strictly inside that NIF call.
pub struct Activation<'c> {
    previous: Active,
    // Ties the activation to the borrow of the `Control` it points at.
    _control: std::marker::PhantomData<&'c Control>,
}

impl<'c> Activation<'c> {
    pub fn new(control: &'c Control, env: *mut ErlNifEnv) -> Activation<'c> {
        let previous = ACTIVE.with(|a| {
            a.replace(Active {
                control: control as *const Control,
                env,
            })
        });
        Activation {
            previous,
            _control: std::marker::PhantomData,
        }
    }
}

impl Drop for Activation<'_> {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// Runs `f` with the active control, if any.
fn with_control<R>(f: impl FnOnce(&Control, *mut ErlNifEnv) -> R) -> Option<R> {
    ACTIVE.with(|a| {
        let Active { control, env } = a.get();
        if control.is_null() {
            None
        } else {
            // SAFETY: `control` was set by an `Activation` whose lifetime is bounded by a
            // borrow of the `Control` (see `Activation::new`), and the activation is undone
            // in its `Drop` before that borrow ends; every caller of this function runs on
            // this thread strictly inside that window, so the pointer is valid and the
            // `Control` is only accessed through `Cell`s from this one thread.
            Some(f(unsafe { &*control }, env))
        }
    })
}

/// The raw NIF env of the active run (null outside a NIF call).
pub fn active_env() -> *mut ErlNifEnv {
    with_control(|_, env| env).unwrap_or(ptr::null_mut())
}

fn caller_alive(env: *mut ErlNifEnv) -> bool {
    if env.is_null() {
        return true;
    }
    // SAFETY: `env` is the environment of the NIF call currently executing on this thread
    // (see `Activation`); `enif_is_current_process_alive` is documented for exactly this use
    // from a dirty NIF and only reads the process state.
    unsafe { rustler::sys::enif_is_current_process_alive(env) != 0 }
}

/// Charges `steps` units of work to the budget and checks for a kill.
///
/// The hardened builtins call this every 1000 steps of their inner loops (the ticker does the
/// same for VM instructions, in `tick_verdict`). Returns the abort reason once one is set.
pub fn charge_steps(steps: u64) -> Result<(), Abort> {
    with_control(|control, env| {
        if let Some(why) = control.abort() {
            return Err(why);
        }
        control.used.set(control.used.get().saturating_add(steps));
        if control.used.get() >= control.max {
            control.set_abort(Abort::Instructions);
        } else if !caller_alive(env) {
            control.set_abort(Abort::Killed);
        }
        control.abort().map_or(Ok(()), Err)
    })
    .unwrap_or(Ok(()))
}

/// The abort reason of the active run, if any.
pub fn current_abort() -> Option<Abort> {
    with_control(|control, _| control.abort()).flatten()
}

/// Sets an abort on the active run (used by output and tool limits).
pub fn trip(why: Abort) {
    with_control(|control, _| control.set_abort(why));
}

fn used_memory(l: *mut ffi::lua_State) -> usize {
    // SAFETY: `lua_gc` with LUA_GCCOUNT/COUNTB only reads the collector's counters; it never
    // allocates or raises, so it is safe to call from the ticker.
    unsafe {
        let kb = ffi::lua_gc(l, ffi::LUA_GCCOUNT, 0) as usize;
        let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB, 0) as usize;
        kb * 1024 + b
    }
}

type Ticker = unsafe extern "C-unwind" fn(*mut ffi::lua_State);

// The instruction ticker of our Lua build (vendor/lua-src/PATCHES.md): a callback every N VM
// instructions of any thread of the state, at the cost of one decrement per instruction. A
// count hook makes Lua 5.4 trap on *every* instruction (2.4x slower on fib(27) here), must be
// set per thread, and is switched off in error handlers and finalizers; the ticker is not.
extern "C-unwind" {
    fn lua_setticker(l: *mut ffi::lua_State, f: Option<Ticker>, interval: c_int);
    fn lua_getticksleft(l: *mut ffi::lua_State) -> ffi::lua_Integer;
}

/// Installs the ticker on the state of `l` (every thread of it: the counter is global).
pub fn install_ticker(l: *mut ffi::lua_State, control: &Control) {
    // SAFETY: `l` is a valid state owned by the caller; `lua_setticker` only stores three
    // fields of the global state and never raises.
    unsafe { lua_setticker(l, Some(tick), control.next_interval()) };
}

/// Instructions executed since the last tick, to make `stats.instructions` exact.
pub fn settle_instructions(l: *mut ffi::lua_State, control: &Control) {
    // SAFETY: `l` is a valid state; the getter only reads one field of the global state.
    let left = unsafe { lua_getticksleft(l) };
    let interval = control.interval.get() as i64;
    if (0..=interval).contains(&left) {
        let ran = (interval - left) as u64;
        control.used.set(control.used.get().saturating_add(ran));
        control.interval.set(left as u64);
    }
}

/// The ticker. It must not hold any value with a destructor when it raises, because
/// `lua_error` leaves this frame with `longjmp` (Lua is built as C); everything with a `Drop`
/// lives inside `tick_verdict`, which has returned by then.
unsafe extern "C-unwind" fn tick(l: *mut ffi::lua_State) {
    if let Some((why, next)) = tick_verdict(l) {
        // SAFETY: `l` is the running thread handed to us by the VM, with room on its stack
        // (`luaG_sandboxtick` checked LUA_MINSTACK). After an abort the ticker fires on every
        // instruction, so the script cannot get far; `lua_error` from the ticker unwinds
        // (longjmp) to the nearest protected call. No Rust value with a destructor is live.
        unsafe {
            lua_setticker(l, Some(tick), next);
            if let Some(why) = why {
                ffi::lua_pushstring(l, why.c_message().as_ptr());
                ffi::lua_error(l);
            }
        }
    }
}

/// Decides what the ticker does: `None` when no run is active; otherwise the abort to raise
/// (if any) and the interval until the next tick.
fn tick_verdict(l: *mut ffi::lua_State) -> Option<(Option<Abort>, c_int)> {
    with_control(|control, env| {
        control.note_memory(used_memory(l));
        if control.abort().is_none() {
            control
                .used
                .set(control.used.get().saturating_add(control.interval.get()));
            if control.used.get() >= control.max {
                control.set_abort(Abort::Instructions);
            } else if !caller_alive(env) {
                control.set_abort(Abort::Killed);
            }
        }
        match control.abort() {
            Some(why) => (Some(why), 1),
            None => (None, control.next_interval()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_without_activation_is_free() {
        assert!(charge_steps(u64::MAX).is_ok());
        assert_eq!(current_abort(), None);
    }

    #[test]
    fn charge_trips_the_limit_and_sticks() {
        let control = Control::new(100);
        let _a = Activation::new(&control, ptr::null_mut());
        assert!(charge_steps(99).is_ok());
        assert_eq!(charge_steps(1), Err(Abort::Instructions));
        assert_eq!(charge_steps(0), Err(Abort::Instructions));
        assert_eq!(control.instructions(), 100);
    }

    #[test]
    fn first_abort_reason_wins() {
        let control = Control::new(100);
        let _a = Activation::new(&control, ptr::null_mut());
        trip(Abort::Output);
        trip(Abort::Memory);
        assert_eq!(current_abort(), Some(Abort::Output));
    }

    #[test]
    fn activation_is_undone_on_drop() {
        let control = Control::new(1);
        {
            let _a = Activation::new(&control, ptr::null_mut());
            assert!(charge_steps(5).is_err());
        }
        assert!(charge_steps(5).is_ok());
    }

    fn run_with_ticker(max: u64, code: &str) -> (mlua::Result<()>, u64) {
        let lua = mlua::Lua::new();
        let control = Control::new(max);
        let _a = Activation::new(&control, ptr::null_mut());
        let f = lua.load(code).into_function().unwrap();
        let thread = lua.create_thread(f).unwrap();
        install_ticker(thread.state(), &control);
        let r = thread.resume::<()>(());
        settle_instructions(thread.state(), &control);
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
}
