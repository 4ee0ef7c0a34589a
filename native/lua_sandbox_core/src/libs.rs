//! The standard libraries a sandboxed state opens: the one list, used by the sandbox's build
//! (the NIF) and by this crate's tests. What a script finally sees is trimmed further by the
//! sandbox (csrc/sb_baselib.c and the prelude).

use std::ffi::CStr;

use crate::ffi;

/// `(global name, opener)` of every library opened, in order.
pub const LIBS: [(&CStr, ffi::lua_CFunction); 7] = [
    (c"_G", ffi::luaopen_base),
    (c"string", ffi::luaopen_string),
    (c"table", ffi::luaopen_table),
    (c"math", ffi::luaopen_math),
    (c"utf8", ffi::luaopen_utf8),
    (c"coroutine", ffi::luaopen_coroutine),
    (c"os", ffi::luaopen_os),
];

/// Opens [`LIBS`] as globals of a state being built, leaving its stack empty.
///
/// # Safety
/// Only inside a protected call on `l` (opening a library may raise on memory).
pub unsafe fn open(l: *mut ffi::lua_State) {
    // SAFETY: per the contract; the openers are Lua's own `lua_CFunction`s.
    unsafe {
        for (name, open) in LIBS {
            ffi::luaL_requiref(l, name.as_ptr(), open, 1);
            ffi::lua_settop(l, 0);
        }
    }
}
