//! The `print:` option on the BEAM side: which [`Print`] mode a run gets, and the sink that
//! streams its output as `{:lua_print, chunk}` / `{:lua_print, tag, chunk}` messages. When to
//! stream (coalescing, holding a first attempt back) is the core's `output.rs`.

use lua_sandbox_core::control::Caller;
use lua_sandbox_core::output::{Print, Sink};
use rustler::{Atom, Encoder, Env, LocalPid};

use crate::atoms;

/// Streams a run's output to `pid`, with the `{:send, pid, tag}` tag in the external term format
/// (a term cannot outlive the NIF call that received it; a run spans several).
struct Send {
    pid: LocalPid,
    tag: Option<Vec<u8>>,
}

impl Sink for Send {
    fn send(&mut self, caller: Caller, chunk: &[u8]) {
        let raw: *mut rustler::sys::ErlNifEnv = caller.env.cast();
        if raw.is_null() {
            return;
        }
        let marker = ();
        // SAFETY: `caller.env` is the env of the NIF call running on this thread (the core
        // hands the sink the caller of the current step, valid for this call); the `Env` made
        // here does not escape it, and no other `Env` with this local lifetime exists.
        let env = unsafe { Env::new(&marker, raw) };
        let bytes = crate::term::binary_term(env, chunk);
        let message = match self.tag.as_deref().map(|t| env.binary_to_term(t)) {
            None => (atoms::lua_print(), bytes).encode(env),
            Some(Some((tag, _))) => (atoms::lua_print(), tag, bytes).encode(env),
            // The tag was encoded by LuaSandbox.Options; it always decodes.
            Some(None) => return,
        };
        // A dead receiver is not the script's problem; the output is still captured.
        let _ = env.send(&self.pid, message);
    }
}

/// The print mode from the NIF's `print` atom, `print_pid` and encoded `print_tag`.
pub fn mode(print: Atom, print_pid: Option<LocalPid>, print_tag: Option<Vec<u8>>) -> Print {
    if print == atoms::send() {
        match print_pid {
            Some(pid) => Print::Stream(Box::new(Send {
                pid,
                tag: print_tag,
            })),
            None => Print::Capture,
        }
    } else if print == atoms::log() {
        Print::Log
    } else if print == atoms::discard() {
        Print::Discard
    } else {
        Print::Capture
    }
}
