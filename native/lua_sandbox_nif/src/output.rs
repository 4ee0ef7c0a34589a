//! What `print` and `io.write` produce: captured, capped at `max_output`, optionally streamed.
//!
//! Every call counts toward `max_output`, not only every byte: an empty `io.write('')` costs
//! one, so a loop of empty writes ends at the limit like any other output. Streamed output is
//! coalesced: a chunk goes out at once when nothing was sent for [`STREAM_INTERVAL`] (so the
//! first line of a run arrives promptly), otherwise it waits until [`STREAM_BYTES`] are pending,
//! the run calls a tool, or the run ends. The receiver gets at most about
//! `max_output / STREAM_BYTES + run time / STREAM_INTERVAL + tool calls + 1` messages.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr;
use std::time::{Duration, Instant};

use rustler::{Encoder, Env, LocalPid};

use crate::atoms;
use crate::budget::{self, Abort};

/// Pending streamed bytes that are sent without waiting for the interval.
pub const STREAM_BYTES: usize = 4096;

/// The shortest time between two streamed messages, unless [`STREAM_BYTES`] are pending.
pub const STREAM_INTERVAL: Duration = Duration::from_millis(100);

/// Where printed output goes, besides `Result.output` (all but `Discard` keep it there).
#[derive(Clone)]
pub enum PrintMode {
    Capture,
    /// `{:lua_print, chunk}`, or `{:lua_print, tag, chunk}` with the tag given as the external
    /// term format (a term cannot outlive the NIF call that received it; a run spans several).
    Send(LocalPid, Option<Vec<u8>>),
    Log,
    Discard,
}

/// A chunk due to be streamed: receiver, encoded tag, bytes.
type Chunk<'o> = (&'o LocalPid, Option<&'o [u8]>, &'o [u8]);

/// The output of one run; owned by the run, active on the thread that executes it.
pub struct Output {
    pub buf: Vec<u8>,
    /// What counts toward `max_output`: the bytes, and one for each empty write.
    counted: usize,
    max: usize,
    mode: PrintMode,
    /// `buf[..streamed]` has been sent (stream mode).
    streamed: usize,
    last_send: Option<Instant>,
    /// A first attempt sends nothing until it has succeeded (`hold`, `release`).
    held: bool,
}

impl Output {
    pub fn new(max: usize, mode: PrintMode) -> Self {
        Output {
            buf: Vec::new(),
            counted: 0,
            max,
            mode,
            streamed: 0,
            last_send: None,
            held: false,
        }
    }

    /// Holds streamed chunks back: a first attempt must not be seen before it succeeds.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Sends what was held back, from the NIF call's own env, and streams normally again.
    pub fn release(&mut self, env: Env) {
        self.held = false;
        if let Some((pid, tag, chunk)) = self.due(Instant::now(), true) {
            send_in(env, pid, tag, chunk);
        }
    }

    /// Everything captured, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.streamed = 0;
        std::mem::take(&mut self.buf)
    }

    /// Accepts one chunk; `Err` once `max_output` would be exceeded.
    fn push(&mut self, bytes: &[u8]) -> Result<(), Abort> {
        let cost = bytes.len().max(1);
        if self.counted.saturating_add(cost) > self.max {
            return Err(Abort::Output);
        }
        self.counted += cost;
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The bytes to stream now, if any: all pending ones when enough are pending, when the
    /// interval since the last message has passed, or when `force`d.
    fn due(&mut self, now: Instant, force: bool) -> Option<Chunk<'_>> {
        let PrintMode::Send(pid, tag) = &self.mode else {
            return None;
        };
        if self.held {
            return None;
        }
        let pending = self.buf.len().saturating_sub(self.streamed);
        let quiet = self
            .last_send
            .is_none_or(|t| now.duration_since(t) >= STREAM_INTERVAL);
        if pending == 0 || !(force || quiet || pending >= STREAM_BYTES) {
            return None;
        }
        let from = self.streamed;
        self.streamed = self.buf.len();
        self.last_send = Some(now);
        Some((pid, tag.as_deref(), &self.buf[from..]))
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

fn with_active<R>(f: impl FnOnce(&mut Output) -> R) -> Option<R> {
    let out = ACTIVE.with(|a| a.get());
    if out.is_null() {
        return None;
    }
    // SAFETY: `out` was set by an `Activation` holding the `&mut Output` for its lifetime, on
    // this thread; we are strictly inside it (called from Lua code run by that NIF call), and
    // no other reference to the Output is used meanwhile.
    Some(f(unsafe { &mut *out }))
}

/// Appends one printed chunk. Over `max_output` the run is aborted (sticky, like every limit).
pub fn emit(bytes: &[u8]) -> Result<(), Abort> {
    with_active(|out| {
        if let PrintMode::Discard = out.mode {
            return Ok(());
        }
        if let Err(why) = out.push(bytes) {
            budget::trip(why);
            return Err(why);
        }
        if let Some((pid, tag, chunk)) = out.due(Instant::now(), false) {
            send_chunk(pid, tag, chunk);
        }
        Ok(())
    })
    .unwrap_or(Ok(()))
}

/// Sends whatever streamed output is pending (before a tool call and at the end of a run).
pub fn flush(out: &mut Output, env: Env) {
    if let Some((pid, tag, chunk)) = out.due(Instant::now(), true) {
        send_in(env, pid, tag, chunk);
    }
}

/// Sends `{:lua_print, chunk}` or `{:lua_print, tag, chunk}` while the script is running.
fn send_chunk(pid: &LocalPid, tag: Option<&[u8]>, bytes: &[u8]) {
    let raw: *mut rustler::sys::ErlNifEnv = budget::active_env().cast();
    if raw.is_null() {
        return;
    }
    let marker = ();
    // SAFETY: `raw` is the env of the NIF call running on this thread (see
    // `budget::Activation`), alive for this whole function; the `Env` made here does not
    // escape it, and no other `Env` with this local lifetime exists.
    let env = unsafe { Env::new(&marker, raw) };
    send_in(env, pid, tag, bytes);
}

/// Sends one message from `env` (a process-bound env of the current NIF call).
fn send_in(env: Env, pid: &LocalPid, tag: Option<&[u8]>, bytes: &[u8]) {
    let chunk = crate::term::binary_term(env, bytes);
    let message = match tag.map(|t| env.binary_to_term(t)) {
        None => (atoms::lua_print(), chunk).encode(env),
        Some(Some((tag, _))) => (atoms::lua_print(), tag, chunk).encode(env),
        // The tag was encoded by LuaSandbox.Options; it always decodes.
        Some(None) => return,
    };
    // A dead receiver is not the script's problem; the output is still captured.
    let _ = env.send(pid, message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_writes_count_toward_the_limit() {
        let mut out = Output::new(3, PrintMode::Capture);
        assert!(out.push(b"").is_ok());
        assert!(out.push(b"ab").is_ok());
        assert_eq!(out.push(b""), Err(Abort::Output));
        assert_eq!(out.buf, b"ab");
    }

    #[test]
    fn capture_never_streams() {
        let mut out = Output::new(100, PrintMode::Capture);
        out.push(b"x").unwrap();
        assert!(out.due(Instant::now(), true).is_none());
    }
}
