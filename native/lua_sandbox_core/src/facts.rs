//! Per-run facts a script can observe: its own CPU time (`os.clock`).
//!
//! Lua's `os.clock` is `clock()`, the CPU time of the whole BEAM process: a side channel on
//! every other run and on the host. Here it is the CPU time of the run's own thread
//! (`CLOCK_THREAD_CPUTIME_ID`), summed over the NIF calls that ran it (a run parked at a tool
//! call may resume on another scheduler thread), so time spent in tools is not counted. The
//! sum lives in the run's `budget::Control` (`clock_start`/`clock_stop`; the clock is read from
//! the first budget check of each NIF call on, the few µs before count their wall time).
//!
//! (`math.random` is seeded per run from the kernel by `crate::seed`.)

use std::ffi::c_int;

use crate::ffi;

/// Units one `os.clock()` costs besides its call: reading a thread's CPU clock is a system
/// call (no vDSO), ~0.57 µs here, so a loop calling it was charged 3 units per 0.57 µs (~5 300
/// units per ms of CPU, under issue 16's 5 000 on a loaded machine: the generated suite's lowest
/// rate). With these, ~33 000.
const OS_CLOCK_COST: u64 = 16;

/// `os.clock()`: the run's own CPU time in seconds.
unsafe extern "C-unwind" fn os_clock(l: *mut ffi::lua_State) -> c_int {
    // An abort this sets is sticky: the script's next instruction raises it.
    let _ = crate::budget::charge_steps(OS_CLOCK_COST);
    // SAFETY: pushes one number (no allocation) onto the calling thread's stack.
    unsafe {
        ffi::lua_pushnumber(l, crate::budget::active_cpu_time().as_secs_f64());
    }
    1
}

/// Replaces `os.clock` in a state being built, before the prelude copies it.
///
/// # Safety
/// Only inside a protected call on `l` (it may raise), with `os` opened.
pub unsafe fn install(l: *mut ffi::lua_State) {
    // SAFETY: per the contract.
    unsafe {
        ffi::lua_getglobal(l, c"os".as_ptr());
        ffi::lua_pushcfunction(l, os_clock);
        ffi::lua_setfield(l, -2, c"clock".as_ptr());
        ffi::lua_pop(l, 1);
    }
}

#[cfg(test)]
mod tests {
    use crate::budget::{thread_cpu, Control};
    use std::time::Duration;

    #[test]
    fn the_clock_counts_only_the_runs_own_calls() {
        let control = Control::new(u64::MAX);
        assert_eq!(control.cpu_time(), Duration::ZERO);
        // Spin on this thread's own CPU time: wall time says nothing on a loaded machine.
        let spin = |d: Duration| {
            let until = thread_cpu() + d;
            while thread_cpu() < until {}
        };
        control.clock_start();
        spin(Duration::from_millis(30));
        control.clock_stop();
        let after_call = control.cpu_time();
        assert!(after_call >= Duration::from_millis(30), "{after_call:?}");
        // between calls (a tool running in Elixir) the clock stands still
        spin(Duration::from_millis(30));
        assert_eq!(control.cpu_time(), after_call);
    }

    #[test]
    fn from_the_first_budget_check_on_the_clock_is_cpu_time() {
        let control = Control::new(u64::MAX);
        control.clock_start();
        control.clock_mark();
        // off the CPU: not counted once the clock was read
        std::thread::sleep(Duration::from_millis(200));
        let until = thread_cpu() + Duration::from_millis(10);
        while thread_cpu() < until {}
        control.clock_stop();
        let spent = control.cpu_time();
        assert!(spent >= Duration::from_millis(10), "{spent:?}");
        assert!(spent < Duration::from_millis(150), "{spent:?}");
    }
}
