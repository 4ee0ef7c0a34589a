//! Terms to Lua values and back, bounded in depth and size, with cycle detection: the core's
//! walks (`lua_sandbox_core::marshal`, shared with the worker), which own the order of the
//! checks, the bounds, the meter, the failures and their messages, and the soundness rule (no
//! Lua API call made while marshaling may raise). This module is the rustler side: what a term
//! is for the walk to Lua ([`Nif`], `to_lua.rs`) and the terms the walk from Lua makes
//! (`to_term.rs`). No atom is created from Lua data.
//!
//! Cost: both directions are O(values): the tables on the current path live in a hash set, and
//! each value (plus a unit per 16 bytes of string data, as the VM charges) is charged to the
//! run's budget as it is converted, in batches, so `max_instructions`, a kill and a deadline
//! stop a huge conversion within milliseconds like any other work.

use std::ffi::c_int;

use lua_sandbox_core::ffi;
use lua_sandbox_core::marshal::{invalid, unsupported, Fail, FailKind, Tally};
use rustler::types::{ListIterator, MapIterator};
use rustler::{Encoder, Env, Term, TermType};

use crate::atoms;
use crate::term::{binary_term, binary_term_charged, list_checked, PIECE};
use lua_sandbox_core::error::SandboxError;

mod to_lua;
mod to_term;

pub use lua_sandbox_core::marshal::{globals_push, values_push};
pub use lua_sandbox_core::marshal::{ArgsError, Bounds};
pub use to_lua::Nif;
pub use to_term::{to_term, to_terms};
