//! The functions the sandbox's C code (csrc/sb_baselib.c, sb_corolib.c; declared in
//! csrc/sb_sandbox.h) calls back into: output, the abort checks after protected calls, the
//! abort message, the saved traceback. Each reaches the active run through its scope
//! (`scope.rs`); none raises, and a panic is caught (or aborts) rather than unwinding into C.

use std::ffi::{c_char, c_int, CStr};

use crate::budget::{self, Abort};
use crate::ffi;
use crate::scope;

/// `print` and `io.write`: appends `n` bytes to the run's output, streaming what is due.
/// Returns 0, or 1 once the run is aborted (the caller then raises the abort): over
/// `max_output` this trips the output abort.
#[no_mangle]
pub extern "C-unwind" fn lua_sandbox_emit(
    _l: *mut ffi::lua_State,
    s: *const c_char,
    n: usize,
) -> c_int {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: `s` points at `n` bytes of a Lua string kept alive on the caller's stack for
        // the duration of this call.
        let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), n) };
        scope::with_active(|scope, caller| match scope.try_output() {
            // Between two pieces of a large write: a check now (the write was paid for by
            // the buffer that built it).
            Some(mut out) => out
                .emit(bytes, caller, || budget::charge_and_check(0))
                .is_ok(),
            None => true,
        })
        .unwrap_or(true)
    });
    if r.unwrap_or(false) && budget::current_abort().is_none() {
        0
    } else {
        if budget::current_abort().is_none() {
            budget::trip(Abort::Output);
        }
        1
    }
}

/// After every protected call and coroutine resume: a `LUA_ERRMEM` status is the allocator's
/// refusal and trips the sticky memory abort (the VM's own hook in `luaD_throw` has normally
/// done so already). Returns 1 when the run is aborted.
#[no_mangle]
pub extern "C" fn lua_sandbox_after(status: c_int) -> c_int {
    if status == ffi::LUA_ERRMEM {
        budget::trip(Abort::Memory);
    }
    c_int::from(budget::current_abort().is_some())
}

/// The message the C code raises once the run is aborted: a static NUL-terminated string, the
/// ticker's text.
#[no_mangle]
pub extern "C" fn lua_sandbox_stock_abort_message() -> *const c_char {
    budget::current_abort()
        .map_or(c"run aborted", Abort::c_message)
        .as_ptr()
}

/// A capability the script was denied (csrc/sb_baselib.c: the two functions that raise "X is
/// not available in this sandbox" call this first): counted in the run's `stats.denied`.
/// Never raises.
#[no_mangle]
pub extern "C" fn lua_sandbox_denied(prefix: *const c_char, name: *const c_char) {
    if prefix.is_null() || name.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: both are NUL-terminated strings the caller keeps alive for this call (C
        // literals, or a Lua string held as an upvalue of the calling closure).
        let (prefix, name) = unsafe { (CStr::from_ptr(prefix), CStr::from_ptr(name)) };
        budget::note_denied(prefix.to_bytes(), name.to_bytes());
    });
}

/// The runner's message handler: keeps the traceback of the script's frames in the run's
/// scope, for `Error.traceback`.
#[no_mangle]
pub extern "C-unwind" fn lua_sandbox_save_traceback(
    _l: *mut ffi::lua_State,
    s: *const c_char,
    n: usize,
) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `n` bytes of a Lua string on the caller's stack.
        let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), n) };
        let tb = String::from_utf8_lossy(bytes).into_owned();
        scope::with_active(|scope, _| scope.save_traceback(tb));
    });
}
