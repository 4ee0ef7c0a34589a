//! The closed list of ways a run can fail (`LuaSandbox.Error.kind` in Elixir; the NIF's
//! `error.rs` names each kind with its atom).

use std::borrow::Cow;

use crate::control::Abort;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The source (or a module) does not parse.
    #[error("{0}")]
    Syntax(String),
    /// The script raised an error, or Lua did (e.g. `attempt to index a nil value`).
    #[error("{0}")]
    Runtime(String),
    /// `max_instructions` used up.
    #[error("instruction limit exceeded")]
    InstructionLimit,
    /// `max_memory` reached.
    #[error("memory limit exceeded")]
    MemoryLimit,
    /// A host-side copy of a session's state (a fork's image, a checkpoint) could not get its
    /// memory (`slot::CopyRefused`): a `memory_limit` too, with a message saying which.
    #[error("{0}")]
    StateCopies(String),
    /// `max_output` exceeded.
    #[error("output limit exceeded")]
    OutputLimit,
    /// A value nested deeper than `max_depth`, either way across the boundary.
    #[error("{0}")]
    DepthLimit(String),
    /// A result larger than `max_result_bytes`.
    #[error("{0}")]
    SizeLimit(String),
    /// A table that contains itself.
    #[error("{0}")]
    Cycle(String),
    /// A function, coroutine or userdata where a plain value is needed.
    #[error("{0}")]
    UnsupportedValue(String),
    /// Input that cannot become Lua: a bad term, oversized source, a forged chunk.
    #[error("{0}")]
    InvalidInput(String),
    /// `max_tool_calls` exceeded.
    #[error("tool call limit exceeded")]
    ToolLimit,
    /// The calling process died; nobody will read this.
    #[error("run killed")]
    Killed,
    /// The run's `timeout:` passed (checked inside the run, like the kill).
    #[error("run exceeded its timeout")]
    Timeout,
}

impl SandboxError {
    /// The kind's name, as Elixir's atom spells it (`LuaSandbox.Error.kind`): what a worker
    /// process sends, where the NIF encodes its own atom (`error.rs` there).
    pub fn kind_name(&self) -> &'static str {
        match self {
            SandboxError::Syntax(_) => "syntax",
            SandboxError::Runtime(_) => "runtime",
            SandboxError::InstructionLimit => "instruction_limit",
            SandboxError::MemoryLimit | SandboxError::StateCopies(_) => "memory_limit",
            SandboxError::OutputLimit => "output_limit",
            SandboxError::DepthLimit(_) => "depth_limit",
            SandboxError::SizeLimit(_) => "size_limit",
            SandboxError::Cycle(_) => "cycle",
            SandboxError::UnsupportedValue(_) => "unsupported_value",
            SandboxError::InvalidInput(_) => "invalid_input",
            SandboxError::ToolLimit => "tool_limit",
            SandboxError::Killed => "killed",
            SandboxError::Timeout => "timeout",
        }
    }
}

impl From<Abort> for SandboxError {
    fn from(why: Abort) -> Self {
        match why {
            Abort::Instructions => SandboxError::InstructionLimit,
            Abort::Memory => SandboxError::MemoryLimit,
            Abort::Output => SandboxError::OutputLimit,
            Abort::Killed => SandboxError::Killed,
            Abort::ToolCalls => SandboxError::ToolLimit,
            Abort::Timeout => SandboxError::Timeout,
        }
    }
}

impl From<crate::slot::CopyRefused> for SandboxError {
    fn from(refused: crate::slot::CopyRefused) -> Self {
        SandboxError::StateCopies(refused.to_string())
    }
}

impl SandboxError {
    /// The message (the `Display` text) without copying it when the error carries one: a
    /// script's error message can be as large as its heap.
    pub fn message(&self) -> Cow<'_, str> {
        use SandboxError::*;
        match self {
            Syntax(m) | Runtime(m) | StateCopies(m) | DepthLimit(m) | SizeLimit(m) | Cycle(m)
            | UnsupportedValue(m) | InvalidInput(m) => Cow::Borrowed(m),
            other => Cow::Owned(other.to_string()),
        }
    }
}

impl SandboxError {
    /// The message, moved out when the error carries one (no copy: see [`Self::message`]).
    pub fn into_message(self) -> String {
        use SandboxError::*;
        match self {
            Syntax(m) | Runtime(m) | StateCopies(m) | DepthLimit(m) | SizeLimit(m) | Cycle(m)
            | UnsupportedValue(m) | InvalidInput(m) => m,
            other => other.to_string(),
        }
    }
}

/// The line of `chunk_name:LINE: message`, when the message starts that way. Reads only the
/// message's first bytes.
pub fn line_of(message: &str, chunk_name: &str) -> Option<u32> {
    let rest = message.strip_prefix(chunk_name)?.strip_prefix(':')?;
    // A line number has at most 10 digits: the colon after it is among the first 11 bytes.
    let end = rest.bytes().take(11).position(|b| b == b':')?;
    rest[..end].parse().ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_parsed_from_the_chunk_prefix() {
        assert_eq!(line_of("script:3: boom", "script"), Some(3));
        assert_eq!(line_of("other:3: boom", "script"), None);
        assert_eq!(line_of("script: boom", "script"), None);
        assert_eq!(line_of("script:x: boom", "script"), None);
        assert_eq!(
            line_of("script:4000000000: boom", "script"),
            Some(4_000_000_000)
        );
        assert_eq!(line_of("script:12345678901: boom", "script"), None);
    }
}
