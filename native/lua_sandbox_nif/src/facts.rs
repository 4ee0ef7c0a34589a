//! Per-run facts a script can observe: its own CPU time (`os.clock`) and a random seed.
//!
//! Lua's `os.clock` is `clock()`, the CPU time of the whole BEAM process: a side channel on
//! every other run and on the host. Here it is the CPU time of the run's own thread
//! (`CLOCK_THREAD_CPUTIME_ID`), summed over the NIF calls that ran it (a run parked at a tool
//! call may resume on another scheduler thread), so time spent in tools is not counted.
//!
//! Lua seeds `math.random` from `time()` and an address when the state is built: states built
//! in the same second (the pool builds them in bursts) shared one stream. Each state is seeded
//! from the OS's random source instead; states are never reused, so this is per run.

use std::time::Duration;

use mlua::{Function, Lua, Table};

/// The run's CPU clock, in the state's app data.
#[derive(Default)]
struct RunClock {
    /// CPU time of the NIF calls that have finished.
    before: Duration,
    /// This thread's CPU time when the current NIF call started running the script.
    call_start: Option<Duration>,
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on every
    // platform the BEAM's dirty schedulers run on (POSIX threads). On failure `ts` stays zero.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Starts counting CPU time for the NIF call running on this thread.
pub fn clock_start(lua: &Lua) {
    if let Some(mut c) = lua.app_data_mut::<RunClock>() {
        c.call_start = Some(thread_cpu());
    }
}

/// Stops counting at the end of a NIF call (before a tool call or the end of the run).
pub fn clock_stop(lua: &Lua) {
    if let Some(mut c) = lua.app_data_mut::<RunClock>() {
        if let Some(start) = c.call_start.take() {
            c.before += thread_cpu().saturating_sub(start);
        }
    }
}

/// The run's CPU time so far.
pub fn cpu_time(lua: &Lua) -> Duration {
    lua.app_data_ref::<RunClock>().map_or(Duration::ZERO, |c| {
        c.before
            + c.call_start
                .map_or(Duration::ZERO, |s| thread_cpu().saturating_sub(s))
    })
}

/// 16 bytes from the OS's random source (`getrandom`), or `None` if it fails.
fn random_seed() -> Option<[u8; 16]> {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`; flags 0 blocks
        // only until the kernel's pool is initialised (once per boot).
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        filled += n as usize;
    }
    Some(buf)
}

/// Replaces `os.clock` with the run's CPU clock and seeds `math.random` from the OS. Call it
/// once per fresh state, before the prelude copies `os.clock`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    lua.set_app_data(RunClock::default());
    let globals = lua.globals();
    let os: Table = globals.get("os")?;
    let clock = lua.create_function(|lua, ()| Ok(cpu_time(lua).as_secs_f64()))?;
    os.raw_set("clock", clock)?;

    let seed = random_seed().ok_or_else(|| {
        mlua::Error::RuntimeError("no random source to seed math.random".to_string())
    })?;
    let (a, b) = seed.split_at(8);
    let a = i64::from_ne_bytes(a.try_into().unwrap_or_default());
    let b = i64::from_ne_bytes(b.try_into().unwrap_or_default());
    let math: Table = globals.get("math")?;
    let randomseed: Function = math.get("randomseed")?;
    randomseed.call::<()>((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Lua {
        let lua = Lua::new();
        install(&lua).unwrap();
        lua
    }

    #[test]
    fn fresh_states_get_different_random_streams() {
        let firsts: std::collections::HashSet<i64> = (0..10)
            .map(|_| state().load("return math.random(1 << 40)").eval().unwrap())
            .collect();
        // Lua's own seed (time and an address) gave 1-2 distinct values for 10 states.
        assert!(firsts.len() >= 9, "{firsts:?}");
    }

    #[test]
    fn os_clock_counts_only_the_runs_own_calls() {
        let lua = state();
        let clock = || lua.load("return os.clock()").eval::<f64>().unwrap();
        assert_eq!(clock(), 0.0);
        // Spin on this thread's own CPU time: wall time says nothing on a loaded machine.
        let spin = |d: Duration| {
            let until = thread_cpu() + d;
            while thread_cpu() < until {}
        };
        clock_start(&lua);
        spin(Duration::from_millis(30));
        clock_stop(&lua);
        let after_call = clock();
        assert!((0.03..10.0).contains(&after_call), "{after_call}");
        // between calls (a tool running in Elixir) the clock stands still
        spin(Duration::from_millis(30));
        assert_eq!(clock(), after_call);
    }
}
