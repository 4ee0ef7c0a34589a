//! The error kinds as Elixir sees them (`LuaSandbox.Error.kind`): one atom per variant of the
//! core's `SandboxError`.

use lua_sandbox_core::error::SandboxError;
use rustler::Atom;

use crate::atoms;

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
