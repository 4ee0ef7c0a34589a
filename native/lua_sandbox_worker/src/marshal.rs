//! The worker's terms ([`proto::Term`]) to Lua values and back. The bounds (depth, size:
//! `max_result_bytes`, 8 bytes per value on top of string bytes; cycles; the memory limit
//! checked while building), the meter that charges every value to the run's budget, the
//! failures and their messages, and the soundness rule (no Lua API call made here may raise)
//! are the core's (`lua_sandbox_core::marshal`), shared with the NIF's marshaling
//! (`native/lua_sandbox_nif/src/marshal/`); this module walks the protocol's terms. The test
//! suites that run the API under both isolations hold the two to the same answers.
//!
//! Handles: the BEAM keeps the terms (`LuaSandbox.Worker.Handles`) and sends each handle as
//! `{:handle, index}` (`proto.rs`); the worker pushes the core's handle userdata for that index
//! under the token of its run's (or session's) [`Handles`], and reads one of its own back as
//! `{:handle, index}`. Any other userdata is one the host cannot take, as in the NIF.

use std::ffi::c_int;

use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::handle::{self, Token};
use lua_sandbox_core::marshal::{
    invalid, key_seg, unsupported, Bad, Fail, FailKind, Host, Kind, Seg, Tally,
};
use lua_sandbox_core::session::Store;
use lua_sandbox_core::{ffi, sandbox};

use crate::proto::{self, Term};

pub use lua_sandbox_core::marshal::{ArgsError, Bounds};

// ---------------------------------------------------------------------------------------------
// Handles

/// The handles of a run or a session in the worker: only their token, lent to the run's scope
/// as the NIF lends its store. The terms, the count and the rollback of a session's handles
/// are the BEAM's (`LuaSandbox.Worker.Handles`), which checks every index named here.
#[derive(Default)]
pub struct Handles(Token);

impl Store for Handles {
    /// Nothing to roll back here: the BEAM forgets a rolled-back call's handles.
    fn mark(&self) -> usize {
        0
    }

    fn truncate(&mut self, _mark: usize) {}

    /// The same token: the handles in the copied state stay valid in the fork.
    fn fork(&self) -> Handles {
        Handles(self.0)
    }
}

/// Runs `f` on the active run's [`Handles`] (lent to its scope, `run.rs`).
fn with_handles<R>(f: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    lua_sandbox_core::scope::with_handles::<Handles, R>(f)
}

// ---------------------------------------------------------------------------------------------
// Terms to Lua

pub use lua_sandbox_core::marshal::{push_globals, push_values};

/// The protocol's terms for the core's walk: `marshal::push_globals::<Proto>(...)`.
pub struct Proto;

impl Host for Proto {
    type Term = Term;
    type Ref<'t> = &'t Term;
    type Items<'t> = std::slice::Iter<'t, Term>;
    type Pairs<'t> = Pairs<'t>;
    /// The index of `{:handle, index}`.
    type Handle = u64;

    fn kind<'t>(term: &'t Term) -> Kind<'t, Proto> {
        match term {
            Term::Atom(a) => match a.as_str() {
                "nil" => Kind::Nil,
                "true" => Kind::Bool(true),
                "false" => Kind::Bool(false),
                name => Kind::Atom(name.into()),
            },
            Term::Int(i) => Kind::Int(*i),
            Term::Float(f) => Kind::Float(*f),
            Term::Bin(b) => Kind::Bin(b),
            Term::List(_) => Kind::List,
            Term::Map(pairs) => match pairs
                .iter()
                .find(|(k, _)| k.as_atom() == Some("__struct__"))
            {
                // A handle crosses as `{:handle, index}`, never as its struct.
                Some((_, name)) => Kind::Struct(name.as_atom().unwrap_or_default().into()),
                None => Kind::Map,
            },
            Term::Tuple(_) => term
                .as_handle()
                .map_or(Kind::NotAValue("tuple"), Kind::Handle),
            Term::Other("improper list") => Kind::Invalid("improper list"),
            Term::Other("big integer") => Kind::Bad(Bad::BigInteger),
            Term::Other("bitstring") => Kind::Bad(Bad::Bitstring),
            Term::Other(what) => Kind::NotAValue(what),
            Term::Raw(_) => Kind::Invalid("unsupported term"),
        }
    }

    fn items<'t>(term: &'t Term) -> Result<(usize, std::slice::Iter<'t, Term>), Fail>
    where
        Self: 't,
    {
        match term {
            Term::List(items) => Ok((items.len(), items.iter())),
            _ => Err(invalid("unsupported term")),
        }
    }

    fn pairs<'t>(term: &'t Term) -> Result<(usize, Pairs<'t>), Fail>
    where
        Self: 't,
    {
        match term {
            Term::Map(pairs) => Ok((pairs.len(), Pairs(pairs.iter()))),
            _ => Err(invalid("unsupported term")),
        }
    }

    fn handle(index: u64) -> Option<handle::Handle> {
        with_handles(|h| h.0.handle(index))
    }
}

/// A map's pairs as the walk takes them.
pub struct Pairs<'t>(std::slice::Iter<'t, (Term, Term)>);

impl<'t> Iterator for Pairs<'t> {
    type Item = (&'t Term, &'t Term);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }
}

// ---------------------------------------------------------------------------------------------
// Lua to terms

/// The `n` values from absolute index `first` of `l`'s stack as one encoded list
/// ([`Term::Raw`]); paths in errors look like `root[i]...`. The stack is left as it was.
///
/// # Safety
/// `first..first + n` must be valid indices of `l`, which must not be running.
pub unsafe fn to_terms(
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Term, SandboxError> {
    // SAFETY: forwarded contract.
    unsafe { read_values(l, first, n, bounds) }.map_err(|f| f.into_error(root))
}

/// [`to_terms`] for a tool call's arguments (path rooted at `root`, e.g. `tools.read`).
///
/// # Safety
/// As for [`to_terms`].
pub unsafe fn tool_args(
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Term, ArgsError> {
    // SAFETY: forwarded contract.
    unsafe { read_values(l, first, n, bounds) }.map_err(|f| f.into_args_error(root))
}

/// The value at absolute index `idx`, encoded ([`Term::Raw`]), the path rooted at `root`.
///
/// # Safety
/// As for [`to_terms`].
pub unsafe fn to_term(
    l: *mut ffi::lua_State,
    idx: c_int,
    bounds: Bounds,
    root: &str,
) -> Result<Term, SandboxError> {
    let mut reader = Reader::new(bounds);
    // SAFETY: reading never raises (module doc); the stack is reset afterwards.
    unsafe {
        let top = ffi::lua_gettop(l);
        let r = reader
            .read(l, idx, 0)
            .and_then(|()| reader.tally.meter.flush());
        ffi::lua_settop(l, top);
        r.map_err(|f| f.into_error(root))?;
    }
    Ok(Term::Raw(reader.out))
}

unsafe fn read_values(
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
) -> Result<Term, Fail> {
    let mut reader = Reader::new(bounds);
    if n > 0 {
        proto::put_header(&mut reader.out, false, n as u32);
    }
    // SAFETY: reading never raises (module doc); the stack is reset afterwards.
    unsafe {
        let top = ffi::lua_gettop(l);
        let mut result = Ok(());
        for (i, idx) in (first..first + n).enumerate() {
            if let Err(f) = reader.read(l, idx, 0) {
                result = Err(f.at(Seg::Index(i as i64 + 1)));
                break;
            }
        }
        let result = result.and_then(|()| reader.tally.meter.flush());
        ffi::lua_settop(l, top);
        result?;
    }
    proto::put_nil(&mut reader.out);
    Ok(Term::Raw(reader.out))
}

/// Reads Lua values straight into the external term format: the bytes held are about the
/// bytes `max_result_bytes` counts, with no tree of terms in between.
struct Reader {
    /// Bytes left, depth, cycles, the meter.
    tally: Tally,
    out: Vec<u8>,
    /// For each table being read whose keys are still all positive integers: each entry's
    /// key and its value's byte range in `out`, relative to the table's header.
    entries: Vec<Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    key: u32,
    start: u32,
    end: u32,
}

impl Reader {
    fn new(bounds: Bounds) -> Reader {
        Reader {
            tally: Tally::new(bounds),
            out: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Fail> {
        self.tally.charge(bytes)
    }

    fn boolean(&mut self, b: bool) {
        proto::put_atom(&mut self.out, if b { "true" } else { "false" });
    }

    /// Encodes the value at absolute stack index `idx`.
    unsafe fn read(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<(), Fail> {
        // SAFETY: `idx` is a valid absolute index; `lua_to*` only on values of the matching
        // type, so none converts or allocates.
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TNIL => {
                    self.charge(0)?;
                    proto::put_atom(&mut self.out, "nil");
                }
                ffi::LUA_TBOOLEAN => {
                    self.charge(0)?;
                    self.boolean(ffi::lua_toboolean(l, idx) != 0);
                }
                ffi::LUA_TNUMBER => {
                    self.charge(0)?;
                    number(l, idx, &mut self.out);
                }
                ffi::LUA_TSTRING => {
                    let bytes = lua_bytes(l, idx);
                    self.charge(bytes.len() as u64)?;
                    proto::put_bin(&mut self.out, bytes);
                }
                ffi::LUA_TTABLE => self.read_table(l, idx, depth)?,
                ffi::LUA_TLIGHTUSERDATA
                    if ffi::lua_touserdata(l, idx).cast_const() == sandbox::json_null() =>
                {
                    self.charge(0)?;
                    proto::put_atom(&mut self.out, "nil");
                }
                ffi::LUA_TUSERDATA => {
                    if ffi::lua_checkstack(l, 2) == 0 {
                        return Err(unsupported("userdata"));
                    }
                    // No store (never in a run): no handle is ours.
                    let token = with_handles(|h| h.0).unwrap_or_default();
                    // SAFETY: a full userdata at `idx`, 2 free slots (checked above).
                    let index = token
                        .index_of(l, idx)
                        .map_err(|why| Fail::new(FailKind::Foreign(why.what())))?;
                    self.charge(0)?;
                    proto::put_handle(&mut self.out, index);
                }
                ffi::LUA_TFUNCTION => return Err(unsupported("a function")),
                ffi::LUA_TTHREAD => return Err(unsupported("a coroutine")),
                _ => return Err(unsupported("userdata")),
            }
        }
        Ok(())
    }

    unsafe fn read_table(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<(), Fail> {
        // SAFETY: as in `read`.
        unsafe {
            let ptr = self.tally.enter_table(l, idx, depth)?;
            let result = self.read_entries(l, idx, depth + 1);
            self.tally.leave(ptr);
            result
        }
    }

    /// One traversal, written as a map (key, value, key, value...); when the keys turn out to
    /// be exactly `1..n`, rewritten in place as a list of the values in key order.
    unsafe fn read_entries(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<(), Fail> {
        let header = self.out.len();
        proto::put_header(&mut self.out, true, 0);
        let base = self.entries.len();
        let mut sequence = true;
        let mut max_index: i64 = 0;
        let mut integer_keys: u64 = 0;
        let mut n: usize = 0;
        let offset = |out: &Vec<u8>| u32::try_from(out.len() - header).ok();
        // SAFETY: as in `read_table`; `lua_next` is driven with the key it returned and the
        // table is not modified. On an early return the slots left are reset by the caller.
        unsafe {
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                let mut key = None;
                match ffi::lua_type(l, -2) {
                    ffi::LUA_TNUMBER if ffi::lua_isinteger(l, -2) != 0 => {
                        let i = ffi::lua_tointegerx(l, -2, std::ptr::null_mut());
                        integer_keys += 1;
                        match u32::try_from(i) {
                            Ok(k) if sequence && k >= 1 => {
                                max_index = max_index.max(i);
                                key = Some(k);
                            }
                            _ => sequence = false,
                        }
                        proto::put_int(&mut self.out, i);
                    }
                    ffi::LUA_TSTRING => {
                        sequence = false;
                        let bytes = lua_bytes(l, -2);
                        self.charge(bytes.len() as u64)?;
                        proto::put_bin(&mut self.out, bytes);
                    }
                    ffi::LUA_TNUMBER => {
                        sequence = false;
                        self.charge(0)?;
                        number(l, -2, &mut self.out);
                    }
                    ffi::LUA_TBOOLEAN => {
                        sequence = false;
                        self.charge(0)?;
                        self.boolean(ffi::lua_toboolean(l, -2) != 0);
                    }
                    ffi::LUA_TTABLE => return Err(unsupported("a table key")),
                    ffi::LUA_TFUNCTION => return Err(unsupported("a function key")),
                    _ => return Err(unsupported("this key")),
                }
                let start = offset(&self.out);
                let value_idx = ffi::lua_gettop(l);
                if let Err(f) = self.read(l, value_idx, depth) {
                    return Err(f.at(lua_key_seg(l, value_idx - 1)));
                }
                match (key, start, offset(&self.out)) {
                    (Some(key), Some(start), Some(end)) if sequence => {
                        self.entries.push(Entry { key, start, end })
                    }
                    _ => sequence = false,
                }
                n += 1;
                ffi::lua_pop(l, 1);
            }
        }
        let count = u32::try_from(n).map_err(|_| Fail::new(FailKind::Memory))?;
        if sequence && n > 0 && max_index as usize == n {
            self.rewrite_as_list(header, base, count);
        } else {
            // A map after all: its integer keys count as values too.
            for _ in 0..integer_keys {
                self.charge(0)?;
            }
            proto::set_header(&mut self.out, header, true, count);
        }
        self.entries.truncate(base);
        Ok(())
    }

    /// Rewrites the map of `count` entries at `header` (keys `1..count`, each once) as the
    /// list of its values in key order, in place when they came in order (the array part,
    /// the common case): each value moves down over the keys before it.
    fn rewrite_as_list(&mut self, header: usize, base: usize, count: u32) {
        let in_order = self.entries[base..]
            .iter()
            .zip(1..)
            .all(|(e, k)| e.key == k);
        if in_order {
            let mut w = header + proto::HEADER_BYTES;
            for e in &self.entries[base..] {
                let (start, end) = (header + e.start as usize, header + e.end as usize);
                self.out.copy_within(start..end, w);
                w += end - start;
            }
            self.out.truncate(w);
        } else {
            // Distinct integers in 1..=n, out of order: a permutation (rare), copied once.
            self.entries[base..].sort_unstable_by_key(|e| e.key);
            let map = self.out.split_off(header);
            self.out.extend([0; proto::HEADER_BYTES]);
            for e in &self.entries[base..] {
                self.out
                    .extend_from_slice(&map[e.start as usize..e.end as usize]);
            }
        }
        proto::set_header(&mut self.out, header, false, count);
        proto::put_nil(&mut self.out);
    }
}

/// Encodes a Lua number: NaN and the infinities as the NIF sends them (`:nan`, `:infinity`,
/// `:neg_infinity`).
///
/// # Safety
/// The slot must hold a number.
unsafe fn number(l: *mut ffi::lua_State, idx: c_int, out: &mut Vec<u8>) {
    // SAFETY: per the contract, neither call converts.
    unsafe {
        if ffi::lua_isinteger(l, idx) != 0 {
            return proto::put_int(out, ffi::lua_tointegerx(l, idx, std::ptr::null_mut()));
        }
        let f = ffi::lua_tonumberx(l, idx, std::ptr::null_mut());
        if f.is_nan() {
            proto::put_atom(out, "nan")
        } else if f == f64::INFINITY {
            proto::put_atom(out, "infinity")
        } else if f == f64::NEG_INFINITY {
            proto::put_atom(out, "neg_infinity")
        } else {
            proto::put_float(out, f)
        }
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
/// The slot must hold a string; the bytes are valid while it stays on the stack.
unsafe fn lua_bytes<'x>(l: *mut ffi::lua_State, idx: c_int) -> &'x [u8] {
    let mut len = 0usize;
    // SAFETY: per the contract the value is a string: no conversion, no raise.
    unsafe {
        let p = ffi::lua_tolstring(l, idx, &mut len);
        if p.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(p.cast::<u8>(), len)
        }
    }
}
