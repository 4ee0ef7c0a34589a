//! Small term builders shared by the modules that answer Elixir (no Lua here).

use lua_sandbox_core::exec::Stats;
use rustler::{Encoder, Env, NewBinary, Term};

use crate::atoms;

/// `bytes` as a fresh Elixir binary.
pub fn binary_term<'e>(env: Env<'e>, bytes: &[u8]) -> Term<'e> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    let b: rustler::Binary = bin.into();
    b.encode(env)
}

/// `%{instructions:, memory_peak:, duration_us:, tool_calls:, cpu_us:, denied:}`, `denied`
/// being `%{name => count}`.
pub fn stats_term<'e>(env: Env<'e>, stats: &Stats) -> Term<'e> {
    let names: Vec<Term> = stats.denied.iter().map(|(n, _)| n.encode(env)).collect();
    let counts: Vec<Term> = stats.denied.iter().map(|(_, c)| c.encode(env)).collect();
    // Distinct names (Control::note_denied): building the map cannot fail.
    let denied = Term::map_from_arrays(env, &names, &counts).unwrap_or_else(|_| Term::map_new(env));
    let keys = [
        atoms::instructions().encode(env),
        atoms::memory_peak().encode(env),
        atoms::duration_us().encode(env),
        atoms::tool_calls().encode(env),
        atoms::cpu_us().encode(env),
        atoms::denied().encode(env),
    ];
    let [a, b, c, d, e] = [
        stats.instructions,
        stats.memory_peak,
        stats.duration_us,
        stats.tool_calls,
        stats.cpu_us,
    ]
    .map(|v| v.encode(env));
    let values = [a, b, c, d, e, denied];
    // Six distinct keys: building the map cannot fail.
    Term::map_from_arrays(env, &keys, &values).unwrap_or_else(|_| atoms::nil().encode(env))
}
