//! The run scope: everything one run owns that the VM, the C hooks and the builtins reach
//! while it executes — its budget ([`Control`]), its output ([`Output`], with the sink that
//! streams it), its handle store and the traceback of its error — and the one guard that makes
//! it the active run of a thread.
//!
//! A run is *active* on a thread while the call that executes it is on the stack. One
//! thread-local points at the active scope and its [`Caller`], so the instruction ticker, the
//! hardened builtins, the sandbox's C functions (`print`, `pcall`, `coroutine.resume`, ...)
//! and the marshaling code all see the same run without going through the Lua registry on the
//! hot path. One guard per activation: nothing of a run can be active without the rest.

use std::any::Any;
use std::cell::{Cell, RefCell, RefMut};
use std::marker::PhantomData;
use std::ptr;

use crate::control::{Caller, Control};
use crate::output::Output;

/// What one run owns. Boxed by its owner (a run, a compile), so its address is stable while an
/// [`Activation`] points at it; used from one thread at a time.
pub struct Scope {
    /// The budget: counters, limits, the sticky abort, the deadline, the CPU clock.
    pub control: Control,
    output: RefCell<Output>,
    /// The embedder's handle store (the NIF keeps Elixir terms there): opaque to the core.
    handles: RefCell<Option<Box<dyn Any + Send>>>,
    /// The traceback the runner's message handler saved for the run's error.
    traceback: RefCell<Option<String>>,
}

impl Scope {
    /// A scope with `control` as its budget and `output` as its output.
    pub fn new(control: Control, output: Output) -> Scope {
        Scope {
            control,
            output: RefCell::new(output),
            handles: RefCell::new(None),
            traceback: RefCell::new(None),
        }
    }

    /// A scope that only bounds work (a compile, a session's setup): its output is discarded.
    pub fn budget(control: Control) -> Scope {
        Scope::new(control, Output::discard())
    }

    /// Makes this scope the active run of this thread until the guard is dropped.
    ///
    /// `caller` is who the run works for (none in Rust tests); its env is only used for the
    /// liveness check and by the output sink, and only while the guard lives, which must be
    /// strictly inside the call that `caller` describes.
    pub fn activate(&self, caller: Caller) -> Activation<'_> {
        #[cfg(feature = "stretch")]
        crate::stretch::start();
        let previous = ACTIVE.with(|a| {
            a.replace(Active {
                scope: self as *const Scope,
                caller,
            })
        });
        Activation {
            previous,
            _scope: PhantomData,
        }
    }

    /// The run's output, for its owner between steps. Panics if the output is in use, which
    /// only the output hook does, while Lua runs.
    pub fn output(&self) -> RefMut<'_, Output> {
        self.output.borrow_mut()
    }

    /// The output, unless a hook has it (never while the owner holds it: hooks run in Lua).
    pub(crate) fn try_output(&self) -> Option<RefMut<'_, Output>> {
        self.output.try_borrow_mut().ok()
    }

    /// Gives the scope the embedder's handle store (kept until taken back).
    pub fn set_handles(&self, store: Box<dyn Any + Send>) {
        *self.handles.borrow_mut() = Some(store);
    }

    /// Takes the handle store back.
    pub fn take_handles(&self) -> Option<Box<dyn Any + Send>> {
        self.handles.borrow_mut().take()
    }

    /// Keeps the traceback of the run's error (the runner's message handler).
    pub(crate) fn save_traceback(&self, traceback: String) {
        *self.traceback.borrow_mut() = Some(traceback);
    }

    /// The traceback saved for the run's error, if any (taken: the next error saves its own).
    pub fn take_traceback(&self) -> Option<String> {
        self.traceback.borrow_mut().take()
    }
}

#[derive(Clone, Copy)]
struct Active {
    scope: *const Scope,
    caller: Caller,
}

thread_local! {
    static ACTIVE: Cell<Active> = const {
        Cell::new(Active { scope: ptr::null(), caller: Caller::none() })
    };
}

/// The guard of [`Scope::activate`]: the scope is the active run of this thread until dropped,
/// and the previously active one (if any) again after.
pub struct Activation<'s> {
    previous: Active,
    // Ties the activation to the borrow of the `Scope` it points at.
    _scope: PhantomData<&'s Scope>,
}

impl Drop for Activation<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "stretch")]
        crate::stretch::stop();
        ACTIVE.with(|a| a.set(self.previous));
    }
}

/// Runs `f` with the active scope and its caller, if a run is active on this thread.
pub fn with_active<R>(f: impl FnOnce(&Scope, Caller) -> R) -> Option<R> {
    let Active { scope, caller } = ACTIVE.with(|a| a.get());
    if scope.is_null() {
        return None;
    }
    // SAFETY: `scope` was set by an `Activation` whose lifetime is bounded by a borrow of the
    // `Scope` (see `Scope::activate`), and the activation is undone in its `Drop` before that
    // borrow ends; every caller of this function runs on this thread strictly inside that
    // window, so the pointer is valid. The scope is only reached through shared references:
    // `Cell`s and `RefCell`s, from this one thread.
    Some(f(unsafe { &*scope }, caller))
}

/// Runs `f` on the active run's handle store, if a run is active and its store is a `T`.
/// `None` also when the store is in use (a handle pushed while one is read: never happens).
pub fn with_handles<T: 'static, R>(f: impl FnOnce(&mut T) -> R) -> Option<R> {
    with_active(|scope, _| {
        let mut store = scope.handles.try_borrow_mut().ok()?;
        store.as_mut()?.downcast_mut::<T>().map(f)
    })
    .flatten()
}
