//! Lua -> Elixir: the rustler terms the core's reading walk makes
//! (`lua_sandbox_core::marshal::read_values`: bounded in depth and bytes, cycles detected).
//!
//! Tags: a map of more than `MAP_PIECE` keys leaves the NIF in pieces
//! (`{:"$lua_sandbox_pieces", [map, ...]}`, [`map_checked`]), which `LuaSandbox.Pieces`
//! merges in the caller. So that it finds them without walking the whole result, every table
//! holding a tagged term somewhere below is itself tagged `{:"$lua_sandbox_walk", list_or_map}`
//! (so are a read's values, [`Values::tagged`]): the caller looks only into those. A Lua table
//! becomes a list or a map, never a tuple; a tuple can only be a handle's term (any Elixir
//! term), which the caller never looks into, except one shaped like a tag at the place of a
//! value: that one is escaped as `{:"$lua_sandbox_term", term}`, so every result round-trips
//! exactly.

use super::*;
use lua_sandbox_core::handle::NotOurs;
use lua_sandbox_core::marshal::{push_checked, read_value, read_values, Sink};
use rustler::types::tuple::{get_tuple, make_tuple};

use crate::term::{map_checked, MAP_PIECE};

/// The values of a read: `tagged` when any holds a tag (module doc), which the list of them
/// then says too ([`Values::list`]).
pub struct Values<'e> {
    pub terms: Vec<Term<'e>>,
    pub tagged: bool,
}

impl<'e> Values<'e> {
    /// The values as a list (built in checked pieces: `list_checked`), tagged
    /// `{:"$lua_sandbox_walk", list}` when a value holds a tag.
    pub fn list(&self, env: Env<'e>) -> Result<Term<'e>, lua_sandbox_core::budget::Abort> {
        let list = list_checked(env, &self.terms)?;
        Ok(if self.tagged {
            make_tuple(env, &[atoms::tag_walk().encode(env), list])
        } else {
            list
        })
    }
}

/// Converts the `n` values from absolute index `first` of `l`'s stack to terms; paths in
/// errors look like `root[i]...` once the caller roots the failure (`Fail::into_error`, or
/// `Fail::into_args_error` for a tool call's arguments). The stack is left as it was.
///
/// # Safety
/// `first..first + n` must be valid indices of `l`, which must not be running.
pub unsafe fn to_terms<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
) -> Result<Values<'e>, Fail> {
    let mut sink = Terms::new(env);
    // SAFETY: forwarded contract.
    let terms = unsafe { read_values(&mut sink, l, first, n, bounds) }?;
    Ok(Values {
        terms,
        tagged: sink.tags > 0,
    })
}

/// Converts the value at absolute index `idx` with the path rooted at `root` itself (for
/// error objects). The stack is left as it was.
///
/// # Safety
/// As for [`to_terms`].
pub unsafe fn to_term<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    idx: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Term<'e>, SandboxError> {
    // SAFETY: forwarded contract.
    unsafe { read_value(&mut Terms::new(env), l, idx, bounds) }.map_err(|f| f.into_error(root))
}

/// The terms of a read.
struct Terms<'e> {
    env: Env<'e>,
    /// Scratch stacks shared by every table being read: each table works above the length
    /// it found (its [`Sink::Table`]) and truncates back, so tables cost no allocation of
    /// their own.
    keys: Vec<Term<'e>>,
    values: Vec<Term<'e>>,
    indices: Vec<i64>,
    /// Tagged terms made so far (module doc): a table during whose read this grew holds one.
    tags: usize,
}

impl<'e> Terms<'e> {
    fn new(env: Env<'e>) -> Self {
        Terms {
            env,
            keys: Vec::new(),
            values: Vec::new(),
            indices: Vec::new(),
            tags: 0,
        }
    }

    /// Drops a table's entries from the scratch stacks.
    fn truncate(&mut self, (base, ibase, _): (usize, usize, usize)) {
        self.keys.truncate(base);
        self.values.truncate(base);
        self.indices.truncate(ibase);
    }

    /// `{tag, term}`, counted.
    fn tag(&mut self, tag: rustler::Atom, term: Term<'e>) -> Term<'e> {
        self.tags += 1;
        make_tuple(self.env, &[tag.encode(self.env), term])
    }

    /// A table's term, tagged to be walked when one of its values holds a tag.
    fn walked(&mut self, (_, _, tags): (usize, usize, usize), term: Term<'e>) -> Term<'e> {
        if self.tags > tags {
            self.tag(atoms::tag_walk(), term)
        } else {
            term
        }
    }
}

/// Whether `term` is shaped like one of the tags (a pair whose first element is one).
fn tag_shaped(term: Term) -> bool {
    match get_tuple(term) {
        Ok(items) if items.len() == 2 => {
            [atoms::tag_pieces(), atoms::tag_walk(), atoms::tag_term()]
                .iter()
                .any(|tag| items[0] == tag.to_term(term.get_env()))
        }
        _ => false,
    }
}

impl<'e> Sink for Terms<'e> {
    type Value = Term<'e>;
    /// Where the table's entries start in `values` (and `keys`) and in `indices`,
    /// and the count of tags made before it.
    type Table = (usize, usize, usize);

    fn nil(&mut self) -> Term<'e> {
        atoms::nil().encode(self.env)
    }

    fn boolean(&mut self, b: bool) -> Term<'e> {
        b.encode(self.env)
    }

    fn integer(&mut self, i: i64) -> Term<'e> {
        i.encode(self.env)
    }

    fn float(&mut self, f: f64) -> Term<'e> {
        let env = self.env;
        if f.is_nan() {
            atoms::nan().encode(env)
        } else if f == f64::INFINITY {
            atoms::infinity().encode(env)
        } else if f == f64::NEG_INFINITY {
            atoms::neg_infinity().encode(env)
        } else {
            f.encode(env)
        }
    }

    /// A string as a binary. One larger than a piece is paid per piece as it is copied
    /// (`binary_term_charged`), so a kill stops a copy as large as the heap within a piece.
    fn string(&mut self, tally: &mut Tally, bytes: &[u8]) -> Result<Term<'e>, Fail> {
        if bytes.len() <= PIECE {
            tally.charge(bytes.len() as u64)?;
            return Ok(binary_term(self.env, bytes));
        }
        tally.charge(0)?;
        tally.spend(bytes.len() as u64)?;
        tally.meter.flush()?;
        binary_term_charged(self.env, bytes).map_err(|(why, _)| Fail::new(FailKind::Abort(why)))
    }

    unsafe fn handle(&mut self, l: *mut ffi::lua_State, idx: c_int) -> Result<Term<'e>, NotOurs> {
        // SAFETY: the trait's contract.
        let term = unsafe { crate::handles::read(self.env, l, idx) }?;
        Ok(if tag_shaped(term) {
            self.tag(atoms::tag_term(), term)
        } else {
            term
        })
    }

    fn begin(&mut self) -> (usize, usize, usize) {
        (self.values.len(), self.indices.len(), self.tags)
    }

    fn entry(
        &mut self,
        _: &mut (usize, usize, usize),
        key: Term<'e>,
        index: Option<i64>,
        value: Term<'e>,
    ) -> Result<(), Fail> {
        push_checked(&mut self.keys, key)?;
        push_checked(&mut self.values, value)?;
        if let Some(i) = index {
            push_checked(&mut self.indices, i)?;
        }
        Ok(())
    }

    fn list(&mut self, table: (usize, usize, usize), n: usize) -> Result<Term<'e>, Fail> {
        let (base, ibase, _) = table;
        let values = &self.values[base..];
        let indices = &self.indices[ibase..];
        let list = if indices.iter().zip(1..).all(|(&i, k)| i == k) {
            // The array part, in order: the common case.
            list_checked(self.env, values)
        } else {
            // Distinct integers in 1..=n: a permutation of the slots.
            let mut items = vec![atoms::nil().encode(self.env); n];
            for (&i, &v) in indices.iter().zip(values) {
                items[(i - 1) as usize] = v;
            }
            list_checked(self.env, &items)
        };
        self.truncate(table);
        let list = list.map_err(|why| Fail::new(FailKind::Abort(why)))?;
        Ok(self.walked(table, list))
    }

    fn map(&mut self, table: (usize, usize, usize), _n: usize) -> Result<Term<'e>, Fail> {
        let (base, _, tags) = table;
        let wrap = self.tags > tags;
        let in_pieces = self.keys.len() - base > MAP_PIECE;
        let map = map_checked(self.env, &self.keys[base..], &self.values[base..], wrap);
        self.truncate(table);
        let map = map.map_err(|why| match why {
            Some(why) => Fail::new(FailKind::Abort(why)),
            None => unsupported("a table whose keys collide"),
        })?;
        if in_pieces {
            // Tagged already (its pieces walked, when `wrap`, one by one).
            self.tags += 1;
            return Ok(map);
        }
        Ok(self.walked(table, map))
    }
}
