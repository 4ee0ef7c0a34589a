//! The error answer, encoded in one place: every NIF that fails answers
//! `{:error, {kind, message, line, traceback, value}, output, stats}` ([`Failure`]), which
//! `LuaSandbox.Error.from_native/3` turns into the struct; and the error kinds as Elixir sees
//! them (`LuaSandbox.Error.kind`): one atom per variant of the core's `SandboxError`.

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
                self.error.kind(),
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

/// The atom naming an error's kind.
pub trait Kind {
    fn kind(&self) -> Atom;
}

impl Kind for SandboxError {
    fn kind(&self) -> Atom {
        match self {
            SandboxError::Syntax(_) => atoms::syntax(),
            SandboxError::Runtime(_) => atoms::runtime(),
            SandboxError::InstructionLimit => atoms::instruction_limit(),
            SandboxError::MemoryLimit => atoms::memory_limit(),
            SandboxError::OutputLimit => atoms::output_limit(),
            SandboxError::DepthLimit(_) => atoms::depth_limit(),
            SandboxError::SizeLimit(_) => atoms::size_limit(),
            SandboxError::Cycle(_) => atoms::cycle(),
            SandboxError::UnsupportedValue(_) => atoms::unsupported_value(),
            SandboxError::InvalidInput(_) => atoms::invalid_input(),
            SandboxError::ToolLimit => atoms::tool_limit(),
            SandboxError::Killed => atoms::killed(),
            SandboxError::Timeout => atoms::timeout(),
        }
    }
}
