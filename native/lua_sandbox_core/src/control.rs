//! One run's accounting, with no thread-local in sight: the instruction count and its limit,
//! the sticky abort, the memory peak, the deadline and the run's own CPU clock, and who the run
//! works for ([`Caller`]). The run scope (`scope.rs`) owns a [`Control`]; the ticker and the
//! charges (`budget.rs`) update it.

use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::ptr;
use std::time::{Duration, Instant};

use crate::clock::thread_cpu;
use crate::ffi;

/// How many units of work (VM instructions, or their equivalent elsewhere) run between two
/// ticks: the kill check's granularity (tens of microseconds of Lua). The per-instruction
/// cost of the ticker does not depend on it.
pub const TICK_INTERVAL: u64 = 1000;

/// Bytes of bulk work (a copy, a conversion, a scan) done between two checks outside the VM:
/// the VM's own piece (`LUA_SBPIECE`, lua.h; a test keeps the two equal). 64 KiB copied into
/// fresh pages (the usual case: a new string, a new binary) took 67 µs median, 117 µs p99 on
/// the slow 2-core VM of issue 16 (a C probe), where 256 KiB pieces made 1.1-1.7 ms stretches
/// under `make stretch`.
pub const PIECE: usize = 64 * 1024;

/// Bytes worth one unit of work when copied, converted or scanned: the VM's rate (ldebug.h
/// `SB_BYTESHIFT`, csrc/sb_budget.h `SB_BYTES_PER_STEP`; a test keeps them equal), so a string
/// costs the same whether Lua builds it or the boundary converts it.
pub const BYTES_PER_UNIT: usize = 16;

/// Units of work for `bytes` bytes copied, converted or scanned.
pub const fn byte_units(bytes: usize) -> u64 {
    (bytes / BYTES_PER_UNIT) as u64
}

extern "C-unwind" {
    /// Makes the next VM instruction or charge of the state of `l` raise (the patched VM,
    /// vendor/lua-src/PATCHES.md); only stores two integers of the global state.
    pub(crate) fn lua_sandboxabort(l: *mut ffi::lua_State);
}

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
    pub(crate) used: Cell<u64>,
    pub(crate) max: u64,
    abort: Cell<Option<Abort>>,
    memory_peak: Cell<usize>,
    pub(crate) interval: Cell<u64>,
    /// The address of the main thread of the state whose countdown this run's ticker reads
    /// (0 before [`install_ticker`]; the countdown is per state, and the main thread lives as
    /// long as the state). An address rather than a pointer keeps `Control` `Send`; it is only
    /// turned back into a pointer while the run's state is alive (see [`Control::set_abort`]).
    pub(crate) state: Cell<usize>,
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
    pub(crate) fn stopped(&self, env: Caller) -> Option<Abort> {
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
    pub(crate) fn next_interval(&self) -> c_int {
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

/// Whether the caller is alive (always, when it has no check).
pub(crate) fn caller_alive(caller: Caller) -> bool {
    match caller.alive {
        Some(alive) if !caller.env.is_null() => {
            // SAFETY: `env` came with this check in the caller's activation, which is live
            // (we are inside it, on its thread), as `AliveCheck` requires.
            unsafe { alive(caller.env) }
        }
        _ => true,
    }
}
