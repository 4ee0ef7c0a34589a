//! The error answer, encoded in one place: every NIF that fails answers
//! `{:error, {kind, message, line, traceback, value}, output, stats}` ([`Failure`]), which
//! `LuaSandbox.Error.from_native/3` turns into the struct; and the error kinds as Elixir sees
//! them (`LuaSandbox.Error.kind`): an atom per variant of the core's `SandboxError`, named by
//! its `kind_name` (`StateCopies` is a `:memory_limit` with its own message).

use std::time::Duration;

use lua_sandbox_core::error::{line_of, SandboxError};
use lua_sandbox_core::exec::Stats;
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::term::{binary_term, binary_term_charged, stats_term};

/// A failed run, session call, session creation or compile, as the NIF answers it.
pub struct Failure<'a> {
    pub error: SandboxError,
    /// From `chunk_name:LINE: ...` at the start of the message.
    pub line: Option<u32>,
    pub traceback: Option<String>,
    /// A non-string error object (`error({code = 1})`), already converted.
    pub value: Option<Term<'a>>,
    /// What was printed before the failure.
    pub output: Vec<u8>,
    pub stats: Stats,
}

impl<'a> Failure<'a> {
    /// A failure before anything ran (bad input, a parse error, no slot): no output, and stats
    /// that only count the time spent.
    pub fn early(error: SandboxError, chunk_name: &str, elapsed: Duration) -> Failure<'a> {
        let line = line_of(&error.message(), chunk_name);
        Failure {
            error,
            line,
            traceback: None,
            value: None,
            output: Vec::new(),
            stats: Stats {
                duration_us: elapsed.as_micros() as u64,
                ..Stats::default()
            },
        }
    }
}

impl Encoder for Failure<'_> {
    fn encode<'b>(&self, env: Env<'b>) -> Term<'b> {
        let value = match self.value {
            Some(v) => v.encode(env),
            None => atoms::nil().encode(env),
        };
        (
            atoms::error(),
            (
                kind(env, &self.error),
                // Copied in pieces under the run's budget: a message can be as large as the
                // heap. Cut short if the run is aborted meanwhile (its caller is gone, or
                // its deadline passed while its error was answered).
                binary_term_charged(env, self.error.message().as_bytes())
                    .unwrap_or_else(|(_, prefix)| prefix),
                self.line,
                self.traceback.as_deref(),
                value,
            ),
            binary_term(env, &self.output),
            stats_term(env, &self.stats),
        )
            .encode(env)
    }
}

/// The atom naming an error's kind: the core's `SandboxError::kind_name`, the one list of the
/// kinds on the Rust side (the worker names them with it too); the atoms exist already
/// (`LuaSandbox.Error.kinds/0`), so this only looks one up.
pub fn kind(env: Env, error: &SandboxError) -> Atom {
    // A kind name is a short static ASCII word, which always makes a valid atom: the fallback
    // is never taken (and would still be an error answer, not a crash).
    Atom::from_str(env, error.kind_name()).unwrap_or_else(|_| atoms::error())
}
