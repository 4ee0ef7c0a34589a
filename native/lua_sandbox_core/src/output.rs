//! What `print` and `io.write` produce: captured, capped at `max_output`, optionally streamed
//! through a [`Sink`].
//!
//! Every call counts toward `max_output`, not only every byte: an empty `io.write('')` costs
//! one, so a loop of empty writes ends at the limit like any other output. Streamed output is
//! coalesced: a chunk goes out at once when nothing was sent for [`STREAM_INTERVAL`] (so the
//! first line of a run arrives promptly), otherwise it waits until [`STREAM_BYTES`] are pending,
//! the run calls a tool, or the run ends. The receiver gets at most about
//! `max_output / STREAM_BYTES + run time / STREAM_INTERVAL + tool calls + 1` messages.
//!
//! A write is appended whole or not at all, but a large one is copied, and the buffer grown,
//! [`PIECE`] bytes at a time with a budget check between two (issue 16): a 16 MiB write, or
//! the buffer's growth past several MiB, otherwise ran milliseconds with no check (fresh
//! pages are slow to touch). A write interrupted by an abort is taken back.

use std::time::{Duration, Instant};

use crate::control::{Abort, Caller};

/// Bytes copied between two budget checks: the VM's piece.
pub use crate::control::PIECE;

/// Pending streamed bytes that are sent without waiting for the interval.
pub const STREAM_BYTES: usize = 4096;

/// The shortest time between two streamed messages, unless [`STREAM_BYTES`] are pending.
pub const STREAM_INTERVAL: Duration = Duration::from_millis(100);

/// Where streamed output goes while the run goes: the embedder decides *how* (the NIF sends
/// `{:lua_print, ...}` messages), the core *when* (coalescing, holding a first attempt back).
pub trait Sink: Send {
    /// Delivers one chunk. `caller` is the caller of the run's current step (the NIF call's
    /// env), valid for this call only. Never raises into Lua; a failed delivery is the
    /// receiver's problem, the output is still captured.
    fn send(&mut self, caller: Caller, chunk: &[u8]);
}

/// Where printed output goes, besides `Result.output` (all but `Discard` keep it there).
pub enum Print {
    Capture,
    /// Also streamed, coalesced, to a sink.
    Stream(Box<dyn Sink>),
    /// Logged by the embedder when the run ends (captured like `Capture` here).
    Log,
    Discard,
}

/// The output of one run; owned by the run's scope.
pub struct Output {
    pub buf: Vec<u8>,
    /// What counts toward `max_output`: the bytes, and one for each empty write.
    counted: usize,
    max: usize,
    print: Print,
    /// `buf[..streamed]` has been sent (stream mode).
    streamed: usize,
    last_send: Option<Instant>,
    /// A first attempt sends nothing until it has succeeded (`hold`, `release`).
    held: bool,
}

impl Output {
    pub fn new(max: usize, print: Print) -> Self {
        Output {
            buf: Vec::new(),
            counted: 0,
            max,
            print,
            streamed: 0,
            last_send: None,
            held: false,
        }
    }

    /// Output that is dropped (work that prints nothing: a compile, a session's setup).
    pub fn discard() -> Self {
        Output::new(0, Print::Discard)
    }

    /// Holds streamed chunks back: a first attempt must not be seen before it succeeds.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Sends what was held back (`caller`: the current call) and streams normally again.
    pub fn release(&mut self, caller: Caller) {
        self.held = false;
        self.stream(caller, Instant::now(), true);
    }

    /// The end of a run: sends what was held back, and takes everything captured.
    pub fn finish(&mut self, caller: Caller) -> Vec<u8> {
        self.release(caller);
        self.take()
    }

    /// Everything captured, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.streamed = 0;
        std::mem::take(&mut self.buf)
    }

    /// Appends one printed chunk, and streams what is due. `Err(Abort::Output)` once
    /// `max_output` would be exceeded (the caller trips the abort), or the run's abort when it
    /// was aborted while a large chunk was copied; either way nothing is appended. `check` is
    /// the budget check made between two pieces of a large copy.
    pub fn emit(
        &mut self,
        bytes: &[u8],
        caller: Caller,
        check: impl FnMut() -> Result<(), Abort>,
    ) -> Result<(), Abort> {
        if let Print::Discard = self.print {
            return Ok(());
        }
        self.push(bytes, check)?;
        self.stream(caller, Instant::now(), false);
        Ok(())
    }

    /// Sends whatever streamed output is pending (before a tool call and at the end of a run).
    pub fn flush(&mut self, caller: Caller) {
        self.stream(caller, Instant::now(), true);
    }

    /// Accepts one chunk; `Err` once `max_output` would be exceeded, or when `check` fails
    /// between two pieces (then the chunk is taken back: nothing appended, nothing counted).
    fn push(
        &mut self,
        bytes: &[u8],
        mut check: impl FnMut() -> Result<(), Abort>,
    ) -> Result<(), Abort> {
        let cost = bytes.len().max(1);
        if self.counted.saturating_add(cost) > self.max {
            return Err(Abort::Output);
        }
        self.reserve(bytes.len(), &mut check)?;
        let old = self.buf.len();
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            if i > 0 {
                if let Err(why) = check() {
                    self.buf.truncate(old);
                    return Err(why);
                }
            }
            self.buf.extend_from_slice(piece);
        }
        self.counted += cost;
        Ok(())
    }

    /// Room for `n` more bytes. A buffer of more than a piece grows into a new block, its bytes
    /// copied in pieces with `check` between two (`Vec`'s own growth copies them in one go);
    /// when `check` fails the new block is dropped, the buffer unchanged.
    fn reserve(
        &mut self,
        n: usize,
        check: &mut impl FnMut() -> Result<(), Abort>,
    ) -> Result<(), Abort> {
        let len = self.buf.len();
        if self.buf.capacity() - len >= n {
            return Ok(());
        }
        if len <= PIECE {
            self.buf.reserve(n);
            return Ok(());
        }
        // Doubling, as `Vec` does, but never past what `max_output` lets the buffer hold.
        let want = len + n;
        let cap = want.max(self.buf.capacity().saturating_mul(2).min(self.max));
        let mut grown = Vec::with_capacity(cap);
        for (i, piece) in self.buf.chunks(PIECE).enumerate() {
            if i > 0 {
                check()?;
            }
            grown.extend_from_slice(piece);
        }
        self.buf = grown;
        Ok(())
    }

    /// Streams the pending bytes, if any are due: all of them when enough are pending, when
    /// the interval since the last message has passed, or when `force`d. Returns whether it
    /// sent.
    fn stream(&mut self, caller: Caller, now: Instant, force: bool) -> bool {
        let Print::Stream(sink) = &mut self.print else {
            return false;
        };
        if self.held {
            return false;
        }
        let pending = self.buf.len().saturating_sub(self.streamed);
        let quiet = self
            .last_send
            .is_none_or(|t| now.duration_since(t) >= STREAM_INTERVAL);
        if pending == 0 || !(force || quiet || pending >= STREAM_BYTES) {
            return false;
        }
        let from = self.streamed;
        self.streamed = self.buf.len();
        self.last_send = Some(now);
        sink.send(caller, &self.buf[from..]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_check() -> Result<(), Abort> {
        Ok(())
    }

    #[test]
    fn empty_writes_count_toward_the_limit() {
        let mut out = Output::new(3, Print::Capture);
        assert!(out.push(b"", no_check).is_ok());
        assert!(out.push(b"ab", no_check).is_ok());
        assert_eq!(out.push(b"", no_check), Err(Abort::Output));
        assert_eq!(out.buf, b"ab");
    }

    #[test]
    fn large_writes_are_copied_in_pieces_and_taken_back_when_aborted() {
        let mut out = Output::new(usize::MAX, Print::Capture);
        let mut checks = 0;
        let big = vec![b'x'; 5 * PIECE / 2];
        out.push(&big, || {
            checks += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(checks, 2, "three pieces, two checks between");
        // the buffer's growth (its 2.5 pieces copied in pieces) and the write
        checks = 0;
        out.push(&big, || {
            checks += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(checks, 4);
        assert_eq!(out.buf.len(), 5 * PIECE);
        assert!(out.buf.iter().all(|&b| b == b'x'));
        // an abort at any check: nothing appended, nothing counted. The next write grows the
        // buffer first (5 pieces: checks 1-4; aborted there, it is not grown), then copies (3
        // pieces: 2 checks); once grown, only the copy's checks are left.
        for k in [1, 2, 3, 4, 5, 1, 2] {
            let (len, counted) = (out.buf.len(), out.counted);
            let mut left = k;
            let r = out.push(&big, || {
                left -= 1;
                if left == 0 {
                    Err(Abort::Killed)
                } else {
                    Ok(())
                }
            });
            assert_eq!(r, Err(Abort::Killed), "aborted at check {k}");
            assert_eq!((out.buf.len(), out.counted), (len, counted));
        }
        out.push(b"y", no_check).unwrap();
        assert_eq!(out.buf.len(), 5 * PIECE + 1);
    }

    #[test]
    fn capture_never_streams() {
        let mut out = Output::new(100, Print::Capture);
        out.push(b"x", no_check).unwrap();
        assert!(!out.stream(Caller::none(), Instant::now(), true));
    }
}
