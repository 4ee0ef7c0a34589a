//! Handle userdata: an unforgeable reference to a value the embedder keeps outside Lua.
//!
//! A handle is a full userdata holding the run's random token and an index into the embedder's
//! store (the NIF keeps Elixir terms there, see its `handles.rs`), with a hidden metatable that
//! only [`push`] attaches. Lua cannot create such a userdata, read or change what is inside (no
//! `debug` library; the metatable is hidden), or turn it into anything but itself; [`read`]
//! recognises only userdata with that metatable, and the embedder honours a handle only when
//! its token is the one it drew.

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
