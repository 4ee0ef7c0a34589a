//! What `print` and `io.write` produce: captured, capped at `max_output`, optionally streamed.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr;

use rustler::{Encoder, Env, LocalPid};

use crate::atoms;
use crate::budget::{self, Abort};

/// Where printed output goes, besides `Result.output` (all but `Discard` keep it there).
#[derive(Clone, Copy)]
pub enum PrintMode {
    Capture,
    Send(LocalPid),
    Log,
    Discard,
}

/// The output of one run; owned by the run, active on the thread that executes it.
pub struct Output {
    pub buf: Vec<u8>,
    max: usize,
    mode: PrintMode,
    /// With `defer_stream`: the chunks (ends in `buf`) to send once the attempt succeeded.
    deferred: Option<Vec<usize>>,
}

impl Output {
    pub fn new(max: usize, mode: PrintMode) -> Self {
        Output {
            buf: Vec::new(),
            max,
            mode,
            deferred: None,
        }
    }

    /// Streamed chunks are held back (a first attempt must not be seen before it succeeds).
    pub fn defer_stream(&mut self) {
        self.deferred = Some(Vec::new());
    }

    /// Sends the held-back chunks, in order, from the NIF call's own env.
    pub fn send_deferred(&mut self, env: Env) {
        let (Some(ends), PrintMode::Send(pid)) = (self.deferred.take(), self.mode) else {
            return;
        };
        let mut start = 0;
        for end in ends {
            let chunk = crate::marshal::binary_term(env, &self.buf[start..end]);
            let _ = env.send(&pid, (atoms::lua_print(), chunk).encode(env));
            start = end;
        }
    }
}

thread_local! {
    static ACTIVE: Cell<*mut Output> = const { Cell::new(ptr::null_mut()) };
}

/// Makes `out` the output that `emit` appends to on this thread until dropped.
pub struct Activation<'o> {
    previous: *mut Output,
    _out: PhantomData<&'o mut Output>,
}

impl<'o> Activation<'o> {
    pub fn new(out: &'o mut Output) -> Activation<'o> {
        let previous = ACTIVE.with(|a| a.replace(out as *mut Output));
        Activation {
            previous,
            _out: PhantomData,
        }
    }
}

impl Drop for Activation<'_> {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// Appends one printed chunk. Over `max_output` the run is aborted (sticky, like every limit).
pub fn emit(bytes: &[u8]) -> Result<(), Abort> {
    let out = ACTIVE.with(|a| a.get());
    if out.is_null() {
        return Ok(());
    }
    // SAFETY: `out` was set by an `Activation` holding the `&mut Output` for its lifetime, on
    // this thread; we are strictly inside it (called from Lua code run by that NIF call), and
    // no other reference to the Output is used meanwhile.
    let out = unsafe { &mut *out };
    if let PrintMode::Discard = out.mode {
        return Ok(());
    }
    if out.buf.len().saturating_add(bytes.len()) > out.max {
        budget::trip(Abort::Output);
        return Err(Abort::Output);
    }
    out.buf.extend_from_slice(bytes);
    if let PrintMode::Send(pid) = out.mode {
        match &mut out.deferred {
            Some(ends) => ends.push(out.buf.len()),
            None => send_chunk(&pid, bytes),
        }
    }
    Ok(())
}

/// Sends `{:lua_print, chunk}` while the script is still running.
fn send_chunk(pid: &LocalPid, bytes: &[u8]) {
    let raw = budget::active_env();
    if raw.is_null() {
        return;
    }
    let marker = ();
    // SAFETY: `raw` is the env of the NIF call running on this thread (see
    // `budget::Activation`), alive for this whole function; the `Env` made here does not
    // escape it, and no other `Env` with this local lifetime exists.
    let env = unsafe { Env::new(&marker, raw) };
    let chunk = crate::marshal::binary_term(env, bytes);
    // A dead receiver is not the script's problem; the output is still captured.
    let _ = env.send(pid, (atoms::lua_print(), chunk).encode(env));
}
