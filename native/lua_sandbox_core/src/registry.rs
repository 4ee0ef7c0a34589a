//! The registry keys under which a sandboxed state keeps what its prelude returns.

use std::ffi::c_void;

/// What the prelude returns, kept in the registry under these light-userdata keys.
#[derive(Clone, Copy)]
pub enum Key {
    /// Identifies tool calls yielded up to the host.
    ToolMarker,
    /// Runs the chunk (and the optional `call:` function) inside the run coroutine.
    Runner,
    /// `configure(run_coroutine, max_source)`: per-run settings of the prelude.
    Configure,
    /// `make_tools(names)`.
    MakeTools,
    /// `make_require(loaders)`.
    MakeRequire,
    /// The metatable of handles (`handle.rs`).
    HandleMeta,
}

static KEYS: [u8; 6] = [0; 6];

impl Key {
    /// A unique address: the registry key of this value.
    pub fn ptr(self) -> *const c_void {
        (&KEYS[self as usize] as *const u8).cast()
    }
}
