//! lua_sandbox_nif: sandboxed Lua 5.4 for the BEAM. See the README for the security model.

mod atoms;
mod caller;
mod chunk;
mod error;
mod facts;
mod family;
mod handles;
mod marshal;
mod output;
mod registry;
mod run;
mod sandbox;
mod session;
mod slots;
mod stack;
mod term;
#[cfg(test)]
mod test_stubs;

// The budget and the hardened builtins live in the rustler-free core; `crate::budget` and
// `crate::hardened` name them here.
pub(crate) use lua_sandbox_core::{budget, hardened};

rustler::init!("Elixir.LuaSandbox.Native");

// Lua allocates many small objects when a state is built and closed; mimalloc makes that
// markedly cheaper than glibc malloc (measured with the sandbox probe, see bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
