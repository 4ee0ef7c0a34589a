//! Lua -> Elixir: the rustler terms the core's reading walk makes
//! (`lua_sandbox_core::marshal::read_values`: bounded in depth and bytes, cycles detected).

use super::*;
use lua_sandbox_core::handle::NotOurs;
use lua_sandbox_core::marshal::{push_checked, read_value, read_values, Sink};

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
) -> Result<Vec<Term<'e>>, Fail> {
    // SAFETY: forwarded contract.
    unsafe { read_values(&mut Terms::new(env), l, first, n, bounds) }
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
}

impl<'e> Terms<'e> {
    fn new(env: Env<'e>) -> Self {
        Terms {
            env,
            keys: Vec::new(),
            values: Vec::new(),
            indices: Vec::new(),
        }
    }

    /// Drops a table's entries from the scratch stacks.
    fn truncate(&mut self, (base, ibase): (usize, usize)) {
        self.keys.truncate(base);
        self.values.truncate(base);
        self.indices.truncate(ibase);
    }
}

impl<'e> Sink for Terms<'e> {
    type Value = Term<'e>;
    /// Where the table's entries start in `values` (and `keys`) and in `indices`.
    type Table = (usize, usize);

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
        unsafe { crate::handles::read(self.env, l, idx) }
    }

    fn begin(&mut self) -> (usize, usize) {
        (self.values.len(), self.indices.len())
    }

    fn entry(
        &mut self,
        _: &mut (usize, usize),
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

    fn list(&mut self, table: (usize, usize), n: usize) -> Result<Term<'e>, Fail> {
        let (base, ibase) = table;
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
        list.map_err(|why| Fail::new(FailKind::Abort(why)))
    }

    fn map(&mut self, table: (usize, usize), _n: usize) -> Result<Term<'e>, Fail> {
        let (base, _) = table;
        let map = Term::map_from_arrays(self.env, &self.keys[base..], &self.values[base..])
            .map_err(|_| unsupported("a table whose keys collide"));
        self.truncate(table);
        map
    }
}
