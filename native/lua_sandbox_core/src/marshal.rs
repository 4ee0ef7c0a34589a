//! What both marshalings share — the NIF's (`native/lua_sandbox_nif/src/marshal/`, over rustler
//! terms) and the worker's (`native/lua_sandbox_worker/src/marshal.rs`, over the external term
//! format): the walks themselves, terms to Lua ([`push_globals`], [`push_values`], driven by
//! a [`Host`] that says what one of its terms is) and Lua to terms ([`read_values`],
//! [`read_value`], writing into a [`Sink`] that makes the host's terms); the bounds and what a
//! value costs against them, the meter that charges the conversion to the run's budget, the
//! failure with its path and its message, and the bookkeeping of a build (terms to Lua: memory
//! estimate, depth) and of a read (Lua to terms: bytes left, depth, cycles). Each host keeps
//! only what is its own term type's; the order of the checks, the costs and the messages are
//! here once, so the two isolations answer alike by construction.
//!
//! Soundness (both walks): no Lua API call made while marshaling may raise, because a raise
//! would `longjmp` over Rust frames that own heap values. Reading (`lua_next`, `lua_rawgeti`,
//! `lua_to*` on values of the right type, `lua_checkstack`) never raises. Writing could only
//! raise on allocation failure (keys are never nil or NaN), so a build runs with the memory
//! limit lifted, under [`building`] (the backstop, the collector paused), tracks the size
//! itself ([`Build`]) and checks the limit at the end. Only raw access is used: no metamethod
//! runs. A host's code runs inside the walks ([`Host`]'s methods, a [`Sink`]'s): it holds its
//! own values (a name, an iterator, a vector) only across these Lua calls that cannot raise,
//! and makes none that could.

use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hasher};

use crate::budget;
use crate::control::Abort;
use crate::error::SandboxError;
use crate::{ffi, protect};

mod to_host;
mod to_lua;

pub use to_host::{read_value, read_values, Sink};
pub use to_lua::{globals_push, push_globals, push_values, values_push, Bad, Host, Kind};

/// Fixed cost, in bytes, charged per value against `max_result_bytes` on top of string bytes.
pub const VALUE_COST: u64 = 8;

/// Estimated Lua heap bytes per value built from a term, for the early memory check.
pub const LUA_VALUE_BYTES: usize = 40;

/// The most values handed to a run at once (`call:` arguments). Lua's stack holds
/// `LUAI_MAXSTACK` (1 000 000) slots and the run coroutine's frames (runner, `xpcall`, the
/// `call:` dispatch) copy the arguments three times: 330 000 arguments still ran, 400 000
/// overflowed inside the prelude. The margin leaves the called function room of its own.
pub const MAX_VALUES: usize = 250_000;

/// Values converted between two calls to `budget::charge_steps` (the kill check): a few tens
/// of microseconds of work.
const CHARGE_BATCH: u64 = 1024;

/// Hashes a table pointer with one multiply: SipHash was 5% of a 1 MB result's conversion.
/// The keys are addresses the script cannot choose freely, and only the set's speed (not the
/// sandbox's safety) depends on their spread.
#[derive(Default)]
pub struct PtrHasher(u64);

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

/// A set of table addresses (the tables on the path being read).
pub type PtrSet = HashSet<*const c_void, BuildHasherDefault<PtrHasher>>;

/// Charges conversion work to the run's budget in batches; one step per value and the VM's
/// units for its string bytes (`budget::byte_units`, one per 16 bytes: a string is copied into
/// fresh memory, as costly a byte as when Lua builds one).
#[derive(Default)]
pub struct Meter {
    pending: u64,
    tables: u32,
    /// Tables left since the last check ([`Meter::left`]).
    left: u32,
}

/// Tables entered between two forced checks (`budget::charge_and_check`), whatever the
/// countdown says: a table is worth one unit like any value, but entering one recurses, and
/// the first walk this deep in an OS process touches its stack's pages for the first time —
/// 11–18 ms for a 10 000-deep result, ~1.8 µs a level, against 0.15 µs warm (bench/ANALYSIS.md,
/// issue 16), charged as if warm. A check every 64 tables bounds that to ~0.1 ms. The way back
/// up is checked as often ([`Meter::left`]): each table left makes its term (a list, a map)
/// or, on a failure, adds a step to its path, and a 10 000-deep result's return ran 0.7–1.1 ms
/// between two checks alone, 14 ms in a full-size stretch run.
const TABLES_PER_CHECK: u32 = 64;

impl Meter {
    pub fn value(&mut self, bytes: usize) -> Result<(), Fail> {
        self.pending += 1 + budget::byte_units(bytes);
        if self.pending >= CHARGE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// One table entered: a value, and a check every [`TABLES_PER_CHECK`] tables.
    pub fn table(&mut self) -> Result<(), Fail> {
        self.tables += 1;
        if self.tables >= TABLES_PER_CHECK {
            self.tables = 0;
            self.pending += 1;
            let steps = std::mem::take(&mut self.pending);
            return budget::charge_and_check(steps).map_err(|why| Fail::new(FailKind::Abort(why)));
        }
        self.value(0)
    }

    /// One table left (read, or failed): a check every [`TABLES_PER_CHECK`] tables, paying
    /// what is pending; nothing more is charged (the table was a value when entered).
    pub fn left(&mut self) -> Result<(), Fail> {
        self.left += 1;
        if self.left < TABLES_PER_CHECK {
            return Ok(());
        }
        self.left = 0;
        let steps = std::mem::take(&mut self.pending);
        budget::charge_and_check(steps).map_err(|why| Fail::new(FailKind::Abort(why)))
    }

    pub fn flush(&mut self) -> Result<(), Fail> {
        let steps = std::mem::take(&mut self.pending);
        budget::charge_steps(steps).map_err(|why| Fail::new(FailKind::Abort(why)))
    }
}

/// Pushes `item` on `v`, a host's scratch vector of a read (its terms, its entries). A full
/// vector of [`budget::PIECE`] bytes or more grows into a new block of twice its capacity,
/// its elements copied a piece at a time with a check between pieces: `Vec`'s own doubling
/// copies it whole and faults the new block in at once (a 10^5-entry table's three scratch
/// vectors doubling together: 2.7 ms between two checks, issue 16). On an abort `v` is left
/// as it was (the new block is dropped).
pub fn push_checked<T: Copy>(v: &mut Vec<T>, item: T) -> Result<(), Fail> {
    // Elements copied between two checks: a piece of bytes.
    let piece = (budget::PIECE / std::mem::size_of::<T>().max(1)).max(1);
    if v.len() == v.capacity() && v.len() >= piece {
        let mut grown = Vec::with_capacity(v.len() * 2);
        for piece in v.chunks(piece) {
            grown.extend_from_slice(piece);
            budget::charge_and_check(0).map_err(|why| Fail::new(FailKind::Abort(why)))?;
        }
        *v = grown;
    }
    v.push(item);
    Ok(())
}

/// One step of a path like `globals.ctx.items[3]`, for error messages.
#[derive(Clone, Debug)]
pub enum Seg {
    Key(String),
    Index(i64),
    Other(String),
}

/// What went wrong, and where: the path is collected on the way back up (innermost first), so
/// the common, successful case never builds path strings.
pub struct Fail {
    kind: FailKind,
    rev_path: Vec<Seg>,
}

pub enum FailKind {
    Invalid(String),
    Unsupported(String),
    Depth(usize),
    Size(u64),
    Cycle,
    Memory,
    /// The budget ran out, the caller died or the deadline passed during the conversion.
    Abort(Abort),
    /// A userdata the host cannot take, in words ("userdata", "a handle from another run or
    /// session"): a tool call refuses it catchably ([`Fail::into_args_error`]).
    Foreign(&'static str),
}

impl Fail {
    pub fn new(kind: FailKind) -> Fail {
        Fail {
            kind,
            rev_path: Vec::new(),
        }
    }

    /// The failure one level up, inside `seg`.
    pub fn at(mut self, seg: Seg) -> Fail {
        self.rev_path.push(seg);
        self
    }

    /// The error of a failed conversion whose path starts at `root`.
    pub fn into_error(self, root: &str) -> SandboxError {
        let path = self.path(root);
        match self.kind {
            FailKind::Invalid(what) => SandboxError::InvalidInput(format!("{what} at {path}")),
            FailKind::Unsupported(what) => SandboxError::UnsupportedValue(format!(
                "{what} cannot leave the sandbox (at {path})"
            )),
            FailKind::Foreign(what) => SandboxError::UnsupportedValue(format!(
                "{what} cannot leave the sandbox (at {path})"
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

    /// [`Fail::into_error`] for a tool call's arguments: a userdata the host cannot take is a
    /// refusal the script can catch; anything else ends the run.
    pub fn into_args_error(self, root: &str) -> ArgsError {
        match self.kind {
            FailKind::Foreign(what) => ArgsError::Refused(format!(
                "{what} cannot be passed to a tool (at {})",
                self.path(root)
            )),
            _ => ArgsError::Fatal(self.into_error(root)),
        }
    }

    fn path(&self, root: &str) -> String {
        let mut path = root.to_string();
        for seg in self.rev_path.iter().rev() {
            let _ = match seg {
                Seg::Key(k) if is_identifier(k) => write!(path, ".{k}"),
                Seg::Key(k) => write!(path, "[{k:?}]"),
                Seg::Index(i) => write!(path, "[{i}]"),
                Seg::Other(s) => write!(path, "[{s}]"),
            };
        }
        path
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub fn invalid(what: &str) -> Fail {
    Fail::new(FailKind::Invalid(what.to_string()))
}

pub fn unsupported(what: &str) -> Fail {
    Fail::new(FailKind::Unsupported(what.to_string()))
}

/// `lua_checkstack` refused: the value needs more Lua stack than a state may have.
fn stack_exhausted() -> Fail {
    invalid("Lua stack exhausted (value too large or too deeply nested)")
}

/// The path segment of a string key.
fn key_seg(bytes: &[u8]) -> Seg {
    Seg::Key(String::from_utf8_lossy(bytes).into_owned())
}

/// Limits for Lua -> term conversion.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub max_depth: usize,
    pub max_bytes: u64,
}

impl Bounds {
    /// A run's error object that is not a string travels as a value, bounded by these.
    pub const ERROR_VALUE: Bounds = Bounds {
        max_depth: 64,
        max_bytes: 1 << 20,
    };
}

/// How a tool call's arguments failed to convert.
pub enum ArgsError {
    /// The script passed what no tool can take but the run can go on from (a userdata that is
    /// not one of its handles): the message for a Lua error raised at the call.
    Refused(String),
    /// Anything else ends the run, as for results.
    Fatal(SandboxError),
}

/// Bytes the state's heap holds (Lua's own count).
///
/// # Safety
/// `l` must be a valid state.
unsafe fn used_memory(l: *mut ffi::lua_State) -> usize {
    // SAFETY: LUA_GCCOUNT/COUNTB only read the collector's counters of a valid state.
    unsafe {
        let kb = ffi::lua_gc(l, ffi::LUA_GCCOUNT, 0) as usize;
        let b = ffi::lua_gc(l, ffi::LUA_GCCOUNTB, 0) as usize;
        kb * 1024 + b
    }
}

/// Runs `f` under the backstop with the collector paused: where a build pushes values.
///
/// # Safety
/// `l` must not be running; `f` must not raise by construction (module doc).
unsafe fn building(
    l: *mut ffi::lua_State,
    mut f: impl FnMut(*mut ffi::lua_State),
) -> Result<(), SandboxError> {
    // SAFETY: per the contract.
    unsafe {
        protect::collector_paused(l, || protect::call_backstop(l, &mut f))
            .map_err(|e| SandboxError::Runtime(e.message))
    }
}

/// Pushes a string. Only called with the memory limit lifted (module doc).
///
/// # Safety
/// `l` must have a free stack slot and its memory limit lifted.
unsafe fn push_str(l: *mut ffi::lua_State, bytes: &[u8]) {
    // SAFETY: the caller checked the stack; `bytes` is valid for its length.
    unsafe { ffi::lua_pushlstring(l, bytes.as_ptr().cast(), bytes.len()) };
}

/// The bookkeeping of a build (terms to Lua values): the depth bound, the memory limit in force
/// outside the build and the heap's estimated size, and the meter.
struct Build {
    max_depth: usize,
    /// The memory limit in force outside the build (0: none).
    limit: usize,
    /// Heap size when the build started plus what it has added, estimated.
    estimate: usize,
    meter: Meter,
}

impl Build {
    /// A build on `l` under the memory `limit` (0: none) and `max_depth`.
    ///
    /// # Safety
    /// `l` must be a valid state.
    unsafe fn new(l: *mut ffi::lua_State, limit: usize, max_depth: usize) -> Build {
        Build {
            max_depth,
            limit,
            // SAFETY: the caller's contract.
            estimate: unsafe { used_memory(l) },
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

    /// After the build, with the limit back: the heap it left within the limit.
    ///
    /// # Safety
    /// `l` must be a valid state.
    unsafe fn check_memory(&self, l: *mut ffi::lua_State) -> Result<(), SandboxError> {
        // SAFETY: the caller's contract.
        if self.limit > 0 && unsafe { used_memory(l) } > self.limit {
            Err(SandboxError::MemoryLimit)
        } else {
            Ok(())
        }
    }

    /// One table deeper: the new depth, or the depth bound's failure.
    fn enter(&self, depth: usize) -> Result<usize, Fail> {
        if depth >= self.max_depth {
            Err(Fail::new(FailKind::Depth(self.max_depth)))
        } else {
            Ok(depth + 1)
        }
    }

    /// The `count` values about to be pushed fit Lua's stack: at most [`MAX_VALUES`], and the
    /// stack grown for them.
    ///
    /// # Safety
    /// `l` must be the thread being built on, inside [`building`].
    unsafe fn room_for(&self, l: *mut ffi::lua_State, count: usize) -> Result<(), Fail> {
        // SAFETY: `lua_checkstack` does not raise (module doc).
        if count > MAX_VALUES || unsafe { ffi::lua_checkstack(l, count as c_int + 4) } == 0 {
            return Err(invalid(&format!(
                "{count} values are more than Lua's stack allows (at most {MAX_VALUES})"
            )));
        }
        Ok(())
    }
}

/// The bookkeeping of a read (Lua values to terms): the bytes left of `max_result_bytes`, the
/// tables on the path (cycles), the depth bound, and the meter.
pub struct Tally {
    pub bounds: Bounds,
    bytes_left: u64,
    visiting: PtrSet,
    pub meter: Meter,
}

impl Tally {
    pub fn new(bounds: Bounds) -> Tally {
        Tally {
            bounds,
            bytes_left: bounds.max_bytes,
            visiting: PtrSet::default(),
            meter: Meter::default(),
        }
    }

    /// One value of `bytes` string bytes: charged to the budget, and with [`VALUE_COST`]
    /// against `max_result_bytes`.
    pub fn charge(&mut self, bytes: u64) -> Result<(), Fail> {
        self.meter.value(bytes as usize)?;
        self.spend(bytes.saturating_add(VALUE_COST))
    }

    /// A table entered: [`Tally::charge`] of a value, with the meter's check every
    /// [`TABLES_PER_CHECK`] tables ([`Meter::table`]).
    fn charge_table(&mut self) -> Result<(), Fail> {
        self.meter.table()?;
        self.spend(VALUE_COST)
    }

    /// `cost` bytes against `max_result_bytes` alone (a large string paid by the piece).
    pub fn spend(&mut self, cost: u64) -> Result<(), Fail> {
        if cost > self.bytes_left {
            self.bytes_left = 0;
            return Err(Fail::new(FailKind::Size(self.bounds.max_bytes)));
        }
        self.bytes_left -= cost;
        Ok(())
    }

    /// Enters the table at `ptr` at `depth`: a cycle or the depth bound is a failure.
    /// [`Tally::leave`] it afterwards, whatever the read's result.
    fn enter(&mut self, ptr: *const c_void, depth: usize) -> Result<(), Fail> {
        if self.visiting.contains(&ptr) {
            return Err(Fail::new(FailKind::Cycle));
        }
        if depth >= self.bounds.max_depth {
            return Err(Fail::new(FailKind::Depth(self.bounds.max_depth)));
        }
        self.visiting.insert(ptr);
        Ok(())
    }

    fn leave(&mut self, ptr: *const c_void) {
        self.visiting.remove(&ptr);
    }

    /// Enters the table at absolute index `idx` of `l` at `depth` for a read of its entries:
    /// [`Tally::enter`], stack room for a traversal (key, value and two more), and the table's
    /// own charge. Returns the table's address, to [`Tally::leave`] after the read; on a
    /// failure it has left already.
    ///
    /// # Safety
    /// `idx` must be a valid absolute index of `l` holding a table.
    unsafe fn enter_table(
        &mut self,
        l: *mut ffi::lua_State,
        idx: c_int,
        depth: usize,
    ) -> Result<*const c_void, Fail> {
        // SAFETY: the caller's contract; neither call raises (module doc).
        let ptr = unsafe { ffi::lua_topointer(l, idx) };
        self.enter(ptr, depth)?;
        // SAFETY: as above.
        let ready = if unsafe { ffi::lua_checkstack(l, 4) } == 0 {
            Err(stack_exhausted())
        } else {
            self.charge_table()
        };
        if let Err(f) = ready {
            self.leave(ptr);
            return Err(f);
        }
        Ok(ptr)
    }
}

/// Which kinds of keys a map has shown so far. Distinct terms only become one Lua key across
/// kinds (`"a"` and `:a`, `1` and `1.0`), so a lookup for a collision is only needed once the
/// other kind has been seen.
#[derive(Default)]
struct KeyKinds {
    strings: bool,
    atoms: bool,
    integers: bool,
    floats: bool,
}

/// A map key's kind, as [`KeyKinds`] tells them apart.
enum KeyKind {
    String,
    Atom,
    Integer,
    Float,
    Other,
}

impl KeyKinds {
    /// Records `kind`; true if a key of this kind could equal an earlier key in Lua.
    fn may_collide(&mut self, kind: KeyKind) -> bool {
        match kind {
            KeyKind::String => {
                self.strings = true;
                self.atoms
            }
            KeyKind::Atom => {
                self.atoms = true;
                self.strings
            }
            KeyKind::Integer => {
                self.integers = true;
                self.floats
            }
            KeyKind::Float => {
                self.floats = true;
                self.integers
            }
            KeyKind::Other => false,
        }
    }

    /// Records the kind of the key just pushed on top of `l` for the table at absolute index
    /// `t`, and refuses it when it is already a key there (two distinct terms that become one
    /// Lua key); the caller adds the key's path segment.
    ///
    /// # Safety
    /// `t` must be a valid absolute index of `l` holding a table, the key on top of the stack,
    /// one stack slot free; inside [`building`].
    unsafe fn admit(
        &mut self,
        kind: KeyKind,
        l: *mut ffi::lua_State,
        t: c_int,
    ) -> Result<(), Fail> {
        if !self.may_collide(kind) {
            return Ok(());
        }
        // SAFETY: the caller's contract; a raw lookup runs no metamethod and does not raise.
        let taken = unsafe {
            ffi::lua_pushvalue(l, -1);
            let taken = ffi::lua_rawget(l, t) != ffi::LUA_TNIL;
            ffi::lua_pop(l, 1);
            taken
        };
        if taken {
            Err(invalid("two map keys become the same Lua key"))
        } else {
            Ok(())
        }
    }
}
