//! Lua values to host terms: the one reading walk both hosts take ([`read_values`],
//! [`read_value`]). It goes through the values on the stack in one order, charges each as
//! [`Tally`] says, tells lists from maps, finds cycles and depth, and fails with the same
//! messages and paths for both hosts; a host's [`Sink`] only makes its terms (the NIF's
//! rustler terms, the worker's external-format bytes).
//!
//! Soundness: reading never raises (the module doc of `marshal`): `lua_next` on a table not
//! modified during the traversal, driven with the key it returned; `lua_to*` only on values of
//! the matching type (no conversion, no allocation); every push covered by `lua_checkstack`.
//! So the sink's values (vectors, terms) are never alive across a raising Lua call.

use std::ffi::c_int;

use super::{key_seg, unsupported, Bounds, Fail, FailKind, Seg, Tally};
use crate::handle::NotOurs;
use crate::{ffi, sandbox};

/// A host's output for the reading walk: the terms it makes of Lua values.
pub trait Sink {
    /// One value made (a term, or where its bytes were written).
    type Value;
    /// The bookkeeping of a table being read.
    type Table;

    fn nil(&mut self) -> Self::Value;
    fn boolean(&mut self, b: bool) -> Self::Value;
    fn integer(&mut self, i: i64) -> Self::Value;
    /// Any float: NaN and the infinities as the atoms `:nan`, `:infinity`, `:neg_infinity`.
    fn float(&mut self, f: f64) -> Self::Value;
    /// A string, charged to `tally` ([`Tally::charge`] with its length, or as the host copies
    /// it piece by piece).
    fn string(&mut self, tally: &mut Tally, bytes: &[u8]) -> Result<Self::Value, Fail>;
    /// The handle at `idx`, if it is one of the active run's.
    ///
    /// # Safety
    /// `idx` is a valid index of `l` holding a full userdata; `l` has 2 free slots.
    unsafe fn handle(&mut self, l: *mut ffi::lua_State, idx: c_int)
        -> Result<Self::Value, NotOurs>;

    /// A table's entries are about to be read.
    fn begin(&mut self) -> Self::Table;
    /// One entry of `table`; `index` is the key as long as every key so far was a positive
    /// integer. A host that keeps entries in growing vectors grows them with checks
    /// ([`super::push_checked`]), and fails with the abort met there.
    fn entry(
        &mut self,
        table: &mut Self::Table,
        key: Self::Value,
        index: Option<i64>,
        value: Self::Value,
    ) -> Result<(), Fail>;
    /// The table's `n` keys were exactly `1..=n`, in some order: the list of the values in key
    /// order.
    fn list(&mut self, table: Self::Table, n: usize) -> Result<Self::Value, Fail>;
    /// Any other table, its `n` entries: a map.
    fn map(&mut self, table: Self::Table, n: usize) -> Result<Self::Value, Fail>;
}

/// Reads the `n` values at `first..first + n` of `l` into `sink`, paths indexed from 1 (the
/// caller roots them). The stack is left as it was.
///
/// # Safety
/// `first..first + n` must be valid indices of `l`, which must not be running.
pub unsafe fn read_values<S: Sink>(
    sink: &mut S,
    l: *mut ffi::lua_State,
    first: c_int,
    n: c_int,
    bounds: Bounds,
) -> Result<Vec<S::Value>, Fail> {
    let mut reader = Reader {
        tally: Tally::new(bounds),
        sink,
    };
    // SAFETY: reading never raises (module doc); the stack is reset afterwards.
    unsafe {
        let top = ffi::lua_gettop(l);
        let mut out = Vec::with_capacity(n.max(0) as usize);
        let mut result = Ok(());
        for (i, idx) in (first..first + n).enumerate() {
            match reader.read(l, idx, 0) {
                Ok(v) => out.push(v),
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

/// Reads the value at absolute index `idx` of `l` into `sink`, its path the caller's root
/// itself. The stack is left as it was.
///
/// # Safety
/// As for [`read_values`].
pub unsafe fn read_value<S: Sink>(
    sink: &mut S,
    l: *mut ffi::lua_State,
    idx: c_int,
    bounds: Bounds,
) -> Result<S::Value, Fail> {
    let mut reader = Reader {
        tally: Tally::new(bounds),
        sink,
    };
    // SAFETY: as in `read_values`.
    unsafe {
        let top = ffi::lua_gettop(l);
        let r = reader
            .read(l, idx, 0)
            .and_then(|v| reader.tally.meter.flush().map(|()| v));
        ffi::lua_settop(l, top);
        r
    }
}

struct Reader<'s, S> {
    /// Bytes left, depth, cycles, the meter.
    tally: Tally,
    sink: &'s mut S,
}

impl<S: Sink> Reader<'_, S> {
    /// Converts the value at absolute stack index `idx`.
    ///
    /// # Safety
    /// `idx` is a valid absolute index of `l`, which is not running.
    unsafe fn read(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<S::Value, Fail> {
        // SAFETY: the contract; the `lua_to*` calls are made only on values of the matching
        // type, so none converts or allocates (module doc).
        unsafe {
            match ffi::lua_type(l, idx) {
                ffi::LUA_TNIL => {
                    self.tally.charge(0)?;
                    Ok(self.sink.nil())
                }
                ffi::LUA_TBOOLEAN => {
                    self.tally.charge(0)?;
                    Ok(self.sink.boolean(ffi::lua_toboolean(l, idx) != 0))
                }
                ffi::LUA_TNUMBER => {
                    self.tally.charge(0)?;
                    Ok(self.number(l, idx))
                }
                ffi::LUA_TSTRING => self.sink.string(&mut self.tally, lua_bytes(l, idx)),
                ffi::LUA_TTABLE => {
                    let ptr = self.tally.enter_table(l, idx, depth)?;
                    let result = self.read_entries(l, idx, depth + 1);
                    self.tally.leave(ptr);
                    // Checked on the way back up too; a failure already on its way stays
                    // the outcome (an abort found here is sticky: the run reports it).
                    let checked = self.tally.meter.left();
                    result.and_then(|v| checked.map(|()| v))
                }
                ffi::LUA_TLIGHTUSERDATA
                    if ffi::lua_touserdata(l, idx).cast_const() == sandbox::json_null() =>
                {
                    self.tally.charge(0)?;
                    Ok(self.sink.nil())
                }
                ffi::LUA_TUSERDATA => {
                    if ffi::lua_checkstack(l, 2) == 0 {
                        return Err(unsupported("userdata"));
                    }
                    // SAFETY: a full userdata at `idx`, 2 free slots (checked above).
                    let v = self
                        .sink
                        .handle(l, idx)
                        .map_err(|why| Fail::new(FailKind::Foreign(why.what())))?;
                    self.tally.charge(0)?;
                    Ok(v)
                }
                ffi::LUA_TFUNCTION => Err(unsupported("a function")),
                ffi::LUA_TTHREAD => Err(unsupported("a coroutine")),
                _ => Err(unsupported("userdata")),
            }
        }
    }

    /// The number at `idx`, an integer or a float.
    ///
    /// # Safety
    /// The slot holds a number.
    unsafe fn number(&mut self, l: *mut ffi::lua_State, idx: c_int) -> S::Value {
        // SAFETY: per the contract, neither call converts.
        unsafe {
            if ffi::lua_isinteger(l, idx) != 0 {
                self.sink
                    .integer(ffi::lua_tointegerx(l, idx, std::ptr::null_mut()))
            } else {
                self.sink
                    .float(ffi::lua_tonumberx(l, idx, std::ptr::null_mut()))
            }
        }
    }

    /// One traversal of the table at `idx` (entered): converts every entry, and decides at
    /// the end whether the keys were exactly `1..n` (a list) or not (a map). Lua stores
    /// integer-valued float keys as integers, so checking integer keys is enough.
    ///
    /// # Safety
    /// `idx` is a valid absolute index of `l` holding a table, with the stack room of
    /// [`Tally::enter_table`].
    unsafe fn read_entries(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<S::Value, Fail> {
        let mut table = self.sink.begin();
        let mut sequence = true;
        let mut max_index: i64 = 0;
        let mut integer_keys: u64 = 0;
        let mut n: usize = 0;
        // SAFETY: `lua_next` is driven with the key it returned and the table is not
        // modified (module doc). On an early return the key/value slots stay on the stack;
        // `read_values`/`read_value` reset the stack afterwards.
        unsafe {
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, idx) != 0 {
                let mut index = None;
                let key = match ffi::lua_type(l, -2) {
                    ffi::LUA_TNUMBER if ffi::lua_isinteger(l, -2) != 0 => {
                        let i = ffi::lua_tointegerx(l, -2, std::ptr::null_mut());
                        integer_keys += 1;
                        if sequence && i >= 1 {
                            max_index = max_index.max(i);
                            index = Some(i);
                        } else {
                            sequence = false;
                        }
                        self.sink.integer(i)
                    }
                    ffi::LUA_TSTRING => {
                        sequence = false;
                        self.sink.string(&mut self.tally, lua_bytes(l, -2))?
                    }
                    ffi::LUA_TNUMBER => {
                        sequence = false;
                        self.tally.charge(0)?;
                        self.number(l, -2)
                    }
                    ffi::LUA_TBOOLEAN => {
                        sequence = false;
                        self.tally.charge(0)?;
                        self.sink.boolean(ffi::lua_toboolean(l, -2) != 0)
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
                self.sink.entry(&mut table, key, index, value)?;
                n += 1;
                ffi::lua_pop(l, 1);
            }
        }
        if sequence && n > 0 && max_index as usize == n {
            self.sink.list(table, n)
        } else {
            // A map after all: its integer keys count as values too.
            for _ in 0..integer_keys {
                self.tally.charge(0)?;
            }
            self.sink.map(table, n)
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
