//! Chunks: source text checked and loaded, or compiled once to bytecode (`dump`) and loaded
//! many times.
//!
//! Lua does not verify bytecode, so only bytecode this module produced is ever loaded: the
//! embedder keeps it opaque (the NIF in a resource) and marks it `binary` only then.

use std::ffi::{c_int, c_void, CString};

use crate::control::{Caller, Control};
use crate::error::SandboxError;
use crate::scope::Scope;
use crate::{budget, ffi, protect};

/// The checks every piece of source text passes before Lua sees it: within `max_source`
/// (parsing is not covered by the instruction budget), and not bytecode (Lua does not verify
/// it). `what` names the source in messages (`source`, `module 'x'`).
pub fn check_source(source: &[u8], max_source: usize, what: &str) -> Result<(), SandboxError> {
    if source.len() > max_source {
        return Err(SandboxError::InvalidInput(format!(
            "{what} is {} bytes, over max_source ({max_source})",
            source.len()
        )));
    }
    if source.first() == Some(&0x1b) {
        return Err(SandboxError::InvalidInput(format!(
            "{what}: binary chunks are not accepted; pass Lua source text"
        )));
    }
    Ok(())
}

/// The work a compile may do: the default `max_instructions` (at most a few seconds of CPU).
const COMPILE_BUDGET: u64 = 100_000_000;

/// Parses `source` into bytecode, with the same checks a run applies to source text, for
/// `caller` (its death stops the parse).
pub fn compile_bytes(
    source: &[u8],
    name: &str,
    max_source: usize,
    caller: Caller,
) -> Result<Vec<u8>, SandboxError> {
    check_source(source, max_source, "source")?;
    // Parsing is charged to the work countdown, so a kill of the caller stops it within a
    // tick, and it is bounded by the default instruction budget (the parser is otherwise
    // minutes of uninterruptible CPU on some 1 MB sources, e.g. `a or a or ...`).
    let scope = Scope::budget(Control::new(COMPILE_BUDGET));
    let _active = scope.activate(caller);
    dump(source, name, false, Some(&scope.control))
}

/// Parses Lua source text in a throwaway state (no libraries, no code run) and returns its
/// bytecode, with or without debug information; under `control`'s budget and kill check
/// when given (its activation must be current).
pub fn dump(
    source: &[u8],
    name: &str,
    strip: bool,
    control: Option<&Control>,
) -> Result<Vec<u8>, SandboxError> {
    let code = Code::new(source, name, false)?;
    // SAFETY: a private state, used on this thread and closed before returning. Installing
    // the ticker only stores fields of the global state, and nothing reaches the state
    // through `control` after the close (only `abort()` is read); `Code::load` does not raise (the
    // ticker's abort surfaces as its status); `lua_dump` only calls `write` (which never
    // raises or unwinds: extending a Vec can only abort on OOM); `lua_close` runs no
    // finalizers (nothing ran).
    unsafe {
        let l = ffi::luaL_newstate();
        if l.is_null() {
            return Err(SandboxError::MemoryLimit);
        }
        if let Some(control) = control {
            budget::install_ticker(l, control);
        }
        let loaded = code.load(l);
        let mut out: Vec<u8> = Vec::new();
        if loaded.is_ok() {
            ffi::lua_dump(
                l,
                write,
                (&mut out as *mut Vec<u8>).cast(),
                c_int::from(strip),
            );
        }
        ffi::lua_close(l);
        if let Some(why) = control.and_then(|c| c.abort()) {
            return Err(why.into());
        }
        loaded.map(|()| out)
    }
}

/// `lua_Writer` appending to the `Vec<u8>` at `ud`.
unsafe extern "C-unwind" fn write(
    _l: *mut ffi::lua_State,
    p: *const c_void,
    sz: usize,
    ud: *mut c_void,
) -> c_int {
    // SAFETY: `ud` is the Vec `dump` passed, alive for the call; `p` points at `sz` bytes.
    unsafe {
        let out = &mut *ud.cast::<Vec<u8>>();
        out.extend_from_slice(std::slice::from_raw_parts(p.cast::<u8>(), sz));
    }
    0
}

/// A chunk to load: its bytes, its `=name` and whether it is text or our own bytecode.
pub struct Code<'a> {
    bytes: &'a [u8],
    name: CString,
    binary: bool,
}

impl<'a> Code<'a> {
    pub fn new(bytes: &'a [u8], name: &str, binary: bool) -> Result<Code<'a>, SandboxError> {
        let name = CString::new(format!("={name}")).map_err(|_| {
            SandboxError::InvalidInput(format!("chunk name {name:?} contains a NUL byte"))
        })?;
        Ok(Code {
            bytes,
            name,
            binary,
        })
    }

    /// Loads the chunk onto `l`'s stack (a function on success, nothing on failure).
    ///
    /// # Safety
    /// `l` must be a non-running state or thread with a free stack slot.
    pub unsafe fn load(&self, l: *mut ffi::lua_State) -> Result<(), SandboxError> {
        let mode = if self.binary { c"b" } else { c"t" };
        // SAFETY: `lua_load` runs the parser under its own protected call and reports errors
        // as a status with the message on the stack; it does not raise.
        unsafe {
            let status = ffi::luaL_loadbufferx(
                l,
                self.bytes.as_ptr().cast(),
                self.bytes.len(),
                self.name.as_ptr(),
                mode.as_ptr(),
            );
            if status == ffi::LUA_OK {
                return Ok(());
            }
            let message = protect::describe(l, -1);
            ffi::lua_pop(l, 1);
            Err(match status {
                ffi::LUA_ERRSYNTAX => SandboxError::Syntax(message),
                ffi::LUA_ERRMEM => SandboxError::MemoryLimit,
                // The parser's own nesting limit surfaces as a runtime "C stack overflow", but
                // it is a property of the source.
                _ => {
                    let first = message.lines().next().unwrap_or_default();
                    SandboxError::Syntax(format!("{first} (source nested too deeply)"))
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_and_rejects() {
        assert!(compile_bytes(b"return 1", "script", 100, Caller::none()).is_ok());
        assert!(matches!(
            compile_bytes(b"return +", "script", 100, Caller::none()),
            Err(SandboxError::Syntax(m)) if m.starts_with("script:1:")
        ));
        assert!(matches!(
            compile_bytes(b"\x1bLua", "script", 100, Caller::none()),
            Err(SandboxError::InvalidInput(_))
        ));
        assert!(matches!(
            compile_bytes(b"return 1", "script", 3, Caller::none()),
            Err(SandboxError::InvalidInput(_))
        ));
    }
}
