//! lua_sandbox_core: the rustler-free core of lua_sandbox.
//!
//! - [`heap`]: an allocator whose bookkeeping lives inside its arena, exact to the byte.
//! - [`slot`]: a Lua state in a fixed arena, restored from its pristine snapshot by a `memcpy`.
//! - [`written`]: which pages of an arena were written since the last look (userfaultfd, no signals).
//! - [`protect`]: the one discipline for raising (longjmp) that every caller of the C API follows.
//! - [`libs`]: the standard libraries a sandboxed state opens.
//! - [`seed`]: per-run randomness (`math.random`) for restored states.
//! - [`budget`]: the run's budget, the work ticker glue, kill checks and sticky aborts.
//! - [`hardened`]: the budget-charging builtins and the sandbox's C libraries (`csrc/`).

pub mod budget;
mod clock;
pub mod hardened;
pub mod heap;
pub mod libs;
pub mod protect;
pub mod seed;
pub mod slot;
#[cfg(feature = "stretch")]
mod stretch;
pub mod written;

pub use protect::LuaFailure;
pub use slot::{Slot, SlotError};

/// The raw Lua C API of the linked (vendored, patched) Lua 5.4.
pub use mlua_sys as ffi;
