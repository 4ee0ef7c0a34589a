//! The hole finder of the core's tests (issue 16): runs a script in a fresh slot with a caller
//! whose liveness check (made at every budget check) records the longest stretch of the run
//! thread's CPU time between two checks. Shared by bulk.rs and deep.rs.
#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lua_sandbox_core::budget::thread_cpu;
use lua_sandbox_core::control::Caller;
use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::exec::{Limits, Step};
use lua_sandbox_core::output::Print;

/// The longest stretch between two liveness checks, in thread CPU ns.
#[derive(Default)]
pub struct Stretches {
    pub last: AtomicU64,
    pub longest: AtomicU64,
}

pub unsafe fn alive(env: *mut c_void) -> bool {
    // SAFETY: `env` points at the test's `Stretches`, alive for the run.
    let s = unsafe { &*env.cast::<Stretches>() };
    let now = thread_cpu().as_nanos() as u64;
    let last = s.last.swap(now, Ordering::Relaxed);
    s.longest
        .fetch_max(now.saturating_sub(last), Ordering::Relaxed);
    true
}

/// Runs `src` to its end in a fresh slot for `caller`: `started` runs just before the script,
/// `finished` just after it (before the slot is given back).
pub fn run_to_end(
    src: &str,
    caller: Caller,
    started: impl FnOnce(),
    finished: impl FnOnce(),
) -> Result<(), SandboxError> {
    run_with(src, big_limits(), Print::Discard, caller, started, finished)
}

/// Room for the bulk cases: a budget no case reaches, 512 MiB of memory.
pub fn big_limits() -> Limits {
    Limits {
        max_instructions: 1 << 40,
        max_memory: 512 << 20,
        ..crate::common::limits()
    }
}

/// [`run_to_end`] under `limits`, printing to `print`.
pub fn run_with(
    src: &str,
    limits: Limits,
    print: Print,
    caller: Caller,
    started: impl FnOnce(),
    finished: impl FnOnce(),
) -> Result<(), SandboxError> {
    let (run, step) = crate::common::start_run(src, limits, print, &[], caller, started);
    finished();
    match step {
        Ok(Step::Done { .. }) => Ok(()),
        Ok(Step::Failed { .. }) => Err(run.outcome(SandboxError::Runtime(String::new()))),
        Err(e) => Err(run.outcome(e)),
        Ok(other) => panic!("{other:?}"),
    }
}

/// Runs `src` to its end; returns its outcome and the longest stretch between two checks.
pub fn longest_stretch(src: &str) -> (Result<(), SandboxError>, Duration) {
    longest_stretch_with(src, big_limits(), Print::Discard)
}

/// [`longest_stretch`] under `limits`, printing to `print`.
pub fn longest_stretch_with(
    src: &str,
    limits: Limits,
    print: Print,
) -> (Result<(), SandboxError>, Duration) {
    let stretches = Stretches::default();
    let env: *mut c_void = (&stretches as *const Stretches).cast_mut().cast();
    let caller = Caller {
        env,
        alive: Some(alive),
    };
    let outcome = run_with(
        src,
        limits,
        print,
        caller,
        || {
            stretches
                .last
                .store(thread_cpu().as_nanos() as u64, Ordering::Relaxed)
        },
        // The tail after the last check counts too.
        // SAFETY: `stretches` is alive; the call only reads the clock and updates the counters.
        || unsafe {
            alive(env);
        },
    );
    let longest = Duration::from_nanos(stretches.longest.load(Ordering::Relaxed));
    (outcome, longest)
}

/// Wide for a loaded machine: a piece is ~0.1 ms of work; each operation below did 15–100 ms
/// of copying or looping between two checks before it was done in pieces (the stack's and an
/// array part's growth to ~10^6 slots: 7-10 ms). Not here, still longer than that
/// (bench/ANALYSIS.md): the string table's rehash for millions of short strings.
pub const BOUND: Duration = Duration::from_millis(5);

/// Tries per measurement: a stretch of [`BOUND`] or more is measured again, and the shortest
/// counts. A missing check is there on every try (the same work runs between the same two
/// checks); a loaded machine's stretch is not: CI once measured 5.9 ms for a compare that takes
/// 1–1.5 ms alone (this file's tests run side by side, each touching hundreds of MiB).
pub const TRIES: usize = 3;

/// The shortest of up to [`TRIES`] longest stretches `measure` returns (it stops at the first
/// under `bound`); `measure` asserts each try's outcome.
pub fn shortest_stretch(bound: Duration, mut measure: impl FnMut() -> Duration) -> Duration {
    let mut shortest = Duration::MAX;
    for _ in 0..TRIES {
        shortest = shortest.min(measure());
        if shortest < bound {
            break;
        }
    }
    shortest
}

/// [`longest_stretch_with`] run to its end, `Ok`, with the shortest of [`shortest_stretch`]'s
/// tries against [`BOUND`]; prints each try.
pub fn checked_stretch(src: &str, limits: Limits, print: fn() -> Print) -> Duration {
    checked_stretch_within(src, limits, print, BOUND)
}

/// [`checked_stretch`], trying again while a stretch is `bound` or more.
pub fn checked_stretch_within(
    src: &str,
    limits: Limits,
    print: fn() -> Print,
    bound: Duration,
) -> Duration {
    shortest_stretch(bound, || {
        let (outcome, longest) = longest_stretch_with(src, limits, print());
        assert_eq!(outcome, Ok(()), "{src}");
        eprintln!("{longest:?} between two checks: {src}");
        longest
    })
}

/// Runs each script to its end; fails naming every one with a stretch of [`BOUND`] or more on
/// each of [`TRIES`] tries.
pub fn assert_checked_between_pieces(cases: &[String]) {
    assert_checked_within(cases, BOUND);
}

/// [`assert_checked_between_pieces`] against `bound`: for work shorter than [`BOUND`] even
/// without its checks.
pub fn assert_checked_within(cases: &[String], bound: Duration) {
    let slow: Vec<String> = cases
        .iter()
        .map(|src| {
            let longest = checked_stretch_within(src, big_limits(), || Print::Discard, bound);
            (longest, src)
        })
        .filter(|(longest, _)| *longest >= bound)
        .map(|(longest, src)| format!("{longest:?} between two checks: {src}"))
        .collect();
    assert!(slow.is_empty(), "{slow:#?}");
}

/// Runs `src` with a caller that dies at its `checks`-th liveness check (never: u64::MAX);
/// returns the outcome and the checks made.
pub fn killed_at(src: &str, checks: u64) -> (Result<(), SandboxError>, u64) {
    let left = AtomicU64::new(checks);
    let caller = Caller {
        env: (&left as *const AtomicU64).cast_mut().cast(),
        alive: Some(crate::common::alive_for),
    };
    let outcome = run_to_end(src, caller, || {}, || {});
    (outcome, checks.wrapping_sub(left.load(Ordering::Relaxed)))
}

/// The checks made by `{base} return 1` and by `{base} {extra} return 1` (both must run to
/// their end): what `extra` adds is counted, not timed, where its work between two checks is
/// short even unchecked.
pub fn checks_without_and_with(base: &str, extra: &str) -> (u64, u64) {
    let (outcome, without) = killed_at(&format!("{base} return 1"), u64::MAX);
    assert_eq!(outcome, Ok(()), "{base}");
    let (outcome, with) = killed_at(&format!("{base} {extra} return 1"), u64::MAX);
    assert_eq!(outcome, Ok(()), "{base} {extra}");
    eprintln!("checks: {without} without `{extra}`, {with} with it");
    (without, with)
}
