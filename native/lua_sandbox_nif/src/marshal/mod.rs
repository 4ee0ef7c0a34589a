//! Terms to Lua values and back, bounded in depth and size, with cycle detection.
//!
//! Both directions walk the Lua C API directly on the Lua stack. The bounds, the meter, the
//! failures and their messages, and the soundness rule (no Lua API call made here may raise)
//! are the core's (`lua_sandbox_core::marshal`), shared with the worker's marshaling; this
//! module walks rustler terms. No atom is created from Lua data.
//!
//! Cost: both directions are O(values): the tables on the current path live in a hash set, and
//! each value (plus each KiB of string data) is charged to the run's budget as it is converted,
//! in batches, so `max_instructions`, a kill and a deadline stop a huge conversion within
//! milliseconds like any other work.

use std::ffi::c_int;

use lua_sandbox_core::ffi;
use lua_sandbox_core::marshal::{invalid, unsupported, Fail, FailKind, Tally};
use rustler::types::{ListIterator, MapIterator};
use rustler::{Encoder, Env, Term, TermType};

use crate::atoms;
use crate::term::{binary_term, binary_term_charged, PIECE};
use lua_sandbox_core::error::SandboxError;

mod to_lua;
mod to_term;

pub use lua_sandbox_core::marshal::{push_globals, push_values};
pub use lua_sandbox_core::marshal::{ArgsError, Bounds};
pub use to_lua::Nif;
pub use to_term::{to_term, to_terms};
