//! Handle userdata: an unforgeable reference to a value the embedder keeps outside Lua.
//!
//! A handle is a full userdata holding the run's random token and an index into the embedder's
//! store (the NIF keeps Elixir terms there, see its `handles.rs`), with a hidden metatable that
//! only [`push`] attaches. Lua cannot create such a userdata, read or change what is inside (no
//! `debug` library; the metatable is hidden), or turn it into anything but itself; [`read`]
//! recognises only userdata with that metatable, and the embedder honours a handle only when
//! its token is the one it drew ([`Token`]): the NIF keeps the terms in its store, the worker of
//! `isolation: :process` keeps only the token (the BEAM keeps the terms, and checks the
//! indices the worker names).

use std::ffi::c_int;

use crate::ffi;
use crate::registry::Key;

/// What a handle's userdata holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    /// The store's token (never 0: see [`new_token`]).
    pub token: u64,
    /// The value's index in the store.
    pub index: u64,
}

/// A fresh random token for a store of handles (odd, so never 0).
pub fn new_token() -> u64 {
    crate::seed::random_pair().0 as u64 | 1
}

/// A store's token: drawn (from the kernel) with its first handle, so runs that pass none pay
/// nothing; copied into a forked session's store, so the handles in the copied state stay
/// valid there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Token(u64);

/// Why a userdata is not one of a store's handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOurs {
    /// Not a handle at all (e.g. `io.stdout`).
    NotAHandle,
    /// A handle, but made for another run or session (its token, or its index, is not ours).
    Elsewhere,
}

impl NotOurs {
    /// What the value is, in words (`marshal::FailKind::Foreign`).
    pub fn what(self) -> &'static str {
        match self {
            NotOurs::NotAHandle => "userdata",
            NotOurs::Elsewhere => "a handle from another run or session",
        }
    }
}

impl Token {
    /// The handle of the value at `index` of this store (drawing the token first, if this is
    /// the store's first handle).
    pub fn handle(&mut self, index: u64) -> Handle {
        if self.0 == 0 {
            self.0 = new_token();
        }
        Handle {
            token: self.0,
            index,
        }
    }

    /// The index of the handle at `idx`, if it is one of this store's (the embedder still
    /// checks that the index names a value it has).
    ///
    /// # Safety
    /// As for [`read`].
    pub unsafe fn index_of(&self, l: *mut ffi::lua_State, idx: c_int) -> Result<u64, NotOurs> {
        // SAFETY: per the contract.
        let handle = unsafe { read(l, idx) }.ok_or(NotOurs::NotAHandle)?;
        if self.0 == 0 || handle.token != self.0 {
            return Err(NotOurs::Elsewhere);
        }
        Ok(handle.index)
    }
}

/// Pushes a handle (a userdata with the handle metatable).
///
/// # Safety
/// As for the marshal builder: `l` is not running, has a free slot, and its memory limit is
/// lifted (so neither push raises); the state was built by `sandbox::new_slot`.
pub unsafe fn push(l: *mut ffi::lua_State, handle: Handle) {
    // SAFETY: per the contract; the userdata is exactly `Handle`-sized and aligned (Lua
    // aligns userdata memory to LUAI_MAXALIGN).
    unsafe {
        let ud = ffi::lua_newuserdatauv(l, std::mem::size_of::<Handle>(), 0);
        ud.cast::<Handle>().write(handle);
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::HandleMeta.ptr());
        ffi::lua_setmetatable(l, -2);
    }
}

/// The handle at `idx`, if the value there is one (a userdata with the handle metatable).
///
/// # Safety
/// `idx` must be a valid index of `l` holding a full userdata; `l` must have 2 free slots.
pub unsafe fn read(l: *mut ffi::lua_State, idx: c_int) -> Option<Handle> {
    // SAFETY: reads only: the metatable comparison uses raw access, and the payload is read
    // only from a userdata that carries our metatable, which only `push` gives.
    unsafe {
        if ffi::lua_getmetatable(l, idx) == 0 {
            return None;
        }
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::HandleMeta.ptr());
        let ours = ffi::lua_rawequal(l, -1, -2) != 0;
        ffi::lua_settop(l, -3);
        if !ours {
            return None;
        }
        Some(*ffi::lua_touserdata(l, idx).cast::<Handle>())
    }
}

/// `__tostring` of a handle.
pub(crate) unsafe extern "C-unwind" fn handle_tostring(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: pushes a literal (may raise on memory, with nothing Rust alive).
    unsafe {
        ffi::lua_pushstring(l, c"handle".as_ptr());
    }
    1
}
