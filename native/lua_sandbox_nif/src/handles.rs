//! Opaque handles: any Elixir term passed into a script as an unforgeable userdata.
//!
//! `LuaSandbox.handle(term)` is a `%LuaSandbox.Handle{}` struct; marshaling it in keeps the
//! term in the run's [`Handles`] (an `OwnedEnv`, so it survives tool-call suspensions) and
//! gives Lua the core's handle userdata (`lua_sandbox_core::handle`) holding the run's random
//! token and the term's index. Marshaling out (a
//! tool's arguments, the results) gives the original term back — but only in the run that
//! made the handle — or, for a session, anywhere in the session's life: a session keeps its
//! [`Handles`] across calls (handles made by a call that is rolled back are forgotten with
//! it). A handle smuggled any other way does not match the token.

use std::ffi::c_int;

use lua_sandbox_core::ffi;
pub use lua_sandbox_core::handle::NotOurs;
use lua_sandbox_core::handle::{self, Token};
use lua_sandbox_core::session::Store;
use rustler::env::{OwnedEnv, SavedTerm};
use rustler::{Env, Term};

/// The terms behind one run's handles.
pub struct Handles {
    token: Token,
    owned: Option<OwnedEnv>,
    saved: Vec<SavedTerm>,
}

impl Handles {
    /// No handles yet (the token is drawn with the first one: [`Token`]).
    pub fn new() -> Handles {
        Handles {
            token: Token::default(),
            owned: None,
            saved: Vec::new(),
        }
    }
}

impl Store for Handles {
    /// How many handles there are: a mark to roll back to.
    fn mark(&self) -> usize {
        self.saved.len()
    }

    /// Forgets the handles made after `mark` (a session call that was rolled back: the
    /// userdata that pointed at them went with the state). The token stays: the handles made
    /// before remain valid.
    fn truncate(&mut self, mark: usize) {
        self.saved.truncate(mark);
    }

    /// A copy for a forked session: the same token and the same terms (copied into an
    /// environment of its own), so the handles in the copied state stay valid in the fork.
    fn fork(&self) -> Handles {
        let Some(owned) = &self.owned else {
            return Handles::new();
        };
        let copy = OwnedEnv::new();
        let saved = self
            .saved
            .iter()
            .map(|saved| owned.run(|env| copy.save(saved.load(env))))
            .collect();
        Handles {
            token: self.token,
            owned: Some(copy),
            saved,
        }
    }
}

impl Default for Handles {
    fn default() -> Handles {
        Handles::new()
    }
}

/// Runs `f` on the handle store of the active run (lent to its scope, see `run.rs`).
fn with_active<R>(f: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    lua_sandbox_core::scope::with_handles::<Handles, R>(f)
}

/// The handle for `term`, kept in the active run's store (the core's marshal walk pushes it);
/// `None` outside a run.
pub fn adopt(term: Term) -> Option<handle::Handle> {
    with_active(|h| {
        let owned = h.owned.get_or_insert_with(OwnedEnv::new);
        h.saved.push(owned.save(term));
        h.token.handle((h.saved.len() - 1) as u64)
    })
}

/// The term behind the handle at `idx`, if it is one of this run's handles.
///
/// # Safety
/// `idx` must be a valid index of `l` holding a full userdata; `l` must have 2 free slots.
pub unsafe fn read<'e>(
    env: Env<'e>,
    l: *mut ffi::lua_State,
    idx: c_int,
) -> Result<Term<'e>, NotOurs> {
    // No store (never in a run): no handle is ours.
    let token = with_active(|h| h.token).unwrap_or_default();
    // SAFETY: per the contract.
    let index = unsafe { token.index_of(l, idx) }?;
    with_active(|h| {
        let saved = h.saved.get(index as usize)?;
        let owned = h.owned.as_ref()?;
        Some(owned.run(|oenv| saved.load(oenv).in_env(env)))
    })
    .flatten()
    .ok_or(NotOurs::Elsewhere)
}
