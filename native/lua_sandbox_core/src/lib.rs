//! lua_sandbox_core: the rustler-free core of lua_sandbox.
//!
//! - [`heap`]: an allocator whose bookkeeping lives inside its arena, exact to the byte.
//! - [`slot`]: a Lua state in a fixed arena, restored from its pristine snapshot by a `memcpy`.
//! - [`written`]: which pages of an arena were written since the last look (userfaultfd, no signals).
//! - [`protect`]: the one discipline for raising (longjmp) that every caller of the C API follows.
//! - [`libs`]: the standard libraries a sandboxed state opens.
//! - [`seed`]: per-run randomness (`math.random`) for restored states.
//! - [`control`]: one run's accounting (counters, limits, abort, deadline, CPU clock).
//! - [`output`]: what `print` produces: captured, capped, streamed through a [`output::Sink`].
//! - [`scope`]: the one per-run guard: budget, output, handle store, traceback.
//! - [`budget`]: the work ticker glue, charges, kill checks and sticky aborts.
//! - `hooks`: the functions the C code in `csrc/` calls back into.
//! - `asan`: the arena's poisoning for the sanitizer build (`sanitize` feature).
//! - [`hardened`]: the budget-charging builtins and the sandbox's C libraries (`csrc/`).
//! - [`error`]: the closed list of ways a run fails.
//! - [`chunk`]: source checks, loading, compiling to bytecode.
//! - [`registry`], [`handle`], [`facts`]: registry keys, handle userdata, `os.clock`.
//! - [`sandbox`]: building a sandboxed state (libraries, C base functions, prelude) in a slot.
//! - [`pool`]: pristine slots leased per run, restored and kept idle when the lease ends.
//! - [`stack`]: a native stack segment big enough for Lua's own recursion limits.
//! - [`exec`]: the run coroutine: one way to assemble a run, set it up, step it, suspend it at
//!   a tool call and resume it with the reply.
//! - [`session`]: a state kept across calls, checkpointed and rolled back per call.
//! - [`family`]: the slot a session shares with its forks, which take turns in it.

mod asan;
pub mod budget;
pub mod chunk;
mod clock;
pub mod control;
pub mod error;
pub mod exec;
pub mod facts;
pub mod family;
pub mod handle;
pub mod hardened;
pub mod heap;
mod hooks;
pub mod libs;
pub mod marshal;
pub mod output;
pub mod pool;
pub mod protect;
pub mod registry;
pub mod sandbox;
pub mod scope;
pub mod seed;
pub mod session;
pub mod slot;
pub mod stack;
pub mod stretch;
pub mod written;

pub use protect::LuaFailure;
pub use slot::{Slot, SlotError};

/// The raw Lua C API of the linked (vendored, patched) Lua 5.4.
pub use mlua_sys as ffi;
