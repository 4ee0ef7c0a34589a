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
use crate::handles::NotOurs;
use crate::term::{binary_term, binary_term_charged, PIECE};
use lua_sandbox_core::error::SandboxError;

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

mod to_lua;
mod to_term;

pub use to_lua::{push_globals, push_values};
pub use to_term::{to_term, to_terms, tool_args, ArgsError, Bounds};
