//! Small term builders shared by the modules that answer Elixir (no Lua here).

use lua_sandbox_core::budget::{self, Abort};
use lua_sandbox_core::exec::Stats;
use rustler::{Encoder, Env, NewBinary, OwnedBinary, Term};

use crate::atoms;

/// `bytes` as a fresh Elixir binary.
pub fn binary_term<'e>(env: Env<'e>, bytes: &[u8]) -> Term<'e> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    let b: rustler::Binary = bin.into();
    b.encode(env)
}

/// Bytes copied into a binary between two charges by [`binary_term_charged`]: the VM's piece.
pub use lua_sandbox_core::budget::PIECE;

/// `bytes` as a fresh Elixir binary, copied in pieces of [`PIECE`] bytes with the VM's units
/// per byte (`budget::byte_units`) charged to the active run after each piece, so that
/// copying a string as large as the heap is stopped by a kill, the deadline or the budget
/// within one piece. On such an abort the binary holds only the pieces copied so far: `Err`
/// with the reason and that prefix (never uninitialized bytes).
pub fn binary_term_charged<'e>(env: Env<'e>, bytes: &[u8]) -> Result<Term<'e>, (Abort, Term<'e>)> {
    // Panics if the BEAM cannot allocate it, as `NewBinary` does.
    let mut bin = OwnedBinary::new(bytes.len());
    let mut copied = 0;
    let mut abort = None;
    for (dst, src) in bin
        .as_mut_slice()
        .chunks_mut(PIECE)
        .zip(bytes.chunks(PIECE))
    {
        dst.copy_from_slice(src);
        copied += src.len();
        if let Err(why) = budget::charge_and_check(budget::byte_units(src.len())) {
            abort = Some(why);
            break;
        }
    }
    if copied < bytes.len() {
        // Only a prefix is initialized: shrink the binary to it.
        bin.realloc_or_copy(copied);
    }
    let term = bin.release(env).encode(env);
    match abort {
        Some(why) if copied < bytes.len() => Err((why, term)),
        _ => Ok(term),
    }
}

/// Cells of a list consed between two checks by [`list_checked`]: 32 KiB of fresh heap
/// (8 192 cells ran 1.1 ms on the slow VM of issue 16, ~0.14 µs a cell).
pub const LIST_PIECE: usize = 2048;

/// `items` as a list. A long one is built from its end a cell at a time with a check (the
/// kill, the deadline, the budget) every [`LIST_PIECE`] cells: as one `enif_make_list` of
/// 10^5 terms it was 1.5 ms with no check (the process heap it fills is fresh memory, faulted
/// in as it goes; issue 16). The cells are not charged again: each value was paid when it
/// was read. On an abort, `Err` with its reason (the partial list is dropped).
pub fn list_checked<'e>(env: Env<'e>, items: &[Term<'e>]) -> Result<Term<'e>, Abort> {
    if items.len() <= LIST_PIECE {
        return Ok(items.encode(env));
    }
    let mut list = Term::list_new_empty(env);
    for (i, item) in items.iter().rev().enumerate() {
        if i > 0 && i % LIST_PIECE == 0 {
            budget::charge_and_check(0)?;
        }
        list = list.list_prepend(*item);
    }
    Ok(list)
}

/// Pairs of a map built in one `enif_make_map_from_arrays` call by [`map_checked`]: 0.41-0.48
/// ms a piece in the stretch build on a loaded 2-core VM (each piece is a `stretch::mark`).
/// 1 024 would halve that, but the caller's merge of 10^5 keys took 34 ms instead of 24.
pub const MAP_PIECE: usize = 2048;

/// `keys` and `values` as a map; `Err(None)` when two keys are the same term. A larger one
/// than [`MAP_PIECE`] pairs is not one term: it is built as maps of [`MAP_PIECE`] pairs each,
/// with a check (the kill, the deadline, the budget) between two, and leaves the NIF as
/// `{:"$lua_sandbox_pieces", [piece, ...]}`, which `LuaSandbox.Pieces` merges in the caller
/// (`:maps.merge/2`, which yields like any BEAM code). As one `enif_make_map_from_arrays` a map
/// of 2·10^5 keys was ~30 ms with no check (47 ms in the stretch build), so a kill could not
/// stop it (issue 16). `wrap` says the values hold tagged terms themselves: each piece is then
/// `{:"$lua_sandbox_walk", piece}` so the caller looks into it. Keys that are the same term in
/// two pieces are not noticed (Lua's keys are distinct terms: `LuaSandbox.Pieces`). The pairs
/// are not charged again: each value was paid when it was read. On an abort, `Err(Some(why))`.
pub fn map_checked<'e>(
    env: Env<'e>,
    keys: &[Term<'e>],
    values: &[Term<'e>],
    wrap: bool,
) -> Result<Term<'e>, Option<Abort>> {
    if keys.len() <= MAP_PIECE {
        return Term::map_from_arrays(env, keys, values).map_err(|_| None);
    }
    let walk = atoms::tag_walk().encode(env);
    let mut pieces = Vec::with_capacity(keys.len().div_ceil(MAP_PIECE));
    for (i, (k, v)) in keys
        .chunks(MAP_PIECE)
        .zip(values.chunks(MAP_PIECE))
        .enumerate()
    {
        if i > 0 {
            budget::charge_and_check(0).map_err(Some)?;
        }
        let piece = Term::map_from_arrays(env, k, v).map_err(|_| None)?;
        lua_sandbox_core::stretch::mark();
        pieces.push(if wrap {
            rustler::types::tuple::make_tuple(env, &[walk, piece])
        } else {
            piece
        });
    }
    budget::charge_and_check(0).map_err(Some)?;
    Ok((atoms::tag_pieces(), pieces).encode(env))
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
