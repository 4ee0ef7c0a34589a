//! Sessions: a sandboxed state that lives across calls, with rollback.
//!
//! A [`Session`] owns a slot for its whole life: its state-wide setup is done once
//! (`exec::prepare_state`), and each call runs a new run coroutine in that same state. A call
//! borrows the session ([`Session::lend`] gives a [`Loan`], the `exec::Lent` of a
//! `Home::Session` run): before it starts, the slot's used prefix is copied aside (a checkpoint,
//! the same `memcpy` machinery as fresh states); when the call ends in any error — a script
//! error, a limit, the caller's death, also while parked at a tool call — the checkpoint is
//! copied back, so the session is exactly as it was before the call, its handle store included.
//! Without rollback a failed call keeps what it changed, as Lua would. When the loan ends the
//! session goes back to whoever keeps it (the NIF: its resource).

use std::any::Any;

use crate::exec::Lent;
use crate::pool::Lease;
use crate::{ffi, Slot};

/// The embedder's handle store, as far as rollback needs it.
pub trait Store: Any + Send + Default {
    /// How many handles there are: a mark to roll back to.
    fn mark(&self) -> usize;
    /// Forgets the handles made after `mark` (their userdata went with the rolled-back state).
    fn truncate(&mut self, mark: usize);
}

/// No handles (a session whose embedder has none).
impl Store for () {
    fn mark(&self) -> usize {
        0
    }
    fn truncate(&mut self, _mark: usize) {}
}

/// A state kept across calls, with its counters and handle store.
pub struct Session<H: Store> {
    lease: Lease,
    /// The slot's used prefix before the current call (reused buffer).
    checkpoint: Vec<u8>,
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
    /// A session in `lease`'s state (set up by the caller).
    pub fn new(lease: Lease) -> Session<H> {
        Session {
            lease,
            checkpoint: Vec::new(),
            calls: 0,
            instructions: 0,
            rollbacks: 0,
            handles: Some(Box::default()),
        }
    }

    pub fn slot(&self) -> &Slot {
        self.lease.slot()
    }

    /// Lends the session to one call: the slot's peak is reset and, with `rollback`, a
    /// checkpoint taken. Returns the loan (for `Home::Session`) and the handle store (for the
    /// call's scope); `give_back` receives the session when the loan ends.
    pub fn lend(
        mut self,
        rollback: bool,
        give_back: impl FnOnce(Session<H>) + Send + 'static,
    ) -> (Loan<H>, Box<dyn Any + Send>) {
        self.lease.slot_mut().reset_peak();
        if rollback {
            self.lease.slot().checkpoint(&mut self.checkpoint);
        }
        let handles = self.handles.take().unwrap_or_default();
        let loan = Loan {
            handles_mark: handles.mark(),
            session: Some(self),
            give_back: Some(Box::new(give_back)),
            rollback,
            ok: false,
            instructions: 0,
            discarded: false,
        };
        (loan, handles)
    }

    /// Copies the checkpoint back and forgets the call's handles.
    fn roll_back(&mut self, handles_mark: usize) {
        self.lease.slot_mut().rollback(&self.checkpoint);
        if let Some(handles) = self.handles.as_mut() {
            handles.truncate(handles_mark);
        }
    }
}

/// A session lent to one call; given back when the call ends (in `Drop`), rolled back first
/// unless the call succeeded or rollback is off.
pub struct Loan<H: Store> {
    session: Option<Session<H>>,
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
    fn session(&self) -> &Session<H> {
        self.session
            .as_ref()
            .expect("a loan holds the session until dropped")
    }

    fn session_mut(&mut self) -> &mut Session<H> {
        self.session
            .as_mut()
            .expect("a loan holds the session until dropped")
    }
}

impl<H: Store> Lent for Loan<H> {
    fn slot(&self) -> &Slot {
        self.session().lease.slot()
    }

    fn slot_mut(&mut self) -> &mut Slot {
        self.session_mut().lease.slot_mut()
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
        let (Some(mut session), Some(give_back)) = (self.session.take(), self.give_back.take())
        else {
            return;
        };
        if session.handles.is_none() {
            // Never given back (a run that did not end normally): a fresh store, as the
            // handles made before are unreachable anyway.
            session.handles = Some(Box::default());
        }
        if self.discarded {
            // A first attempt runs only with rollback on: the checkpoint is there.
            session.roll_back(self.handles_mark);
            give_back(session);
            return;
        }
        if self.rollback && !self.ok {
            session.roll_back(self.handles_mark);
            session.rollbacks += 1;
        } else {
            let l = session.lease.slot().state();
            // SAFETY: the call is over (finished, or abandoned while suspended): nothing runs
            // on the state; dropping the main stack's values (the run coroutine) never raises.
            unsafe { ffi::lua_settop(l, 0) };
        }
        session.calls += 1;
        session.instructions += self.instructions;
        give_back(session);
    }
}
