//! What `print` and `io.write` produce: captured, capped at `max_output`, optionally streamed.
//!
//! Every call counts toward `max_output`, not only every byte: an empty `io.write('')` costs
//! one, so a loop of empty writes ends at the limit like any other output. Streamed output is
//! coalesced: a chunk goes out at once when nothing was sent for [`STREAM_INTERVAL`] (so the
//! first line of a run arrives promptly), otherwise it waits until [`STREAM_BYTES`] are pending,
//! the run calls a tool, or the run ends. The receiver gets at most about
//! `max_output / STREAM_BYTES + run time / STREAM_INTERVAL + tool calls + 1` messages.

use std::time::{Duration, Instant};

use mlua::Lua;
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

/// The output of one run; kept in the state's app data while the run lives.
pub struct Output {
    pub buf: Vec<u8>,
    /// What counts toward `max_output`: the bytes, and one for each empty write.
    counted: usize,
    max: usize,
    mode: PrintMode,
    /// `buf[..streamed]` has been sent (stream mode).
    streamed: usize,
    last_send: Option<Instant>,
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

/// Appends one printed chunk. Over `max_output` the run is aborted (sticky, like every limit).
pub fn emit(lua: &Lua, bytes: &[u8]) -> mlua::Result<()> {
    let Some(mut out) = lua.app_data_mut::<Output>() else {
        return Ok(());
    };
    if let PrintMode::Discard = out.mode {
        return Ok(());
    }
    if let Err(why) = out.push(bytes) {
        drop(out);
        budget::trip(why);
        return Err(mlua::Error::RuntimeError(why.message().to_string()));
    }
    if let Some((pid, tag, chunk)) = out.due(Instant::now(), false) {
        send_chunk(pid, tag, chunk);
    }
    Ok(())
}

/// Sends whatever streamed output is pending (before a tool call and at the end of a run).
pub fn flush(lua: &Lua) {
    if let Some(mut out) = lua.app_data_mut::<Output>() {
        if let Some((pid, tag, chunk)) = out.due(Instant::now(), true) {
            send_chunk(pid, tag, chunk);
        }
    }
}

/// Sends `{:lua_print, chunk}` or `{:lua_print, tag, chunk}` while the script is running.
fn send_chunk(pid: &LocalPid, tag: Option<&[u8]>, bytes: &[u8]) {
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
