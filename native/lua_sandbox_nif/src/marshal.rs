//! Terms to Lua values and back, bounded in depth and size, with cycle detection.
//!
//! Both directions walk the Lua C API directly on the Lua stack.
//!
//! Soundness rests on one rule: no Lua API call made here may raise, because a raise would
//! `longjmp` over Rust frames that own heap values. Reading (`lua_next`, `lua_rawgeti`,
//! `lua_to*` on values of the right type, `lua_checkstack`) never raises. Writing could only
//! raise on allocation failure (keys are never nil or NaN), so `push_globals`/`push_values`
//! lift the memory limit while they build, track the size themselves, and restore the limit
//! before the script runs. Only raw access is used: no metamethod runs, no atom is created
//! from Lua data.
//!
//! Cost: both directions are O(values): the tables on the current path live in a hash set, and
//! each value (plus each KiB of string data) is charged to the run's budget as it is converted,
//! in batches, so `max_instructions`, a kill and a deadline stop a huge conversion within
//! milliseconds like any other work.

use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hasher};

use lua_sandbox_core::{ffi, protect};
use rustler::types::{ListIterator, MapIterator};
use rustler::{Encoder, Env, Term, TermType};

use crate::atoms;
use crate::budget::{self, Abort};
use crate::error::SandboxError;
use crate::handles::NotOurs;
use crate::term::binary_term;

/// Fixed cost, in bytes, charged per value against `max_result_bytes` on top of string bytes.
pub const VALUE_COST: u64 = 8;

/// Estimated Lua heap bytes per value built from a term, for the early memory check.
const LUA_VALUE_BYTES: usize = 40;

/// The most values `push_values` hands to a run (`call:` arguments). Lua's stack holds
/// `LUAI_MAXSTACK` (1 000 000) slots and the run coroutine's frames (runner, `xpcall`, the
/// `call:` dispatch) copy the arguments three times: 330 000 arguments still ran here, 400 000
/// overflowed inside the prelude. The margin leaves the called function room of its own.
pub const MAX_VALUES: usize = 250_000;

/// Hashes a table pointer with one multiply: SipHash was 5% of a 1 MB result's conversion.
/// The keys are addresses the script cannot choose freely, and only the set's speed (not the
/// sandbox's safety) depends on their spread.
#[derive(Default)]
struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        // Fibonacci hashing; the low bits of an aligned address are always zero.
        self.0 = (n as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type PtrSet = HashSet<*const c_void, BuildHasherDefault<PtrHasher>>;

/// Values converted between two calls to `budget::charge_steps` (the kill check): a few tens
/// of microseconds of work.
const CHARGE_BATCH: u64 = 1024;

/// Charges conversion work to the run's budget in batches; one step per value and one per
/// KiB of string data.
#[derive(Default)]
struct Meter {
    pending: u64,
}

impl Meter {
    fn value(&mut self, bytes: usize) -> Result<(), Fail> {
        self.pending += 1 + (bytes as u64 >> 10);
        if self.pending >= CHARGE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Fail> {
        let steps = std::mem::take(&mut self.pending);
        budget::charge_steps(steps).map_err(|why| Fail::new(FailKind::Abort(why)))
    }
}

/// One step of a path like `globals.ctx.items[3]`, for error messages.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(i64),
    Other(String),
}

/// What went wrong, and where: the path is collected on the way back up (innermost first), so
/// the common, successful case never builds path strings.
struct Fail {
    kind: FailKind,
    rev_path: Vec<Seg>,
}

enum FailKind {
    Invalid(String),
    Unsupported(String),
    Depth(usize),
    Size(u64),
    Cycle,
    Memory,
    /// The budget ran out, the caller died or the deadline passed during the conversion.
    Abort(Abort),
    /// A userdata that is not one of the run's handles.
    Foreign(NotOurs),
}

/// What a userdata the host cannot take is, in words.
fn foreign(why: NotOurs) -> &'static str {
    match why {
        NotOurs::NotAHandle => "userdata",
        NotOurs::Elsewhere => "a handle from another run or session",
    }
}

impl Fail {
    fn new(kind: FailKind) -> Fail {
        Fail {
            kind,
            rev_path: Vec::new(),
        }
    }

    fn at(mut self, seg: Seg) -> Fail {
        self.rev_path.push(seg);
        self
    }

    fn into_error(self, root: &str) -> SandboxError {
        let path = self.path(root);
        match self.kind {
            FailKind::Invalid(what) => SandboxError::InvalidInput(format!("{what} at {path}")),
            FailKind::Unsupported(what) => SandboxError::UnsupportedValue(format!(
                "{what} cannot leave the sandbox (at {path})"
            )),
            FailKind::Foreign(why) => SandboxError::UnsupportedValue(format!(
                "{} cannot leave the sandbox (at {path})",
                foreign(why)
            )),
            FailKind::Depth(max) => SandboxError::DepthLimit(format!(
                "value nested deeper than max_depth ({max}) at {path}"
            )),
            FailKind::Size(max) => SandboxError::SizeLimit(format!(
                "result larger than max_result_bytes ({max}) at {path}"
            )),
            FailKind::Cycle => SandboxError::Cycle(format!("table contains itself at {path}")),
            FailKind::Memory => SandboxError::MemoryLimit,
            FailKind::Abort(why) => SandboxError::from(why),
        }
    }

    fn path(&self, root: &str) -> String {
        let mut path = root.to_string();
        for seg in self.rev_path.iter().rev() {
            match seg {
                Seg::Key(k) if is_identifier(k) => {
                    let _ = write!(path, ".{k}");
                }
                Seg::Key(k) => {
                    let _ = write!(path, "[{k:?}]");
                }
                Seg::Index(i) => {
                    let _ = write!(path, "[{i}]");
                }
                Seg::Other(s) => {
                    let _ = write!(path, "[{s}]");
                }
            }
        }
        path
    }
}

fn invalid(what: &str) -> Fail {
    Fail::new(FailKind::Invalid(what.to_string()))
}

/// `lua_checkstack` refused: the value needs more Lua stack than a state may have.
fn stack_exhausted() -> Fail {
    invalid("Lua stack exhausted (value too large or too deeply nested)")
}

fn unsupported(what: &str) -> Fail {
    Fail::new(FailKind::Unsupported(what.to_string()))
}

fn key_seg(bytes: &[u8]) -> Seg {
    Seg::Key(String::from_utf8_lossy(bytes).into_owned())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// Elixir -> Lua

/// Sets each `(name, term)` as a global of `l`. Paths in errors start at `globals`.
///
/// # Safety
/// `l` must be a non-running state whose memory limit the caller lifted (see the module doc);
/// `limit` is the run's limit, checked here.
pub unsafe fn push_globals(
    l: *mut ffi::lua_State,
    globals: &[(String, Term)],
    max_depth: usize,
    limit: usize,
) -> Result<(), SandboxError> {
    if globals.is_empty() {
        return Ok(());
    }
    let mut result = Ok(());
    let mut builder = Builder::new(l, limit, max_depth);
    // SAFETY: nothing in the closure raises (module doc); the backstop catches the impossible.
    let outcome = unsafe {
        building(l, |l| {
            result = builder
                .set_globals(l, globals)
                .and_then(|()| builder.meter.flush());
        })
    };
    outcome?;
    result.map_err(|f| f.into_error("globals"))?;
    builder.check_memory(l)
}

/// Converts `terms` to Lua values, left on top of `l`'s stack; paths in errors start at
/// `root` and index from 1. Returns how many values were pushed.
///
/// # Safety
/// As for [`push_globals`].
pub unsafe fn push_values(
    l: *mut ffi::lua_State,
    terms: &[Term],
    max_depth: usize,
    root: &str,
    limit: usize,
) -> Result<c_int, SandboxError> {
    let mut result = Ok(());
    let mut builder = Builder::new(l, limit, max_depth);
    // SAFETY: `lua_gettop` only reads.
    let base = unsafe { ffi::lua_gettop(l) };
    // SAFETY: as in `push_globals`. The values left on the closure's stack are its results.
    let outcome = unsafe {
        building(l, |l| {
            result = builder
                .push_all(l, terms)
                .and_then(|()| builder.meter.flush());
            if result.is_err() {
                ffi::lua_settop(l, 0);
            }
        })
    };
    outcome?;
    result.map_err(|f| f.into_error(root))?;
    builder.check_memory(l)?;
    // SAFETY: only reads.
    Ok(unsafe { ffi::lua_gettop(l) } - base)
}

/// Runs `f` under the backstop with the collector paused (everything built is reachable
/// anyway; no finalizer may run), its pacing kept.
///
/// # Safety
/// `f` must not raise by construction.
unsafe fn building(
    l: *mut ffi::lua_State,
    mut f: impl FnMut(*mut ffi::lua_State),
) -> Result<(), SandboxError> {
    // SAFETY: `l` is not running (the caller's contract), so no collection step is either.
    unsafe {
        protect::collector_paused(l, || protect::call_backstop(l, &mut f))
            .map_err(|e| SandboxError::Runtime(e.message))
    }
}

/// Bytes the state's heap holds (Lua's own count).
pub(crate) fn used_memory(l: *mut ffi::lua_State) -> usize {
    // SAFETY: LUA_GCCOUNT/COUNTB only read the collector's counters.
    unsafe {
        let kb = ffi::lua_gc(l, ffi::LUA_GCCOUNT, 0) as usize;
        let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB, 0) as usize;
        kb * 1024 + b
    }
}

struct Builder {
    max_depth: usize,
    /// The memory limit in force outside the build (0: none).
    limit: usize,
    /// Heap size when the build started plus what it has added, estimated.
    estimate: usize,
    meter: Meter,
}

impl Builder {
    fn new(l: *mut ffi::lua_State, limit: usize, max_depth: usize) -> Builder {
        Builder {
            max_depth,
            limit,
            estimate: used_memory(l),
            meter: Meter::default(),
        }
    }

    /// Stops a build that would obviously exceed the memory limit before allocating it.
    fn reserve(&mut self, bytes: usize) -> Result<(), Fail> {
        self.estimate = self.estimate.saturating_add(bytes);
        if self.limit > 0 && self.estimate > self.limit {
            Err(Fail::new(FailKind::Memory))
        } else {
            Ok(())
        }
    }

    fn check_memory(&self, l: *mut ffi::lua_State) -> Result<(), SandboxError> {
        if self.limit > 0 && used_memory(l) > self.limit {
            Err(SandboxError::MemoryLimit)
        } else {
            Ok(())
        }
    }

    unsafe fn set_globals(
        &mut self,
        l: *mut ffi::lua_State,
        globals: &[(String, Term)],
    ) -> Result<(), Fail> {
        // SAFETY (whole fn): `l` is the running thread inside the backstop; each push is preceded
        // by a successful `lua_checkstack`; no call here raises (module doc).
        unsafe {
            if ffi::lua_checkstack(l, 4) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_GLOBALS);
            let g = ffi::lua_gettop(l);
            for (name, term) in globals {
                self.reserve(name.len() + LUA_VALUE_BYTES)?;
                push_str(l, name.as_bytes());
                self.push(l, *term, 0)
                    .map_err(|f| f.at(Seg::Key(name.clone())))?;
                ffi::lua_rawset(l, g);
            }
            ffi::lua_settop(l, g - 1);
        }
        Ok(())
    }

    unsafe fn push_all(&mut self, l: *mut ffi::lua_State, terms: &[Term]) -> Result<(), Fail> {
        // SAFETY: as in `set_globals`.
        unsafe {
            if terms.len() > MAX_VALUES || ffi::lua_checkstack(l, terms.len() as c_int + 4) == 0 {
                return Err(invalid(&format!(
                    "{} values are more than Lua's stack allows (at most {MAX_VALUES})",
                    terms.len()
                )));
            }
            for (i, term) in terms.iter().enumerate() {
                self.push(l, *term, 0)
                    .map_err(|f| f.at(Seg::Index(i as i64 + 1)))?;
            }
        }
        Ok(())
    }

    /// Pushes the Lua value for `term` (exactly one slot on success).
    unsafe fn push(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        depth: usize,
    ) -> Result<(), Fail> {
        self.meter.value(0)?;
        // SAFETY: as in `set_globals`; callers guarantee one free slot, tables check for more.
        unsafe {
            match term.get_type() {
                TermType::Atom if term == atoms::nil().to_term(term.get_env()) => {
                    ffi::lua_pushnil(l)
                }
                ty @ (TermType::Atom | TermType::Integer | TermType::Float | TermType::Binary) => {
                    self.push_scalar(l, term, ty, "")?
                }
                TermType::List => self.push_list(l, term, depth)?,
                TermType::Map => self.push_map(l, term, depth)?,
                TermType::Tuple => return Err(invalid("tuple cannot become a Lua value")),
                TermType::Pid => return Err(invalid("pid cannot become a Lua value")),
                TermType::Port => return Err(invalid("port cannot become a Lua value")),
                TermType::Ref => return Err(invalid("reference cannot become a Lua value")),
                TermType::Fun => return Err(invalid("function cannot become a Lua value")),
                TermType::Unknown => return Err(invalid("unsupported term")),
            }
        }
        Ok(())
    }

    fn enter(&self, depth: usize) -> Result<usize, Fail> {
        if depth >= self.max_depth {
            Err(Fail::new(FailKind::Depth(self.max_depth)))
        } else {
            Ok(depth + 1)
        }
    }

    unsafe fn push_list(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        depth: usize,
    ) -> Result<(), Fail> {
        let depth = self.enter(depth)?;
        let len = term.list_length().map_err(|_| invalid("improper list"))?;
        let iter: ListIterator = term.decode().map_err(|_| invalid("improper list"))?;
        self.reserve(len.saturating_mul(16).saturating_add(LUA_VALUE_BYTES))?;
        let narr = c_int::try_from(len).map_err(|_| Fail::new(FailKind::Memory))?;
        // SAFETY: as in `set_globals`.
        unsafe {
            if ffi::lua_checkstack(l, 3) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_createtable(l, narr, 0);
            let t = ffi::lua_gettop(l);
            for (i, item) in iter.enumerate() {
                let index = i as i64 + 1;
                self.push(l, item, depth)
                    .map_err(|f| f.at(Seg::Index(index)))?;
                ffi::lua_rawseti(l, t, index);
            }
        }
        Ok(())
    }

    unsafe fn push_map(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        depth: usize,
    ) -> Result<(), Fail> {
        if let Ok(name) = term.map_get(atoms::struct_key()) {
            if name == atoms::handle_struct().to_term(term.get_env()) {
                let inner = term
                    .map_get(atoms::term())
                    .map_err(|_| invalid("bad handle"))?;
                self.reserve(LUA_VALUE_BYTES)?;
                // SAFETY: as in `set_globals` (limit lifted, one slot free: callers check).
                return unsafe { crate::handles::push(l, inner) }.map_err(invalid);
            }
            let module = name.atom_to_string().unwrap_or_default();
            let module = module.strip_prefix("Elixir.").unwrap_or(&module);
            return Err(invalid(&format!(
                "struct {module} cannot become a Lua value (no LuaSandbox.Encoder)"
            )));
        }
        let depth = self.enter(depth)?;
        let size = term.map_size().unwrap_or(0);
        let iter = MapIterator::new(term).ok_or_else(|| invalid("bad map"))?;
        self.reserve(size.saturating_mul(40).saturating_add(LUA_VALUE_BYTES))?;
        let nrec = c_int::try_from(size).map_err(|_| Fail::new(FailKind::Memory))?;
        // SAFETY: as in `set_globals`.
        unsafe {
            if ffi::lua_checkstack(l, 4) == 0 {
                return Err(stack_exhausted());
            }
            ffi::lua_createtable(l, 0, nrec);
            let t = ffi::lua_gettop(l);
            // Distinct terms only become one Lua key across kinds (`"a"` and `:a`, `1` and
            // `1.0`), so the lookup is only needed once the other kind has been seen.
            let mut seen = KeyKinds::default();
            for (k, v) in iter {
                self.meter.value(0)?;
                let kind = k.get_type();
                self.push_key(l, k, kind).map_err(|f| f.at(term_seg(k)))?;
                if seen.may_collide(kind) {
                    ffi::lua_pushvalue(l, -1);
                    let taken = ffi::lua_rawget(l, t) != ffi::LUA_TNIL;
                    ffi::lua_pop(l, 1);
                    if taken {
                        let f = invalid("two map keys become the same Lua key");
                        return Err(f.at(term_seg(k)));
                    }
                }
                self.push(l, v, depth).map_err(|f| f.at(term_seg(k)))?;
                ffi::lua_rawset(l, t);
            }
        }
        Ok(())
    }

    /// Pushes a map key.
    unsafe fn push_key(
        &mut self,
        l: *mut ffi::lua_State,
        k: Term,
        kind: TermType,
    ) -> Result<(), Fail> {
        match kind {
            TermType::Atom if k == atoms::nil().to_term(k.get_env()) => {
                Err(invalid("nil cannot be a Lua table key"))
            }
            // SAFETY: `push_map` reserved the slot.
            ty @ (TermType::Atom | TermType::Integer | TermType::Float | TermType::Binary) => unsafe {
                self.push_scalar(l, k, ty, " key")
            },
            _ => Err(invalid(
                "map key must be a binary, atom, integer, float or boolean",
            )),
        }
    }

    /// Pushes a boolean, non-nil atom, integer, float or binary, as a value or a map key
    /// (`role` is `""` or `" key"`, for messages). Lua turns float keys with an integer value
    /// into integers itself; NaN cannot come from Erlang. `ty` is `term`'s type, which the
    /// caller has already asked the VM for.
    unsafe fn push_scalar(
        &mut self,
        l: *mut ffi::lua_State,
        term: Term,
        ty: TermType,
        role: &str,
    ) -> Result<(), Fail> {
        // SAFETY: as in `set_globals`; the caller guarantees one free slot.
        unsafe {
            match ty {
                TermType::Atom => {
                    if let Ok(b) = term.decode::<bool>() {
                        ffi::lua_pushboolean(l, c_int::from(b));
                    } else {
                        let name = term
                            .atom_to_string()
                            .map_err(|_| invalid(&format!("bad atom{role}")))?;
                        self.reserve(name.len() + LUA_VALUE_BYTES)?;
                        push_str(l, name.as_bytes());
                    }
                }
                TermType::Integer => match term.decode::<i64>() {
                    Ok(i) => ffi::lua_pushinteger(l, i),
                    Err(_) => {
                        return Err(invalid(&format!("integer{role} outside the 64-bit range")))
                    }
                },
                TermType::Float => {
                    let f: f64 = term
                        .decode()
                        .map_err(|_| invalid(&format!("bad float{role}")))?;
                    ffi::lua_pushnumber(l, f);
                }
                TermType::Binary => {
                    let bin: rustler::Binary = term
                        .decode()
                        .map_err(|_| invalid(&format!("bitstring{role}")))?;
                    self.reserve(bin.len() + LUA_VALUE_BYTES)?;
                    self.meter.value(bin.len())?;
                    push_str(l, bin.as_slice());
                }
                _ => return Err(invalid("unsupported term")),
            }
        }
        Ok(())
    }
}

/// Which kinds of keys a map has shown so far.
#[derive(Default)]
struct KeyKinds {
    strings: bool,
    atoms: bool,
    integers: bool,
    floats: bool,
}

impl KeyKinds {
    /// Records `kind`; true if a key of this kind could equal an earlier key in Lua.
    fn may_collide(&mut self, kind: TermType) -> bool {
        match kind {
            TermType::Binary => {
                self.strings = true;
                self.atoms
            }
            TermType::Atom => {
                self.atoms = true;
                self.strings
            }
            TermType::Integer => {
                self.integers = true;
                self.floats
            }
            TermType::Float => {
                self.floats = true;
                self.integers
            }
            _ => false,
        }
    }
}

/// The path segment of a map key term (only computed for error messages).
fn term_seg(k: Term) -> Seg {
    match k.get_type() {
        TermType::Binary => match k.decode::<rustler::Binary>() {
            Ok(b) => key_seg(b.as_slice()),
            Err(_) => Seg::Other("?".into()),
        },
        TermType::Atom => match k.atom_to_string() {
            Ok(a) if a == "true" || a == "false" => Seg::Other(a),
            Ok(a) => Seg::Key(a),
            Err(_) => Seg::Other("?".into()),
        },
        TermType::Integer => k.decode::<i64>().map_or(Seg::Other("?".into()), Seg::Index),
        _ => Seg::Other(format!("{k:?}")),
    }
}

/// Pushes a string. Only called with the memory limit lifted (see the module doc).
unsafe fn push_str(l: *mut ffi::lua_State, bytes: &[u8]) {
    // SAFETY: the caller checked the stack; `bytes` is valid for its length.
    unsafe {
        ffi::lua_pushlstring(l, bytes.as_ptr().cast(), bytes.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Lua -> Elixir

/// Limits for Lua -> Elixir conversion.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub max_depth: usize,
    pub max_bytes: u64,
}

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

/// How a tool call's arguments failed to convert.
pub enum ArgsError {
    /// The script passed what no tool can take but the run can go on from (a userdata that is
    /// not one of its handles): the message for a Lua error raised at the call.
    Refused(String),
    /// Anything else ends the run, as for results.
    Fatal(SandboxError),
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
    unsafe { read_values(env, l, first, n, bounds) }.map_err(|f| match f.kind {
        FailKind::Foreign(why) => ArgsError::Refused(format!(
            "{} cannot be passed to a tool (at {})",
            foreign(why),
            f.path(root)
        )),
        _ => ArgsError::Fatal(f.into_error(root)),
    })
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
        let result = result.and_then(|()| reader.meter.flush());
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
            .and_then(|term| reader.meter.flush().map(|()| term));
        ffi::lua_settop(l, top);
        r.map_err(|f| f.into_error(root))
    }
}

struct Reader<'e> {
    env: Env<'e>,
    bounds: Bounds,
    bytes_left: u64,
    /// The tables on the path from the root to the value being read.
    visiting: PtrSet,
    /// Scratch stacks shared by every table being read: each `read_entries` works above the
    /// length it found and truncates back, so tables cost no allocation of their own.
    keys: Vec<Term<'e>>,
    values: Vec<Term<'e>>,
    indices: Vec<i64>,
    meter: Meter,
}

impl<'e> Reader<'e> {
    fn new(env: Env<'e>, bounds: Bounds) -> Self {
        Reader {
            env,
            bounds,
            bytes_left: bounds.max_bytes,
            visiting: PtrSet::default(),
            keys: Vec::new(),
            values: Vec::new(),
            indices: Vec::new(),
            meter: Meter::default(),
        }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Fail> {
        self.meter.value(bytes as usize)?;
        let cost = bytes.saturating_add(VALUE_COST);
        if cost > self.bytes_left {
            self.bytes_left = 0;
            return Err(Fail::new(FailKind::Size(self.bounds.max_bytes)));
        }
        self.bytes_left -= cost;
        Ok(())
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
                ffi::LUA_TSTRING => {
                    let bytes = lua_bytes(l, idx);
                    self.charge(bytes.len() as u64)?;
                    Ok(binary_term(env, bytes))
                }
                ffi::LUA_TTABLE => self.read_table(l, idx, depth),
                ffi::LUA_TLIGHTUSERDATA
                    if ffi::lua_touserdata(l, idx).cast_const() == crate::sandbox::json_null() =>
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
                        Err(why) => Err(Fail::new(FailKind::Foreign(why))),
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
            let ptr = ffi::lua_topointer(l, idx);
            if self.visiting.contains(&ptr) {
                return Err(Fail::new(FailKind::Cycle));
            }
            if depth >= self.bounds.max_depth {
                return Err(Fail::new(FailKind::Depth(self.bounds.max_depth)));
            }
            if ffi::lua_checkstack(l, 4) == 0 {
                return Err(stack_exhausted());
            }
            self.charge(0)?;

            self.visiting.insert(ptr);
            let result = self.read_entries(l, idx, depth + 1);
            self.visiting.remove(&ptr);
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
                        let bytes = lua_bytes(l, -2);
                        self.charge(bytes.len() as u64)?;
                        binary_term(env, bytes)
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
