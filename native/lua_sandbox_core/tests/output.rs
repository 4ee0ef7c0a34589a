//! What a script prints reaches the run's output through the core's own hook, with no BEAM:
//! captured, streamed to the run's sink (coalesced), capped at `max_output` with a sticky abort.
//! Linking this test at all shows the core's C (csrc/sb_baselib.c) links against the core alone.

mod common;

use std::sync::{Arc, Mutex};

use lua_sandbox_core::budget::{self, Abort, Caller, Control};
use lua_sandbox_core::output::{Output, Print, Sink};
use lua_sandbox_core::scope::Scope;

/// A sink that records what it is sent.
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl Sink for Recorder {
    fn send(&mut self, _caller: Caller, chunk: &[u8]) {
        self.0.lock().unwrap().push(chunk.to_vec());
    }
}

fn run(scope: &Scope, code: &str) -> Result<String, String> {
    let mut slot = common::new_stock_slot(16 * common::MIB);
    let _active = scope.activate(Caller::none());
    // SAFETY: the slot's state outlives every use of the control in this function.
    unsafe { budget::install_ticker(slot.state(), &scope.control) };
    common::eval(&mut slot, code).map_err(|e| e.message)
}

#[test]
fn print_is_captured_and_streamed_through_the_sink() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let output = Output::new(1 << 20, Print::Stream(Box::new(Recorder(sent.clone()))));
    let scope = Scope::new(Control::new(1_000_000), output);
    let r = run(&scope, "print('hello', 1) io.write('a', 'b') return 7");
    assert_eq!(r.as_deref(), Ok("7"));
    // The first line goes out at once; the rest waits for the interval or the end of the run.
    assert_eq!(*sent.lock().unwrap(), vec![b"hello\t1\n".to_vec()]);
    assert_eq!(scope.output().finish(Caller::none()), b"hello\t1\nab");
    assert_eq!(
        *sent.lock().unwrap(),
        vec![b"hello\t1\n".to_vec(), b"ab".to_vec()]
    );
}

#[test]
fn output_over_the_limit_aborts_the_run_for_good() {
    let scope = Scope::new(Control::new(1_000_000), Output::new(10, Print::Capture));
    let r = run(
        &scope,
        "for i = 1, 100 do pcall(print, 'line ' .. i) end return 'kept running'",
    );
    let e = r.unwrap_err();
    assert!(e.contains("output limit exceeded"), "{e}");
    assert_eq!(scope.control.abort(), Some(Abort::Output));
    assert_eq!(scope.output().take(), b"line 1\n");
}

#[test]
fn discarded_output_costs_nothing() {
    let scope = Scope::budget(Control::new(1_000_000));
    let r = run(&scope, "for i = 1, 100 do print(i) end return 'done'");
    assert_eq!(r.as_deref(), Ok("done"));
    assert!(scope.output().take().is_empty());
}
