//! Lua -> Elixir: Lua values read into terms, bounded in depth and bytes, cycles detected.

use super::*;

/// Converts the `n` values from absolute index `first` of `l`'s stack to terms; paths in
/// errors look like `root[i]...`. The stack is left as it was.
///
/// # Safety
/// `first..first + n` must be valid indices of `l`, which must not be running.
pub unsafe fn to_terms<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Vec<Term<'e>>, SandboxError> {
    // SAFETY: forwarded contract.
    unsafe { read_values(env, l, first, n, bounds) }.map_err(|f| f.into_error(root))
}

/// [`to_terms`] for a tool call's arguments (path rooted at `root`, e.g. `tools.read`).
///
/// # Safety
/// As for [`to_terms`].
pub unsafe fn tool_args<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Vec<Term<'e>>, ArgsError> {
    // SAFETY: forwarded contract.
    unsafe { read_values(env, l, first, n, bounds) }.map_err(|f| f.into_args_error(root))
}

/// The values at `first..first + n` as terms; the stack is left as it was.
///
/// # Safety
/// As for [`to_terms`].
unsafe fn read_values<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
) -> Result<Vec<Term<'e>>, Fail> {
    let mut reader = Reader::new(env, bounds);
    // SAFETY: reading never raises (module doc); the stack is reset afterwards.
    unsafe {
        let top = ffi::lua_gettop(l);
        let mut out = Vec::with_capacity(n.max(0) as usize);
        let mut result = Ok(());
        for (i, idx) in (first..first + n).enumerate() {
            match reader.read(l, idx, 0) {
                Ok(t) => out.push(t),
                Err(f) => {
                    result = Err(f.at(Seg::Index(i as i64 + 1)));
                    break;
                }
            }
        }
        let result = result.and_then(|()| reader.tally.meter.flush());
        ffi::lua_settop(l, top);
        result.map(|()| out)
    }
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
    let mut reader = Reader::new(env, bounds);
    // SAFETY: as in `to_terms`.
    unsafe {
        let top = ffi::lua_gettop(l);
        let r = reader
            .read(l, idx, 0)
            .and_then(|term| reader.tally.meter.flush().map(|()| term));
        ffi::lua_settop(l, top);
        r.map_err(|f| f.into_error(root))
    }
}

struct Reader<'e> {
    env: Env<'e>,
    /// Bytes left, depth, cycles, the meter.
    tally: Tally,
    /// Scratch stacks shared by every table being read: each `read_entries` works above the
    /// length it found and truncates back, so tables cost no allocation of their own.
    keys: Vec<Term<'e>>,
    values: Vec<Term<'e>>,
    indices: Vec<i64>,
}

impl<'e> Reader<'e> {
    fn new(env: Env<'e>, bounds: Bounds) -> Self {
        Reader {
            env,
            tally: Tally::new(bounds),
            keys: Vec::new(),
            values: Vec::new(),
            indices: Vec::new(),
        }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Fail> {
        self.tally.charge(bytes)
    }

    /// A string as a binary. One larger than a piece is paid per piece as it is copied
    /// (`binary_term_charged`), so a kill stops a copy as large as the heap within a piece.
    fn string(&mut self, bytes: &[u8]) -> Result<Term<'e>, Fail> {
        if bytes.len() <= PIECE {
            self.charge(bytes.len() as u64)?;
            return Ok(binary_term(self.env, bytes));
        }
        self.charge(0)?;
        self.tally.spend(bytes.len() as u64)?;
        self.tally.meter.flush()?;
        binary_term_charged(self.env, bytes).map_err(|(why, _)| Fail::new(FailKind::Abort(why)))
    }

    /// Converts the value at absolute stack index `idx`.
    unsafe fn read(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<Term<'e>, Fail> {
        let env = self.env;
        // SAFETY: `idx` is a valid absolute index; the `lua_to*` calls
        // are made only on values of the matching type, so none converts or allocates.
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TNIL => {
                    self.charge(0)?;
                    Ok(atoms::nil().encode(env))
                }
                ffi::LUA_TBOOLEAN => {
                    self.charge(0)?;
                    Ok((ffi::lua_toboolean(l, idx) != 0).encode(env))
                }
                ffi::LUA_TNUMBER => {
                    self.charge(0)?;
                    if ffi::lua_isinteger(l, idx) != 0 {
                        Ok(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()).encode(env))
                    } else {
                        Ok(float_term(
                            env,
                            ffi::lua_tonumberx(l, idx, std::ptr::null_mut()),
                        ))
                    }
                }
                ffi::LUA_TSTRING => self.string(lua_bytes(l, idx)),
                ffi::LUA_TTABLE => self.read_table(l, idx, depth),
                ffi::LUA_TLIGHTUSERDATA
                    if ffi::lua_touserdata(l, idx).cast_const()
                        == lua_sandbox_core::sandbox::json_null() =>
                {
                    self.charge(0)?;
                    Ok(atoms::nil().encode(env))
                }
                ffi::LUA_TUSERDATA => {
                    if ffi::lua_checkstack(l, 2) == 0 {
                        return Err(unsupported("userdata"));
                    }
                    match crate::handles::read(env, l, idx) {
                        Ok(t) => {
                            self.charge(0)?;
                            Ok(t)
                        }
                        Err(why) => Err(Fail::new(FailKind::Foreign(why.what()))),
                    }
                }
                ffi::LUA_TFUNCTION => Err(unsupported("a function")),
                ffi::LUA_TTHREAD => Err(unsupported("a coroutine")),
                _ => Err(unsupported("userdata")),
            }
        }
    }

    unsafe fn read_table(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<Term<'e>, Fail> {
        // SAFETY: as in `read`; `lua_next` is driven with the key it returned, the table is not
        // modified during the traversal, and every push is covered by `lua_checkstack`.
        unsafe {
            let ptr = self.tally.enter_table(l, idx, depth)?;
            let result = self.read_entries(l, idx, depth + 1);
            self.tally.leave(ptr);
            result
        }
    }

    /// One traversal: converts every entry, and decides at the end whether the keys were
    /// exactly `1..n` (a list) or not (a map). Lua stores integer-valued float keys as
    /// integers, so checking integer keys is enough.
    unsafe fn read_entries(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<Term<'e>, Fail> {
        let env = self.env;
        // This table's entries are `keys[base..]`, `values[base..]`; positive integer keys,
        // as long as every key so far was one, `indices[ibase..]`.
        let base = self.values.len();
        let ibase = self.indices.len();
        let mut sequence = true;
        let mut max_index: i64 = 0;
        let mut integer_keys: u64 = 0;
        // SAFETY: as in `read_table`; `lua_next` is driven with the key it returned and the
        // table is not modified. On an early return the key/value slots stay on the stack;
        // `to_terms`/`to_term` reset the stack afterwards.
        unsafe {
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                let key = match ffi::lua_type(l, -2) {
                    ffi::LUA_TNUMBER if ffi::lua_isinteger(l, -2) != 0 => {
                        let i = ffi::lua_tointegerx(l, -2, std::ptr::null_mut());
                        integer_keys += 1;
                        if sequence && i >= 1 {
                            self.indices.push(i);
                            max_index = max_index.max(i);
                        } else {
                            sequence = false;
                        }
                        i.encode(env)
                    }
                    ffi::LUA_TSTRING => {
                        sequence = false;
                        self.string(lua_bytes(l, -2))?
                    }
                    ffi::LUA_TNUMBER => {
                        sequence = false;
                        self.charge(0)?;
                        float_term(env, ffi::lua_tonumberx(l, -2, std::ptr::null_mut()))
                    }
                    ffi::LUA_TBOOLEAN => {
                        sequence = false;
                        self.charge(0)?;
                        (ffi::lua_toboolean(l, -2) != 0).encode(env)
                    }
                    ffi::LUA_TTABLE => return Err(unsupported("a table key")),
                    ffi::LUA_TFUNCTION => return Err(unsupported("a function key")),
                    _ => return Err(unsupported("this key")),
                };
                let value_idx = ffi::lua_gettop(l);
                let value = match self.read(l, value_idx, depth) {
                    Ok(v) => v,
                    // A failed read may leave slots behind: address the key absolutely.
                    Err(f) => return Err(f.at(lua_key_seg(l, value_idx - 1))),
                };
                self.keys.push(key);
                self.values.push(value);
                ffi::lua_pop(l, 1);
            }
        }
        let n = self.values.len() - base;
        let result = if sequence && n > 0 && max_index as usize == n {
            let values = &self.values[base..];
            let indices = &self.indices[ibase..];
            if indices.iter().zip(1..).all(|(&i, k)| i == k) {
                // The array part, in order: the common case.
                Ok(values.encode(env))
            } else {
                // Distinct integers in 1..=n: a permutation of the slots.
                let nil = atoms::nil().encode(env);
                let mut items = vec![nil; n];
                for (&i, &v) in indices.iter().zip(values) {
                    items[(i - 1) as usize] = v;
                }
                Ok(items.encode(env))
            }
        } else {
            // A map after all: its integer keys count as values too.
            for _ in 0..integer_keys {
                self.charge(0)?;
            }
            Term::map_from_arrays(env, &self.keys[base..], &self.values[base..])
                .map_err(|_| unsupported("a table whose keys collide"))
        };
        self.keys.truncate(base);
        self.values.truncate(base);
        self.indices.truncate(ibase);
        result
    }
}

/// The path segment of the key at `idx` (only computed for error messages).
///
/// # Safety
/// `idx` must be a valid index of a string, number or boolean key.
unsafe fn lua_key_seg(l: *mut ffi::lua_State, idx: c_int) -> Seg {
    // SAFETY: per the contract; only type-matching accessors are used.
    unsafe {
        match ffi::lua_type(l, idx) {
            ffi::LUA_TSTRING => key_seg(lua_bytes(l, idx)),
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, idx) != 0 => {
                Seg::Index(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()))
            }
            ffi::LUA_TNUMBER => Seg::Other(format!(
                "{}",
                ffi::lua_tonumberx(l, idx, std::ptr::null_mut())
            )),
            ffi::LUA_TBOOLEAN => Seg::Other((ffi::lua_toboolean(l, idx) != 0).to_string()),
            _ => Seg::Other("?".into()),
        }
    }
}

/// The bytes of the string at `idx`.
///
/// # Safety
/// The slot must hold a string (not a number: converting would allocate); the bytes are only
/// valid while the string stays on the stack.
unsafe fn lua_bytes<'x>(l: *mut ffi::lua_State, idx: c_int) -> &'x [u8] {
    let mut len = 0usize;
    // SAFETY: per the contract the value is a string, so this neither converts nor raises,
    // and returns a pointer to `len` bytes owned by the string.
    unsafe {
        let p = ffi::lua_tolstring(l, idx, &mut len);
        if p.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(p.cast::<u8>(), len)
        }
    }
}

fn float_term(env: Env<'_>, f: f64) -> Term<'_> {
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
