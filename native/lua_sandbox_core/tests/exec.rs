//! Whole runs with no BEAM: a sandboxed state leased from the pool, a chunk run by the core's
//! run coroutine, a tool call suspended and resumed with the tool's reply, kills through a test
//! caller, limits that end the run, and slots that come back pristine whatever happened.

mod common;

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lua_sandbox_core::control::Caller;
use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::exec::{Limits, Push, Reply, Run, Step};
use lua_sandbox_core::output::Print;
use lua_sandbox_core::{ffi, protect};

/// Starts `src` as a fresh run with the tools `tools`, up to its first stop.
fn start(
    src: &str,
    limits: Limits,
    tools: &[String],
    caller: Caller,
) -> (Run, Result<Step, SandboxError>) {
    common::start_run(src, limits, Print::Capture, tools, caller, || {})
}

/// `tostring` of each value on the run coroutine at `first..first + n`.
fn values(run: &Run, first: c_int, n: c_int) -> Vec<String> {
    // SAFETY: the indices are the ones a `Step` reported on the stopped run coroutine.
    let l = run.thread();
    (first..first + n)
        .map(|i| unsafe {
            match ffi::lua_type(l, i) {
                ffi::LUA_TNIL => "nil".to_string(),
                ffi::LUA_TBOOLEAN => (ffi::lua_toboolean(l, i) != 0).to_string(),
                _ => protect::describe(l, i),
            }
        })
        .collect()
}

fn done(run: &Run, step: Result<Step, SandboxError>) -> Vec<String> {
    match step {
        Ok(Step::Done { first, n }) => values(run, first, n),
        other => panic!("not done: {other:?}"),
    }
}

#[test]
fn a_chunk_runs_and_returns_its_values() {
    let (run, step) = start(
        "print('hi') return 1 + 1, 'two'",
        common::limits(),
        &[],
        Caller::none(),
    );
    assert_eq!(done(&run, step), ["2", "two"]);
    assert_eq!(run.scope.output().finish(Caller::none()), b"hi\n");
    let stats = run.stats();
    assert!(stats.instructions > 0 && stats.memory_peak > 0, "{stats:?}");
}

#[test]
fn a_tool_call_suspends_the_run_and_its_reply_resumes_it() {
    let tools = ["add".to_string(), "fail".to_string()];
    let src = "local s = tools.add(1, 2)\n\
               local v, err = tools.fail()\n\
               local ok, raised = pcall(tools.add, 'x')\n\
               return s * 10, v, err, raised";
    let (mut run, mut step) = start(src, common::limits(), &tools, Caller::none());
    let mut calls = Vec::new();
    while let Ok(Step::ToolCall {
        name,
        first,
        n,
        keep,
    }) = step
    {
        calls.push((name.clone(), values(&run, first, n)));
        run.take_tool_args(keep);
        let nargs = match (name.as_str(), calls.len()) {
            ("add", 1) => {
                let mut push = |l: *mut ffi::lua_State, _limit: usize| {
                    // SAFETY: `exec` hands a non-running state with its limit lifted.
                    unsafe { ffi::lua_pushinteger(l, 3) };
                    Ok(1)
                };
                run.reply(Caller::none(), Reply::Values(&mut push as Push))
            }
            ("fail", _) => run.reply(Caller::none(), Reply::Error(b"no such thing")),
            _ => run.reply(Caller::none(), Reply::Raise(b"bad argument")),
        };
        step = nargs.and_then(|n| run.resume(Caller::none(), n));
    }
    assert_eq!(
        calls,
        [
            ("add".to_string(), vec!["1".to_string(), "2".to_string()]),
            ("fail".to_string(), vec![]),
            ("add".to_string(), vec!["x".to_string()]),
        ]
    );
    assert_eq!(
        done(&run, step),
        ["30", "nil", "no such thing", "bad argument"]
    );
    assert_eq!(run.stats().tool_calls, 3);
}

#[test]
fn tool_calls_over_the_limit_end_the_run() {
    let tools = ["t".to_string()];
    let limits = Limits {
        max_tool_calls: 0,
        ..common::limits()
    };
    let (run, step) = start("pcall(tools.t) return 1", limits, &tools, Caller::none());
    assert_eq!(step.unwrap_err(), SandboxError::ToolLimit);
    assert_eq!(
        run.outcome(SandboxError::Runtime(String::new())),
        SandboxError::ToolLimit
    );
}

/// A caller that is alive for `countdown` checks, then dead.
unsafe fn alive(env: *mut c_void) -> bool {
    // SAFETY: `env` points at the test's `AtomicUsize`, alive for the run.
    let left = unsafe { &*env.cast::<AtomicUsize>() };
    left.fetch_sub(1, Ordering::SeqCst) > 1
}

#[test]
fn a_dead_caller_kills_the_run_even_through_pcall() {
    let countdown = AtomicUsize::new(5);
    let caller = Caller {
        env: (&countdown as *const AtomicUsize).cast_mut().cast(),
        alive: Some(alive),
    };
    let (run, step) = start(
        "while true do pcall(function() while true do end end) end",
        common::limits(),
        &[],
        caller,
    );
    let e = match step {
        Err(e) => e,
        Ok(Step::Failed { .. }) => SandboxError::Runtime(String::new()),
        other => panic!("{other:?}"),
    };
    assert_eq!(run.outcome(e), SandboxError::Killed);
}

#[test]
fn a_caller_dead_while_a_tool_runs_stops_the_resume() {
    let tools = ["slow".to_string()];
    let countdown = AtomicUsize::new(usize::MAX);
    let caller = Caller {
        env: (&countdown as *const AtomicUsize).cast_mut().cast(),
        alive: Some(alive),
    };
    let (mut run, step) = start("tools.slow() return 1", common::limits(), &tools, caller);
    let Ok(Step::ToolCall { keep, .. }) = step else {
        panic!("{step:?}")
    };
    run.take_tool_args(keep);
    countdown.store(0, Ordering::SeqCst);
    let step = run
        .reply(caller, Reply::Error(b"late"))
        .and_then(|n| run.resume(caller, n));
    assert_eq!(run.outcome(step.unwrap_err()), SandboxError::Killed);
}

#[test]
fn limits_end_the_run_with_their_kind() {
    let cases: [(&str, Limits, SandboxError); 4] = [
        (
            "while true do end",
            Limits {
                max_instructions: 100_000,
                ..common::limits()
            },
            SandboxError::InstructionLimit,
        ),
        (
            "local t = {} for i = 1, 1e9 do t[i] = i end",
            common::limits(),
            SandboxError::MemoryLimit,
        ),
        (
            "for i = 1, 1e9 do print(i) end",
            Limits {
                max_output: 100,
                ..common::limits()
            },
            SandboxError::OutputLimit,
        ),
        (
            "while true do end",
            Limits {
                timeout: Some(Duration::from_millis(20)),
                ..common::limits()
            },
            SandboxError::Timeout,
        ),
    ];
    for (src, limits, want) in cases {
        let (run, step) = start(src, limits, &[], Caller::none());
        let e = match step {
            Err(e) => e,
            Ok(Step::Failed { .. }) => SandboxError::Runtime(String::new()),
            other => panic!("{src}: {other:?}"),
        };
        assert_eq!(run.outcome(e), want, "{src}");
    }
}

#[test]
fn a_slot_comes_back_pristine_after_any_end() {
    let tools = ["t".to_string()];
    for src in [
        "leaked = 1 return 1",
        "leaked = 1 error('x')",
        "leaked = 1 tools.t()",
    ] {
        let (run, _) = start(src, common::limits(), &tools, Caller::none());
        drop(run); // finished, failed, or abandoned at a tool call
    }
    // Leases come from the idle slots the runs above returned (tests run in parallel: a few).
    for _ in 0..4 {
        let (run, step) = start(
            "return leaked == nil",
            common::limits(),
            &[],
            Caller::none(),
        );
        assert_eq!(done(&run, step), ["true"]);
    }
}
