//! Sessions: a sandboxed state that lives across calls, with rollback.
//!
//! A [`Session`] owns a slot for its whole life — shared with its forks, which take turns in it
//! (`family.rs`): its state-wide setup is done once (`exec::prepare_state`), and each call
//! runs a new run coroutine in that same state. A call borrows the session ([`Session::lend`]
//! gives a [`Loan`], the `exec::Lent` of a `Home::Session` run): before it starts, the slot
//! takes a checkpoint (`Slot::checkpoint`: a copy of the used prefix, kept up to date from the
//! pages written once the state passes 1 MiB); when the call ends in any error — a script
//! error, a limit, the caller's death, also while parked at a tool call — the slot rolls back to
//! it, so the session is exactly as it was before the call, its handle store included.
//! Without rollback a failed call keeps what it changed, as Lua would. When the loan ends the
//! session goes back to whoever keeps it (the NIF: its resource).
//!
//! The checkpoint and the family's images are copies on the host's heap, as large as the
//! state: they are reserved fallibly, and one the allocator refuses refuses the call before it
//! runs ([`NotLent::Refused`]) — a call that needs a rollback point never runs without one —
//! or the fork, with the session as it was. The embedders answer it `:memory_limit`.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use crate::control::{Caller, Control};
use crate::error::SandboxError;
use crate::exec::{self, Home, Lent, Limits, Run};
use crate::family::Family;
use crate::output::Print;
use crate::pool::Lease;
use crate::scope::Scope;
use crate::slot::CopyRefused;
use crate::{ffi, Slot};

/// The embedder's handle store, as far as rollback needs it.
pub trait Store: Any + Send + Default {
    /// How many handles there are: a mark to roll back to.
    fn mark(&self) -> usize;
    /// Forgets the handles made after `mark` (their userdata went with the rolled-back state).
    fn truncate(&mut self, mark: usize);
    /// A copy for a forked session: the handles in the copied state stay valid in the fork.
    fn fork(&self) -> Self;
}

/// No handles (a session whose embedder has none).
impl Store for () {
    fn mark(&self) -> usize {
        0
    }
    fn truncate(&mut self, _mark: usize) {}
    fn fork(&self) {}
}

/// Why a session was not lent to a call: it comes back with the reason.
pub enum NotLent<H: Store> {
    /// A call of its family has the slot (try again).
    ArenaBusy(Session<H>),
    /// A copy the call needs — the other member's image to make room, the checkpoint — could
    /// not get its memory. Nothing ran; the session is as it was (its state may now be the one
    /// in the slot, which changes nothing it can see).
    Refused(Session<H>, CopyRefused),
}

/// A state kept across calls, with its counters and handle store.
pub struct Session<H: Store> {
    /// The slot this session shares with its forks, and its place in it.
    family: Arc<Family>,
    id: u64,
    /// Calls made (a thrown-away first attempt is not one).
    pub calls: u64,
    /// Instructions all calls used.
    pub instructions: u64,
    /// Calls rolled back.
    pub rollbacks: u64,
    /// The handle store: valid for the session's life; lent to each call's scope.
    handles: Option<Box<H>>,
}

impl<H: Store> Session<H> {
    /// A session in `lease`'s state (set up by the caller), with the handles its setup made.
    pub fn new(lease: Lease, handles: Box<H>) -> Session<H> {
        let (family, id) = Family::new(lease);
        Session {
            family,
            id,
            calls: 0,
            instructions: 0,
            rollbacks: 0,
            handles: Some(handles),
        }
    }

    /// Builds a session in `lease`'s pristine state, the one way both embedders (the NIF, the
    /// worker) start one: `setup` does the state-wide setup (`exec::prepare_state`) under a
    /// scope with no instruction budget (memory bounds the globals) whose kill check asks
    /// `caller` (so its death stops a huge conversion of globals). The handles the setup made
    /// are the session's, for its life.
    pub fn build(
        mut lease: Lease,
        caller: Caller,
        setup: impl FnOnce(&mut Slot) -> Result<(), SandboxError>,
    ) -> Result<Session<H>, SandboxError> {
        let scope = Scope::budget(Control::new(u64::MAX));
        scope.set_handles(Box::new(H::default()));
        let state = lease.slot().state();
        // SAFETY: `scope` lives until the end of this function, past `setup`; the leased state
        // outlives it (the lease moves into the session after the scope's last use).
        unsafe { exec::under_scope(&scope, caller, state, || setup(lease.slot_mut())) }?;
        let handles = scope
            .take_handles()
            .and_then(|h| h.downcast::<H>().ok())
            .unwrap_or_default();
        Ok(Session::new(lease, handles))
    }

    /// Starts one call: lends the session ([`Session::lend`]) and assembles the call's run
    /// in its state (`Home::Session`), with the session's handles lent to the run. `Err` gives
    /// the session back when it could not be lent ([`NotLent`]).
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        self,
        rollback: bool,
        checkpoint: bool,
        give_back: impl FnOnce(Session<H>) + Send + 'static,
        limits: Limits,
        print: Print,
        chunk_name: String,
        t0: Instant,
    ) -> Result<Run, NotLent<H>> {
        let (loan, handles) = self.lend(rollback, checkpoint, give_back)?;
        Ok(Run::new(
            Home::Session(Box::new(loan)),
            limits,
            print,
            chunk_name,
            Some(handles),
            t0,
        ))
    }

    /// Bytes the session's state holds; `None` while a call of its family has the slot.
    pub fn used(&self) -> Option<usize> {
        self.family.used(self.id)
    }

    /// A new session holding a copy of this one's state and handles, independent from then on
    /// (its counters start at zero); `Ok(None)` while a call of the family has the slot with
    /// this session's state in it; `Err` when the copy could not get its memory (no fork).
    pub fn fork(&self) -> Result<Option<Session<H>>, CopyRefused> {
        let Some(id) = self.family.fork(self.id)? else {
            return Ok(None);
        };
        Ok(Some(Session {
            family: self.family.clone(),
            id,
            calls: 0,
            instructions: 0,
            rollbacks: 0,
            handles: Some(Box::new(
                self.handles.as_deref().map(H::fork).unwrap_or_default(),
            )),
        }))
    }

    /// Lends the session to one call: the slot (with this session's state in it) gets its peak
    /// reset and, with `checkpoint`, a checkpoint. Returns the loan (for `Home::Session`) and
    /// the handle store (for the call's scope); `give_back` receives the session when the loan
    /// ends. `Err` gives the session back when a call of its family has the slot, or when a
    /// copy the call needs could not get its memory: a checkpoint that cannot be taken refuses
    /// the call (it does not run without its rollback point).
    ///
    /// `rollback` says whether a failed call is rolled back; `checkpoint` must be true with it,
    /// and for a first attempt that may be thrown away ([`Lent::discard`]).
    #[allow(clippy::type_complexity)]
    pub fn lend(
        mut self,
        rollback: bool,
        checkpoint: bool,
        give_back: impl FnOnce(Session<H>) + Send + 'static,
    ) -> Result<(Loan<H>, Box<dyn Any + Send>), NotLent<H>> {
        let mut lease = match self.family.take(self.id) {
            Ok(Some(lease)) => lease,
            Ok(None) => return Err(NotLent::ArenaBusy(self)),
            Err(refused) => return Err(NotLent::Refused(self, refused)),
        };
        lease.slot_mut().reset_peak();
        if rollback || checkpoint {
            if let Err(refused) = lease.slot_mut().checkpoint() {
                self.family.give_back(lease);
                return Err(NotLent::Refused(self, refused));
            }
        }
        let handles = self.handles.take().unwrap_or_default();
        let loan = Loan {
            handles_mark: handles.mark(),
            session: Some(self),
            lease: Some(lease),
            give_back: Some(Box::new(give_back)),
            rollback,
            ok: false,
            instructions: 0,
            discarded: false,
        };
        Ok((loan, handles))
    }

    /// Forgets the call's handles (the state was rolled back).
    fn truncate_handles(&mut self, handles_mark: usize) {
        if let Some(handles) = self.handles.as_mut() {
            handles.truncate(handles_mark);
        }
    }
}

impl<H: Store> Drop for Session<H> {
    fn drop(&mut self) {
        self.family.leave(self.id);
    }
}

/// A session lent to one call; given back when the call ends (in `Drop`), rolled back first
/// unless the call succeeded or rollback is off.
pub struct Loan<H: Store> {
    session: Option<Session<H>>,
    /// The family's slot with this session's state in it, for the call.
    lease: Option<Lease>,
    give_back: Option<Box<dyn FnOnce(Session<H>) + Send>>,
    rollback: bool,
    ok: bool,
    instructions: u64,
    /// The handle count before the call (rolled back with the state).
    handles_mark: usize,
    /// A first attempt thrown away: rolled back, not counted.
    discarded: bool,
}

impl<H: Store> Loan<H> {
    fn lease(&self) -> &Lease {
        self.lease
            .as_ref()
            .expect("a loan holds the slot until dropped")
    }

    fn session_mut(&mut self) -> &mut Session<H> {
        self.session
            .as_mut()
            .expect("a loan holds the session until dropped")
    }
}

impl<H: Store> Lent for Loan<H> {
    fn slot(&self) -> &Slot {
        self.lease().slot()
    }

    fn slot_mut(&mut self) -> &mut Slot {
        self.lease
            .as_mut()
            .expect("a loan holds the slot until dropped")
            .slot_mut()
    }

    fn succeeded(&mut self) {
        self.ok = true;
    }

    fn record(&mut self, instructions: u64) {
        self.instructions = instructions;
    }

    fn discard(&mut self) {
        self.discarded = true;
        self.ok = false;
    }

    fn give_back_handles(&mut self, handles: Box<dyn Any + Send>) {
        if let Ok(handles) = handles.downcast::<H>() {
            self.session_mut().handles = Some(handles);
        }
    }
}

impl<H: Store> Drop for Loan<H> {
    fn drop(&mut self) {
        let (Some(mut session), Some(mut lease), Some(give_back)) = (
            self.session.take(),
            self.lease.take(),
            self.give_back.take(),
        ) else {
            return;
        };
        if session.handles.is_none() {
            // Never given back (a run that did not end normally): a fresh store, as the
            // handles made before are unreachable anyway.
            session.handles = Some(Box::default());
        }
        let slot = lease.slot_mut();
        if self.discarded {
            // An attempt always took a checkpoint (`lend`): thrown away, not counted.
            slot.rollback();
            session.truncate_handles(self.handles_mark);
        } else {
            if self.rollback && !self.ok {
                slot.rollback();
                session.truncate_handles(self.handles_mark);
                session.rollbacks += 1;
            } else {
                // SAFETY: the call is over (finished, or abandoned while suspended): nothing
                // runs on the state; dropping the main stack's values (the run coroutine)
                // never raises.
                unsafe { ffi::lua_settop(slot.state(), 0) };
            }
            session.calls += 1;
            session.instructions += self.instructions;
        }
        session.family.give_back(lease);
        give_back(session);
    }
}
