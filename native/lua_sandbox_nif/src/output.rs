//! What `print` and `io.write` produce: captured, capped at `max_output`, optionally streamed.

use mlua::Lua;
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

/// The output of one run; kept in the state's app data while the run lives.
pub struct Output {
    pub buf: Vec<u8>,
    max: usize,
    mode: PrintMode,
}

impl Output {
    pub fn new(max: usize, mode: PrintMode) -> Self {
        Output {
            buf: Vec::new(),
            max,
            mode,
        }
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
    if out.buf.len().saturating_add(bytes.len()) > out.max {
        drop(out);
        budget::trip(Abort::Output);
        return Err(mlua::Error::RuntimeError(
            Abort::Output.message().to_string(),
        ));
    }
    out.buf.extend_from_slice(bytes);
    if let PrintMode::Send(pid) = out.mode {
        send_chunk(&pid, bytes);
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
