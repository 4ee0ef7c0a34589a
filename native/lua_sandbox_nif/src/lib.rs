//! lua_sandbox_nif: sandboxed Lua 5.4 for the BEAM. See the README for the security model.

mod atoms;
mod budget;
mod chunk;
mod error;
mod hardened;
mod marshal;
mod output;
mod run;
mod sandbox;
mod stack;
#[cfg(test)]
mod test_stubs;

rustler::init!("Elixir.LuaSandbox.Native");
