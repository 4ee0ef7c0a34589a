//! Small term builders shared by the modules that answer Elixir (no Lua here).

use rustler::{Encoder, Env, NewBinary, Term};

/// `bytes` as a fresh Elixir binary.
pub fn binary_term<'e>(env: Env<'e>, bytes: &[u8]) -> Term<'e> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    let b: rustler::Binary = bin.into();
    b.encode(env)
}
