//! Host terms to Lua values: the one walk both hosts' terms take ([`push_globals`],
//! [`push_values`]). A host says what one of its terms is ([`Host::kind`]) and how to go
//! through a list's items and a map's pairs; the order of the checks, what each value costs,
//! the failures and their paths are here, so the NIF's terms (rustler) and the worker's
//! (`proto::Term`) become the same Lua values with the same answers.
//!
//! Soundness: the walk runs inside [`building`] (the backstop, the collector paused) with the
//! memory limit lifted, so none of its pushes can raise (the module doc of `marshal`): the
//! host's values it holds (an atom's name, a list's iterator) are alive across Lua calls that
//! do not raise by construction, never across one that may. The size is tracked by [`Build`]
//! and checked at the end.

use std::borrow::{Borrow, Cow};
use std::ffi::c_int;
use std::fmt::Debug;

use super::{
    building, invalid, key_seg, push_str, stack_exhausted, Build, Fail, FailKind, KeyKind,
    KeyKinds, Seg, LUA_VALUE_BYTES,
};
use crate::error::SandboxError;
use crate::{ffi, handle};

/// What a host's term is, for the walk. Borrowed from the term where the host can.
pub enum Kind<'t, H: Host> {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Any other atom: its name.
    Atom(Cow<'t, str>),
    Bin(&'t [u8]),
    /// A list: its items through [`Host::items`].
    List,
    /// A map that is not a struct: its pairs through [`Host::pairs`].
    Map,
    /// A handle (`LuaSandbox.Handle`), as the host knows it.
    Handle(H::Handle),
    /// Any other struct: its module (`""` when its name is not an atom).
    Struct(Cow<'t, str>),
    /// A scalar outside what Lua holds.
    Bad(Bad),
    /// A term of a kind Lua has no value for, in words (`"tuple"`, `"pid"`): "... cannot become
    /// a Lua value".
    NotAValue(&'static str),
    /// Any other term the walk refuses: the whole message.
    Invalid(&'static str),
}

/// A scalar term outside what Lua holds; worded for a value or a key ([`Bad::fail`]).
#[derive(Clone, Copy)]
pub enum Bad {
    /// An integer outside the 64-bit range.
    BigInteger,
    /// A bitstring that is not a binary.
    Bitstring,
    /// An atom whose name the host cannot read.
    Atom,
    /// A float the host cannot read.
    Float,
}

impl Bad {
    /// The failure, `role` being `""` (a value) or `" key"`.
    fn fail(self, role: &str) -> Fail {
        invalid(&match self {
            Bad::BigInteger => format!("integer{role} outside the 64-bit range"),
            Bad::Bitstring => format!("bitstring{role}"),
            Bad::Atom => format!("bad atom{role}"),
            Bad::Float => format!("bad float{role}"),
        })
    }
}

/// A host's terms, as the walk reads them (implemented by a marker type of the host's).
pub trait Host: Sized {
    /// The host's term; `Debug` renders a map key of no other kind in an error's path.
    type Term: Debug;
    /// An item or a key or value as the host's iteration yields it (the term, or a reference
    /// to it).
    type Ref<'t>: Borrow<Self::Term>
    where
        Self: 't;
    type Items<'t>: Iterator<Item = Self::Ref<'t>>
    where
        Self: 't;
    type Pairs<'t>: Iterator<Item = (Self::Ref<'t>, Self::Ref<'t>)>
    where
        Self: 't;
    /// A handle as the term carries it.
    type Handle;

    fn kind<'t>(term: &'t Self::Term) -> Kind<'t, Self>;

    /// A [`Kind::List`]'s length and items (an improper list fails here).
    fn items<'t>(term: &'t Self::Term) -> Result<(usize, Self::Items<'t>), Fail>
    where
        Self: 't;

    /// A [`Kind::Map`]'s size and pairs.
    fn pairs<'t>(term: &'t Self::Term) -> Result<(usize, Self::Pairs<'t>), Fail>
    where
        Self: 't;

    /// The core's handle for a [`Kind::Handle`] under the active run's token; `None` outside a
    /// run (no store is lent).
    fn handle(handle: Self::Handle) -> Option<handle::Handle>;
}

/// Sets each `(name, term)` as a global of `l`. Paths in errors start at `globals`.
///
/// # Safety
/// `l` must be a non-running state whose memory limit the caller lifted; `limit` is the run's
/// limit (0: none), checked here.
pub unsafe fn push_globals<H: Host>(
    l: *mut ffi::lua_State,
    globals: &[(String, H::Term)],
    max_depth: usize,
    limit: usize,
) -> Result<(), SandboxError> {
    if globals.is_empty() {
        return Ok(());
    }
    // SAFETY: `l` is a valid state (the caller's contract).
    let mut b = unsafe { Build::new(l, limit, max_depth) };
    let mut result = Ok(());
    // SAFETY: nothing in the closure raises (module doc); the backstop catches the impossible.
    unsafe {
        building(l, |l| {
            result = b
                .set_globals::<H>(l, globals)
                .and_then(|()| b.meter.flush());
        })
    }?;
    result.map_err(|f| f.into_error("globals"))?;
    // SAFETY: as above.
    unsafe { b.check_memory(l) }
}

/// Converts `terms` to Lua values left on top of `l`'s stack; paths in errors start at `root`
/// and index from 1. Returns how many values were pushed; on an error nothing is left.
///
/// # Safety
/// As for [`push_globals`].
pub unsafe fn push_values<H: Host>(
    l: *mut ffi::lua_State,
    terms: &[H::Term],
    max_depth: usize,
    root: &str,
    limit: usize,
) -> Result<c_int, SandboxError> {
    // SAFETY: `l` is a valid state (the caller's contract).
    let mut b = unsafe { Build::new(l, limit, max_depth) };
    let mut result = Ok(());
    // SAFETY: only reads.
    let base = unsafe { ffi::lua_gettop(l) };
    // SAFETY: as in `push_globals`; the values left on the closure's stack are its results.
    unsafe {
        building(l, |l| {
            result = b.push_all::<H>(l, terms).and_then(|()| b.meter.flush());
            if result.is_err() {
                ffi::lua_settop(l, 0);
            }
        })
    }?;
    result.map_err(|f| f.into_error(root))?;
    // SAFETY: as above.
    unsafe { b.check_memory(l) }?;
    // SAFETY: only reads.
    Ok(unsafe { ffi::lua_gettop(l) } - base)
}

/// `globals` as the `exec::Push` of a setup's `globals:` ([`push_globals`]; returns 0).
///
/// # Safety
/// The closure may only be called as `exec` calls a push (`exec::Push`: on a state that is not
/// running, its memory limit lifted): give it to `exec` and to nothing else.
pub unsafe fn globals_push<'s, H: Host + 's>(
    globals: &'s [(String, H::Term)],
    max_depth: usize,
) -> impl FnMut(*mut ffi::lua_State, usize) -> Result<c_int, SandboxError> + 's {
    move |l, limit| {
        // SAFETY: only `exec` calls it (this function's contract), on a state that is not
        // running, its limit lifted (`exec::Push`): `push_globals`'s contract.
        unsafe { push_globals::<H>(l, globals, max_depth, limit) }.map(|()| 0)
    }
}

/// `values` as an `exec::Push` of values (`call:`'s arguments, a tool's result:
/// [`push_values`], paths from `root`).
///
/// # Safety
/// As for [`globals_push`].
pub unsafe fn values_push<'s, H: Host + 's>(
    values: &'s [H::Term],
    max_depth: usize,
    root: &'s str,
) -> impl FnMut(*mut ffi::lua_State, usize) -> Result<c_int, SandboxError> + 's {
    move |l, limit| {
        // SAFETY: as in `globals_push`; on an error nothing is left on the stack.
        unsafe { push_values::<H>(l, values, max_depth, root, limit) }
    }
}

/// What a new table will hold: a list's items in its array part, a map's pairs in its hash part.
#[derive(Clone, Copy)]
enum Shape {
    List,
    Map,
}

/// The path segment of a map key (only computed for error messages).
fn seg<H: Host>(k: &H::Term) -> Seg {
    match H::kind(k) {
        Kind::Bin(b) => key_seg(b),
        Kind::Bool(b) => Seg::Other(b.to_string()),
        Kind::Atom(a) => Seg::Key(a.into_owned()),
        Kind::Nil => Seg::Key("nil".into()),
        Kind::Int(i) => Seg::Index(i),
        Kind::Bad(_) => Seg::Other("?".into()),
        _ => Seg::Other(format!("{k:?}")),
    }
}

/// A map key's kind for [`KeyKinds`] (booleans are atoms).
fn key_kind<H: Host>(kind: &Kind<'_, H>) -> KeyKind {
    match kind {
        Kind::Bin(_) => KeyKind::String,
        Kind::Atom(_) | Kind::Bool(_) => KeyKind::Atom,
        Kind::Int(_) => KeyKind::Integer,
        Kind::Float(_) => KeyKind::Float,
        _ => KeyKind::Other,
    }
}

// Every method below: `l` is the thread being built on, inside [`building`] with the memory
// limit lifted, so no push raises (module doc); each push has a stack slot, as said at each.
impl Build {
    /// # Safety
    /// Inside [`building`] on `l`.
    unsafe fn set_globals<H: Host>(
        &mut self,
        l: *mut ffi::lua_State,
        globals: &[(String, H::Term)],
    ) -> Result<(), Fail> {
        // SAFETY: inside the backstop, each push preceded by a successful `lua_checkstack`; no
        // call here raises (module doc).
        unsafe {
            if ffi::lua_checkstack(l, 4) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_GLOBALS);
            let g = ffi::lua_gettop(l);
            for (name, term) in globals {
                self.reserve(name.len() + LUA_VALUE_BYTES)?;
                push_str(l, name.as_bytes());
                self.push::<H>(l, term, 0)
                    .map_err(|f| f.at(Seg::Key(name.clone())))?;
                ffi::lua_rawset(l, g);
            }
            ffi::lua_settop(l, g - 1);
        }
        Ok(())
    }

    /// # Safety
    /// Inside [`building`] on `l`.
    unsafe fn push_all<H: Host>(
        &mut self,
        l: *mut ffi::lua_State,
        terms: &[H::Term],
    ) -> Result<(), Fail> {
        // SAFETY: as in `set_globals`; `room_for` grew the stack for every value.
        unsafe {
            self.room_for(l, terms.len())?;
            for (i, term) in terms.iter().enumerate() {
                self.push::<H>(l, term, 0)
                    .map_err(|f| f.at(Seg::Index(i as i64 + 1)))?;
            }
        }
        Ok(())
    }

    /// Pushes the Lua value for `term` (exactly one slot on success) at `depth`.
    ///
    /// # Safety
    /// Inside [`building`] on `l`, one free stack slot.
    unsafe fn push<'t, H: Host + 't>(
        &mut self,
        l: *mut ffi::lua_State,
        term: &'t H::Term,
        depth: usize,
    ) -> Result<(), Fail> {
        self.meter.value(0)?;
        // SAFETY: the contract: one free slot; tables check for more.
        unsafe {
            match H::kind(term) {
                Kind::Nil => ffi::lua_pushnil(l),
                Kind::List => self.push_list::<H>(l, term, depth)?,
                Kind::Map => self.push_map::<H>(l, term, depth)?,
                Kind::Handle(h) => {
                    self.reserve(LUA_VALUE_BYTES)?;
                    let h = H::handle(h)
                        .ok_or_else(|| invalid("handles can only be passed to a run"))?;
                    // SAFETY: the contract (not running, limit lifted, one free slot), the
                    // bytes reserved just above; both hosts build their states with
                    // `sandbox::new_slot`, so the handle metatable is there.
                    handle::push(l, h);
                }
                Kind::Struct(module) => {
                    let module = module.strip_prefix("Elixir.").unwrap_or(&module);
                    return Err(invalid(&format!(
                        "struct {module} cannot become a Lua value (no LuaSandbox.Encoder)"
                    )));
                }
                kind => self.push_scalar(l, kind, "")?,
            }
        }
        Ok(())
    }

    /// # Safety
    /// As for [`Build::push`]; `term` is a [`Kind::List`].
    unsafe fn push_list<'t, H: Host + 't>(
        &mut self,
        l: *mut ffi::lua_State,
        term: &'t H::Term,
        depth: usize,
    ) -> Result<(), Fail> {
        let depth = self.enter(depth)?;
        let (len, items) = H::items(term)?;
        // SAFETY: as in `push` (the contract); the 3 slots hold the table and an item.
        unsafe {
            let t = self.new_table(l, len, Shape::List)?;
            for (i, item) in items.enumerate() {
                let index = i as i64 + 1;
                self.push::<H>(l, item.borrow(), depth)
                    .map_err(|f| f.at(Seg::Index(index)))?;
                ffi::lua_rawseti(l, t, index);
            }
        }
        Ok(())
    }

    /// # Safety
    /// As for [`Build::push`]; `term` is a [`Kind::Map`].
    unsafe fn push_map<'t, H: Host + 't>(
        &mut self,
        l: *mut ffi::lua_State,
        term: &'t H::Term,
        depth: usize,
    ) -> Result<(), Fail> {
        let depth = self.enter(depth)?;
        let (size, pairs) = H::pairs(term)?;
        // SAFETY: as in `push` (the contract); the 4 slots hold the table, a key, its value
        // and the lookup of `KeyKinds::admit`.
        unsafe {
            let t = self.new_table(l, size, Shape::Map)?;
            let mut seen = KeyKinds::default();
            for (k, v) in pairs {
                let k = k.borrow();
                self.meter.value(0)?;
                let kind = H::kind(k);
                let key_kind = key_kind(&kind);
                self.push_key(l, kind).map_err(|f| f.at(seg::<H>(k)))?;
                seen.admit(key_kind, l, t).map_err(|f| f.at(seg::<H>(k)))?;
                self.push::<H>(l, v.borrow(), depth)
                    .map_err(|f| f.at(seg::<H>(k)))?;
                ffi::lua_rawset(l, t);
            }
        }
        Ok(())
    }

    /// A new table for `n` entries on top of `l`, after the memory estimate and the stack
    /// check (the table and 2 more slots for a list's item, 3 for a map's key, value and
    /// lookup): its absolute index.
    ///
    /// # Safety
    /// As for [`Build::push`].
    unsafe fn new_table(
        &mut self,
        l: *mut ffi::lua_State,
        n: usize,
        shape: Shape,
    ) -> Result<c_int, Fail> {
        let (per_entry, slots) = match shape {
            Shape::List => (16, 3),
            Shape::Map => (40, 4),
        };
        self.reserve(n.saturating_mul(per_entry).saturating_add(LUA_VALUE_BYTES))?;
        let n = c_int::try_from(n).map_err(|_| Fail::new(FailKind::Memory))?;
        // SAFETY: the contract; `lua_checkstack` does not raise, and the table is created
        // (with the limit lifted) only in a slot it granted.
        unsafe {
            if ffi::lua_checkstack(l, slots) == 0 {
                return Err(stack_exhausted());
            }
            match shape {
                Shape::List => ffi::lua_createtable(l, n, 0),
                Shape::Map => ffi::lua_createtable(l, 0, n),
            }
            Ok(ffi::lua_gettop(l))
        }
    }

    /// Pushes a map key of `kind`.
    ///
    /// # Safety
    /// As for [`Build::push`].
    unsafe fn push_key<H: Host>(
        &mut self,
        l: *mut ffi::lua_State,
        kind: Kind<'_, H>,
    ) -> Result<(), Fail> {
        match kind {
            Kind::Nil => Err(invalid("nil cannot be a Lua table key")),
            // SAFETY: the contract.
            Kind::Bool(_)
            | Kind::Atom(_)
            | Kind::Int(_)
            | Kind::Float(_)
            | Kind::Bin(_)
            | Kind::Bad(_) => unsafe { self.push_scalar(l, kind, " key") },
            _ => Err(invalid(
                "map key must be a binary, atom, integer, float or boolean",
            )),
        }
    }

    /// Pushes a boolean, atom, integer, float or binary, as a value or a map key (`role` is
    /// `""` or `" key"`, for messages), or fails for any other kind. Lua turns float keys with
    /// an integer value into integers itself; NaN cannot come from Erlang.
    ///
    /// # Safety
    /// As for [`Build::push`].
    unsafe fn push_scalar<H: Host>(
        &mut self,
        l: *mut ffi::lua_State,
        kind: Kind<'_, H>,
        role: &str,
    ) -> Result<(), Fail> {
        // SAFETY: the contract: one free slot, the limit lifted (strings reserved first).
        unsafe {
            match kind {
                Kind::Bool(b) => ffi::lua_pushboolean(l, c_int::from(b)),
                Kind::Atom(name) => {
                    self.reserve(name.len() + LUA_VALUE_BYTES)?;
                    push_str(l, name.as_bytes());
                }
                Kind::Int(i) => ffi::lua_pushinteger(l, i),
                Kind::Float(f) => ffi::lua_pushnumber(l, f),
                Kind::Bin(bytes) => {
                    self.reserve(bytes.len() + LUA_VALUE_BYTES)?;
                    self.meter.value(bytes.len())?;
                    push_str(l, bytes);
                }
                Kind::Bad(bad) => return Err(bad.fail(role)),
                Kind::NotAValue(what) => {
                    return Err(invalid(&format!("{what} cannot become a Lua value")))
                }
                Kind::Invalid(what) => return Err(invalid(what)),
                _ => return Err(invalid("unsupported term")),
            }
        }
        Ok(())
    }
}
