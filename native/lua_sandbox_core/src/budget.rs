//! The run's budget: instruction count, kill checks and the sticky abort flag.
//!
//! A run is *active* on a thread while the NIF that executes it is on the stack. The
//! activation lives in a thread-local so the instruction ticker, the hardened builtins and the
//! sandbox wrappers (`pcall`, `coroutine.resume`, ...) all see the same state without going
//! through the Lua registry on the hot path.
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

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int};
use std::ptr;
use std::time::{Duration, Instant};

use crate::ffi;

/// How many units of work (VM instructions, or their equivalent elsewhere) run between two
/// ticks: the kill check's granularity (tens of microseconds of Lua). The per-instruction
/// cost of the ticker does not depend on it.
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
    /// The run's `timeout:` deadline passed.
    Timeout,
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
            Abort::Timeout => "run exceeded its timeout",
        }
    }

    pub fn c_message(self) -> &'static std::ffi::CStr {
        match self {
            Abort::Instructions => c"instruction limit exceeded",
            Abort::Memory => c"not enough memory",
            Abort::Output => c"output limit exceeded",
            Abort::Killed => c"run killed",
            Abort::ToolCalls => c"tool call limit exceeded",
            Abort::Timeout => c"run exceeded its timeout",
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
    /// The address of the main thread of the state whose countdown this run's ticker reads
    /// (0 before [`install_ticker`]; the countdown is per state, and the main thread lives as
    /// long as the state). An address rather than a pointer keeps `Control` `Send`; it is only
    /// turned back into a pointer while the run's state is alive (see [`Control::set_abort`]).
    state: Cell<usize>,
    deadline: Cell<Option<Instant>>,
    /// CPU time of the run's finished NIF calls (`os.clock`, `stats.cpu_us`; see facts.rs).
    cpu_before: Cell<Duration>,
    /// This thread's CPU time when the current NIF call started running the script, less
    /// the wall time before the clock was first read (see [`Control::clock_mark`]).
    cpu_start: Cell<Option<Duration>>,
    /// The capabilities the script was denied ("os.getenv is not available in this sandbox"),
    /// by name, with how often (`stats.denied`); at most [`MAX_DENIED`] names.
    denied: RefCell<Vec<(String, u64)>>,
    /// When the current NIF call started running the script.
    wall_start: Cell<Option<Instant>>,
}

/// Distinct denied names a run records (the sandbox has about 40 stubs).
pub const MAX_DENIED: usize = 64;

impl Control {
    pub fn new(max_instructions: u64) -> Self {
        Control {
            used: Cell::new(0),
            max: max_instructions,
            abort: Cell::new(None),
            memory_peak: Cell::new(0),
            interval: Cell::new(TICK_INTERVAL),
            state: Cell::new(0),
            deadline: Cell::new(None),
            cpu_before: Cell::new(Duration::ZERO),
            cpu_start: Cell::new(None),
            denied: RefCell::new(Vec::new()),
            wall_start: Cell::new(None),
        }
    }

    /// Counts one denial of the capability `prefix` + `name`.
    pub fn note_denied(&self, prefix: &[u8], name: &[u8]) {
        let mut denied = self.denied.borrow_mut();
        let same = |n: &str| {
            n.len() == prefix.len() + name.len()
                && n.as_bytes().starts_with(prefix)
                && n.as_bytes().ends_with(name)
        };
        if let Some(entry) = denied.iter_mut().find(|(n, _)| same(n)) {
            entry.1 += 1;
        } else if denied.len() < MAX_DENIED {
            let full = [prefix, name].concat();
            denied.push((String::from_utf8_lossy(&full).into_owned(), 1));
        }
    }

    /// The capabilities the script was denied, with how often.
    pub fn denied(&self) -> std::cell::Ref<'_, Vec<(String, u64)>> {
        self.denied.borrow()
    }

    /// Starts counting CPU time for the NIF call running the script on this thread.
    ///
    /// The thread's CPU clock is a system call (`CLOCK_THREAD_CPUTIME_ID`, 0.3-1 µs, two per
    /// call: a third of a short run's cost), so it is read only from the first budget check
    /// on ([`Control::clock_mark`], every [`TICK_INTERVAL`] units of work): a NIF call that
    /// ends before counts its wall time, an upper bound of its CPU time over a few µs.
    pub fn clock_start(&self) {
        self.wall_start.set(Some(Instant::now()));
        self.cpu_start.set(None);
    }

    /// Reads the CPU clock once per NIF call (the first budget check calls this): the time
    /// since [`Control::clock_start`] counts as wall time, the rest as CPU time.
    pub fn clock_mark(&self) {
        if self.cpu_start.get().is_none() {
            if let Some(wall) = self.wall_start.get() {
                self.cpu_start
                    .set(Some(thread_cpu().saturating_sub(wall.elapsed())));
            }
        }
    }

    /// Stops counting at the end of a NIF call (before a tool call or the end of the run).
    pub fn clock_stop(&self) {
        let spent = self.running_time();
        self.cpu_start.set(None);
        self.wall_start.set(None);
        self.cpu_before.set(self.cpu_before.get() + spent);
    }

    /// The run's own CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        self.cpu_before.get() + self.running_time()
    }

    /// The current NIF call's share of [`Control::cpu_time`].
    fn running_time(&self) -> Duration {
        match (self.cpu_start.get(), self.wall_start.get()) {
            (Some(start), _) => thread_cpu().saturating_sub(start),
            (None, Some(wall)) => wall.elapsed(),
            (None, None) => Duration::ZERO,
        }
    }

    /// Makes the run time out at `deadline`; checked wherever the kill is.
    pub fn set_deadline(&self, deadline: Instant) {
        self.deadline.set(Some(deadline));
    }

    /// Why the run must stop for a reason outside the script: its caller died or its
    /// deadline passed.
    fn stopped(&self, env: Caller) -> Option<Abort> {
        if !caller_alive(env) {
            Some(Abort::Killed)
        } else if self.deadline.get().is_some_and(|d| Instant::now() >= d) {
            Some(Abort::Timeout)
        } else {
            None
        }
    }

    pub fn instructions(&self) -> u64 {
        self.used.get().min(self.max)
    }

    pub fn abort(&self) -> Option<Abort> {
        self.abort.get()
    }

    /// Records an abort; the first reason wins so the reported kind is the root cause. The
    /// abort takes effect at the source: the very next VM instruction or charge raises.
    pub fn set_abort(&self, why: Abort) {
        if self.abort.get().is_none() {
            self.abort.set(Some(why));
        }
        let l = self.state.get() as *mut ffi::lua_State;
        if !l.is_null() {
            // SAFETY: `state` is the main thread of the run's state, recorded by
            // `install_ticker`; `set_abort` is only called while that state is alive: from the
            // ticker and the charge functions (called by the running state), through `trip`
            // inside an `Activation` of the run, or by the run's owner while it holds the
            // state (run.rs `settle`).
            // `lua_sandboxabort` only stores two integers of the global state; it never raises.
            unsafe { lua_sandboxabort(l) };
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

/// Whether the process a run belongs to is still alive, given its opaque environment (for the
/// NIF: `enif_is_current_process_alive` on the NIF call's env).
///
/// # Safety
/// Called only with the `env` of the [`Caller`] it came with, while that caller's activation
/// lives.
pub type AliveCheck = unsafe fn(*mut std::ffi::c_void) -> bool;

/// Who a run works for: an opaque environment (the NIF call's `ErlNifEnv`; null in tests) and
/// how to ask whether it is still alive. The core never looks inside `env`.
#[derive(Clone, Copy)]
pub struct Caller {
    pub env: *mut std::ffi::c_void,
    pub alive: Option<AliveCheck>,
}

impl Caller {
    /// No caller to check (Rust tests, work that cannot be killed).
    pub const fn none() -> Caller {
        Caller {
            env: ptr::null_mut(),
            alive: None,
        }
    }
}

#[derive(Clone, Copy)]
struct Active {
    control: *const Control,
    caller: Caller,
}

thread_local! {
    static ACTIVE: Cell<Active> = const {
        Cell::new(Active { control: ptr::null(), caller: Caller::none() })
    };
}

/// Marks `control` as the running budget of this thread until dropped.
///
/// `caller` is the NIF call that runs Lua (none in Rust unit tests); its env is only used for
/// the liveness check and sending print output, and only while this guard lives, which is
/// strictly inside that NIF call.
pub struct Activation<'c> {
    previous: Active,
    // Ties the activation to the borrow of the `Control` it points at.
    _control: std::marker::PhantomData<&'c Control>,
}

impl<'c> Activation<'c> {
    pub fn new(control: &'c Control, caller: Caller) -> Activation<'c> {
        #[cfg(feature = "stretch")]
        crate::stretch::start();
        let previous = ACTIVE.with(|a| {
            a.replace(Active {
                control: control as *const Control,
                caller,
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
        #[cfg(feature = "stretch")]
        crate::stretch::stop();
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// Runs `f` with the active control, if any.
fn with_control<R>(f: impl FnOnce(&Control, Caller) -> R) -> Option<R> {
    ACTIVE.with(|a| {
        let Active { control, caller } = a.get();
        if control.is_null() {
            None
        } else {
            // SAFETY: `control` was set by an `Activation` whose lifetime is bounded by a
            // borrow of the `Control` (see `Activation::new`), and the activation is undone
            // in its `Drop` before that borrow ends; every caller of this function runs on
            // this thread strictly inside that window, so the pointer is valid and the
            // `Control` is only accessed through `Cell`s from this one thread.
            Some(f(unsafe { &*control }, caller))
        }
    })
}

/// Counts a capability the active run was denied (a no-op outside a run).
pub fn note_denied(prefix: &[u8], name: &[u8]) {
    with_control(|control, _| control.note_denied(prefix, name));
}

/// The opaque env of the active run's caller (null outside a run).
pub fn active_env() -> *mut std::ffi::c_void {
    with_control(|_, caller| caller.env).unwrap_or(ptr::null_mut())
}

fn caller_alive(caller: Caller) -> bool {
    match caller.alive {
        Some(alive) if !caller.env.is_null() => {
            // SAFETY: `env` came with this check in the caller's activation, which is live
            // (we are inside it, on its thread), as `AliveCheck` requires.
            unsafe { alive(caller.env) }
        }
        _ => true,
    }
}

/// Charges `steps` units of work to the budget and checks for a kill.
///
/// Once the ticker is installed this is the VM's own countdown (`lua_sandboxpoll`), the
/// same one the instructions, the VM patches and the C builtins charge; before that (and in
/// unit tests without a state) it charges the `Control` directly. Returns the abort reason
/// once one is set. Never raises.
pub fn charge_steps(steps: u64) -> Result<(), Abort> {
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
        crate::stretch::check(std::ptr::null_mut(), "charge outside the VM");
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

fn used_memory(l: *mut ffi::lua_State) -> usize {
    // SAFETY: `lua_gc` with LUA_GCCOUNT/COUNTB only reads the collector's counters; it never
    // allocates or raises, so it is safe to call from the ticker.
    unsafe {
        let kb = ffi::lua_gc(l, ffi::LUA_GCCOUNT, 0) as usize;
        let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB, 0) as usize;
        kb * 1024 + b
    }
}

type Ticker = extern "C" fn(*mut ffi::lua_State, c_int) -> *const c_char;

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
    fn lua_sandboxabort(l: *mut ffi::lua_State);
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

    #[test]
    fn charge_without_activation_is_free() {
        assert!(charge_steps(u64::MAX).is_ok());
        assert_eq!(current_abort(), None);
    }

    #[test]
    fn charge_trips_the_limit_and_sticks() {
        let control = Control::new(100);
        let _a = Activation::new(&control, Caller::none());
        assert!(charge_steps(99).is_ok());
        assert_eq!(charge_steps(1), Err(Abort::Instructions));
        assert_eq!(charge_steps(0), Err(Abort::Instructions));
        assert_eq!(control.instructions(), 100);
    }

    #[test]
    fn a_past_deadline_times_the_run_out() {
        let control = Control::new(u64::MAX);
        let _a = Activation::new(&control, Caller::none());
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
        let control = Control::new(100);
        let _a = Activation::new(&control, Caller::none());
        trip(Abort::Output);
        trip(Abort::Memory);
        assert_eq!(current_abort(), Some(Abort::Output));
    }

    #[test]
    fn activation_is_undone_on_drop() {
        let control = Control::new(1);
        {
            let _a = Activation::new(&control, Caller::none());
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
        let control = Control::new(max);
        if let Some(ms) = deadline_ms {
            control.set_deadline(Instant::now() + std::time::Duration::from_millis(ms));
        }
        let _a = Activation::new(&control, Caller::none());
        let f = lua.load(code).into_function().unwrap();
        let thread = lua.create_thread(f).unwrap();
        // SAFETY (test): the thread's state outlives `control`'s use in this function.
        unsafe { install_ticker(thread.state(), &control) };
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

    #[test]
    fn an_abort_makes_the_very_next_instruction_raise() {
        let lua = mlua::Lua::new();
        let control = Control::new(1_000_000);
        let _a = Activation::new(&control, Caller::none());
        install_on(&lua, &control);
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
        let control = Control::new(10_000);
        let _a = Activation::new(&control, Caller::none());
        install_on(&lua, &control);
        assert!(charge_steps(5_000).is_ok());
        // the units are pending in the countdown until a tick or a settle books them
        settle_on(&lua, &control);
        assert_eq!(control.instructions(), 5_000);
        assert_eq!(charge_steps(5_000), Err(Abort::Instructions));
        // sticky: the next instruction raises
        assert!(lua.load("local x = 1").exec().is_err());
    }
}
