//! lua_sandbox_nif: sandboxed Lua 5.4 for the BEAM. See the README for the security model.

mod atoms;
mod caller;
mod chunk;
mod error;
mod handles;
mod marshal;
mod print;
mod run;
mod session;
mod term;

rustler::init!("Elixir.LuaSandbox.Native");

// Lua allocates many small objects when a state is built and closed; mimalloc makes that
// markedly cheaper than glibc malloc (measured with the sandbox probe, see bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
