//! Opaque handles: any Elixir term passed into a script as an unforgeable userdata.
//!
//! `LuaSandbox.handle(term)` is a `%LuaSandbox.Handle{}` struct; marshaling it in keeps the
//! term in the run's [`Handles`] (an `OwnedEnv`, so it survives tool-call suspensions) and
//! gives Lua a userdata holding the run's random token and the term's index, with a protected
//! metatable. Lua cannot create such a userdata, read or change what is inside (no `debug`
//! library; the metatable is hidden), or turn it into anything but itself. Marshaling out (a
//! tool's arguments, the results) gives the original term back — but only in the run that
//! made the handle — or, for a session, anywhere in the session's life: a session keeps its
//! [`Handles`] across calls (handles made by a call that is rolled back are forgotten with
//! it). A handle smuggled any other way does not match the token.

use std::cell::Cell;
use std::ffi::c_int;
use std::ptr;

use lua_sandbox_core::ffi;
use rustler::env::{OwnedEnv, SavedTerm};
use rustler::{Env, Term};

use crate::registry::Key;

/// The terms behind one run's handles.
pub struct Handles {
    token: u64,
    owned: Option<OwnedEnv>,
    saved: Vec<SavedTerm>,
}

impl Handles {
    /// No handles yet: the token is drawn (from the kernel) with the first one, so runs
    /// that pass none pay nothing.
    pub fn new() -> Handles {
        Handles {
            token: 0,
            owned: None,
            saved: Vec::new(),
        }
    }

    /// How many handles there are: a mark to roll back to with [`Handles::truncate`].
    pub fn mark(&self) -> usize {
        self.saved.len()
    }

    /// Forgets the handles made after `mark` (a session call that was rolled back: the
    /// userdata that pointed at them went with the state). The token stays: the handles made
    /// before remain valid.
    pub fn truncate(&mut self, mark: usize) {
        self.saved.truncate(mark);
    }
}

impl Handles {
    /// A copy for a forked session: the same token and the same terms (copied into an
    /// environment of its own), so the handles in the copied state stay valid in the fork.
    pub fn fork(&self) -> Handles {
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

/// What a handle's userdata holds.
#[repr(C)]
#[derive(Clone, Copy)]
struct Payload {
    token: u64,
    index: u64,
}

thread_local! {
    static ACTIVE: Cell<*mut Handles> = const { Cell::new(ptr::null_mut()) };
}

/// Makes `handles` the run's handle table on this thread until dropped.
pub struct Activation<'h> {
    previous: *mut Handles,
    _h: std::marker::PhantomData<&'h mut Handles>,
}

impl Activation<'static> {
    /// Activates the handles a run keeps in a `Box` (its address survives moves of the run).
    ///
    /// # Safety
    /// `handles` must stay valid (the box not dropped) while the activation lives, or at
    /// least until the last marshaling call made under it.
    pub unsafe fn new_raw(handles: *mut Handles) -> Activation<'static> {
        let previous = ACTIVE.with(|a| a.replace(handles));
        Activation {
            previous,
            _h: std::marker::PhantomData,
        }
    }
}

impl Drop for Activation<'_> {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
    }
}

fn with_active<R>(f: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    let p = ACTIVE.with(|a| a.get());
    if p.is_null() {
        return None;
    }
    // SAFETY: set by an `Activation` holding `&mut Handles` for its lifetime on this thread;
    // callers run strictly inside it and never re-enter.
    Some(f(unsafe { &mut *p }))
}

/// Pushes a handle for `term` (a userdata with the handle metatable).
///
/// # Safety
/// As for the marshal builder: `l` is not running, has a free slot, and its memory limit is
/// lifted (so neither push raises); the caller reserved the bytes.
pub unsafe fn push(l: *mut ffi::lua_State, term: Term) -> Result<(), &'static str> {
    let payload = with_active(|h| {
        if h.owned.is_none() {
            h.token = lua_sandbox_core::seed::random_pair().0 as u64 | 1;
        }
        let owned = h.owned.get_or_insert_with(OwnedEnv::new);
        h.saved.push(owned.save(term));
        Payload {
            token: h.token,
            index: (h.saved.len() - 1) as u64,
        }
    })
    .ok_or("handles can only be passed to a run")?;
    // SAFETY: per the contract; the userdata is exactly `Payload`-sized and aligned (Lua
    // aligns userdata memory to LUAI_MAXALIGN).
    unsafe {
        let ud = ffi::lua_newuserdatauv(l, std::mem::size_of::<Payload>(), 0);
        ud.cast::<Payload>().write(payload);
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::HandleMeta.ptr());
        ffi::lua_setmetatable(l, -2);
    }
    Ok(())
}

/// Why a userdata is not one of this run's handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOurs {
    /// Not a handle at all (e.g. `io.stdout`).
    NotAHandle,
    /// A handle, but made for another run or session (its token or index is not ours).
    Elsewhere,
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
    // SAFETY: reads only: the metatable comparison uses raw access, and the payload is read
    // only from a userdata that carries our metatable, which only `push` gives.
    let payload = unsafe {
        if ffi::lua_getmetatable(l, idx) == 0 {
            return Err(NotOurs::NotAHandle);
        }
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::HandleMeta.ptr());
        let ours = ffi::lua_rawequal(l, -1, -2) != 0;
        ffi::lua_settop(l, -3);
        if !ours {
            return Err(NotOurs::NotAHandle);
        }
        *ffi::lua_touserdata(l, idx).cast::<Payload>()
    };
    with_active(|h| {
        if h.token == 0 || payload.token != h.token {
            return None;
        }
        let saved = h.saved.get(payload.index as usize)?;
        let owned = h.owned.as_ref()?;
        Some(owned.run(|oenv| saved.load(oenv).in_env(env)))
    })
    .flatten()
    .ok_or(NotOurs::Elsewhere)
}

/// `__tostring` of a handle.
pub unsafe extern "C-unwind" fn handle_tostring(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: pushes a literal (may raise on memory, with nothing Rust alive).
    unsafe {
        ffi::lua_pushstring(l, c"handle".as_ptr());
    }
    1
}
