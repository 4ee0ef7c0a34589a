//! Compiled chunks: parsed once, run many times, each time in a fresh state.
//!
//! Lua does not verify bytecode, so bytecode never leaves the NIF as a binary a caller could
//! edit: it lives in an opaque resource, and only bytecode the core's `chunk::compile_bytes`
//! produced is ever loaded.

use lua_sandbox_core::chunk::compile_bytes;
use std::time::Duration;

use rustler::{Encoder, Env, NifMap, ResourceArc, Term};

use crate::atoms;
use crate::error::Failure;

pub struct CompiledChunk {
    pub bytecode: Vec<u8>,
    pub name: String,
}

#[rustler::resource_impl]
impl rustler::Resource for CompiledChunk {}

#[derive(NifMap)]
pub struct CompileOpts {
    pub chunk_name: String,
    pub max_source: u64,
}

#[rustler::nif(schedule = "DirtyCpu")]
fn compile<'a>(env: Env<'a>, source: rustler::Binary<'a>, opts: CompileOpts) -> Term<'a> {
    let result = lua_sandbox_core::stack::with_big_stack(|| {
        compile_bytes(
            source.as_slice(),
            &opts.chunk_name,
            opts.max_source as usize,
            crate::caller::of(env),
        )
    });
    match result {
        Ok(bytecode) => {
            let chunk = ResourceArc::new(CompiledChunk {
                bytecode,
                name: opts.chunk_name,
            });
            (atoms::ok(), chunk).encode(env)
        }
        Err(e) => Failure::early(e, &opts.chunk_name, Duration::ZERO).encode(env),
    }
}

/// A compiled chunk's bytecode and name, for a worker of `isolation: :process`
/// (`LuaSandbox.Worker`), which loads it as the core's own bytecode, under that name, as
/// `run.rs` loads the resource's. The bytecode is a binary over the resource's bytes (no
/// copy). Reading it forges nothing: a binary never becomes a chunk again on this side
/// (`compile` is the only way to make one), and a worker is sent it by the BEAM only, straight
/// from this resource.
#[rustler::nif]
fn chunk_bytecode<'a>(env: Env<'a>, chunk: ResourceArc<CompiledChunk>) -> Term<'a> {
    let bytecode = chunk.make_binary(env, |c| c.bytecode.as_slice());
    (bytecode, chunk.name.as_str()).encode(env)
}
