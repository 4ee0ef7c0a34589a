//! Building a sandboxed Lua state in a slot: the standard-library allowlist, the hardened
//! builtins, the sandbox's C versions of the functions that must differ from stock
//! (csrc/sb_baselib.c, csrc/sb_corolib.c), the prelude that trims the globals, and the C-ABI
//! hooks those C functions call (output, abort checks, the saved traceback).
//!
//! The state is built once per slot, in place, and then snapshotted (see `slots.rs`); every
//! run starts from that snapshot. Everything below follows the raising discipline of
//! `lua_sandbox_core::protect`: the functions Lua calls are C-ABI, and none holds a Rust value
//! with a destructor across a call that may raise.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use lua_sandbox_core::{ffi, Slot};

use crate::budget::{self, Abort};
use crate::error::SandboxError;
use crate::output;
use crate::registry::Key;

const PRELUDE: &str = include_str!("prelude.lua");

/// The prelude compiled once per process: loading bytecode is several times cheaper than
/// parsing the source for every slot. It is our own compiler's output, never user input.
fn prelude_bytecode() -> &'static [u8] {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    BYTECODE.get_or_init(|| {
        crate::chunk::dump(PRELUDE.as_bytes(), "prelude", true, None).expect("the prelude parses")
    })
}

extern "C-unwind" {
    /// Installs the C versions of print, io, load, pcall, xpcall, collectgarbage, require,
    /// coroutine.*, debug.traceback and the stubs of removed functions in the globals, and
    /// returns the host's handles (tool marker, runner, configure, tool factory,
    /// make_require). A `lua_CFunction` from csrc/sb_baselib.c.
    fn lua_sandbox_open_stock(l: *mut ffi::lua_State) -> c_int;
    /// Sets the global `json` (csrc/sb_json.c): a `lua_CFunction` that may raise (memory).
    fn lua_sandbox_open_json(l: *mut ffi::lua_State) -> c_int;
    /// Sets the nesting bound of `json.encode`/`json.decode`; never raises (the registry key
    /// exists once the library is open).
    fn lua_sandbox_json_set_depth(l: *mut ffi::lua_State, depth: ffi::lua_Integer);
    /// The address `json.null` stands for (a light userdata).
    fn lua_sandbox_json_null() -> *const c_void;
}

/// `json.null`'s address: it marshals to `nil`.
pub fn json_null() -> *const c_void {
    // SAFETY: returns the address of a static; no arguments, no state.
    unsafe { lua_sandbox_json_null() }
}

/// Bounds `json.encode`/`json.decode` nesting by the run's `max_depth`.
///
/// # Safety
/// `l` must be a state built by [`new_slot`], not running, with a free stack slot.
pub unsafe fn set_json_depth(l: *mut ffi::lua_State, depth: usize) {
    // SAFETY: per the contract; the setter only replaces an existing registry entry.
    unsafe { lua_sandbox_json_set_depth(l, depth.min(i64::MAX as usize) as ffi::lua_Integer) }
}

/// A new slot of `capacity` bytes holding a pristine sandbox.
pub fn new_slot(capacity: usize) -> Result<Slot, SandboxError> {
    let bytecode = prelude_bytecode();
    let mut piece: (*const u8, usize) = (bytecode.as_ptr(), bytecode.len());
    // SAFETY: `build` follows the raising discipline; its argument points at `piece`, which
    // outlives the call and describes the 'static prelude bytecode.
    unsafe {
        Slot::new(
            capacity,
            build,
            (&mut piece as *mut (*const u8, usize)).cast(),
        )
    }
    .map_err(|e| SandboxError::Runtime(e.to_string()))
}

/// Builds the sandbox in a fresh state (run under `lua_pcall` by `Slot::new`). Argument 1 is
/// a light userdata pointing at the prelude's bytecode `(ptr, len)`.
unsafe extern "C-unwind" fn build(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: the calls below may raise (longjmp) to `Slot::new`'s protected call; only raw
    // pointers and integers are live. The bytecode pointer/length describe a 'static slice.
    unsafe {
        let (code, len) = *ffi::lua_touserdata(l, 1).cast::<(*const u8, usize)>();
        ffi::lua_settop(l, 0);
        lua_sandbox_core::libs::open(l);
        crate::hardened::open_into_globals(l);
        // Before the prelude copies `os.clock`.
        crate::facts::install(l);

        // The C versions of print, io, load, pcall, xpcall, collectgarbage, require,
        // coroutine.*, debug.traceback and the stubs of removed functions; they return the
        // host's handles: tool marker, runner, configure, tool factory, make_require.
        ffi::lua_pushcfunction(l, lua_sandbox_open_stock);
        ffi::lua_call(l, 0, 5);
        // The prelude trims the globals and turns the tool factory into `make_tools`.
        if ffi::luaL_loadbufferx(l, code.cast(), len, c"=prelude".as_ptr(), c"b".as_ptr())
            != ffi::LUA_OK
        {
            ffi::lua_error(l);
        }
        ffi::lua_pushvalue(l, -3); // the tool factory
        ffi::lua_call(l, 1, 1); // -> make_tools
        ffi::lua_replace(l, -3); // stack: marker, runner, configure, make_tools, make_require
        for key in [
            Key::MakeRequire,
            Key::MakeTools,
            Key::Configure,
            Key::Runner,
            Key::ToolMarker,
        ] {
            ffi::lua_rawsetp(l, ffi::LUA_REGISTRYINDEX, key.ptr());
        }
        // After the prelude, whose allowlist would remove it.
        ffi::lua_pushcfunction(l, lua_sandbox_open_json);
        ffi::lua_call(l, 0, 0);

        // Handles: a hidden metatable that only the host attaches.
        ffi::lua_createtable(l, 0, 3);
        ffi::lua_pushstring(l, c"handle".as_ptr());
        ffi::lua_setfield(l, -2, c"__name".as_ptr());
        ffi::lua_pushboolean(l, 0);
        ffi::lua_setfield(l, -2, c"__metatable".as_ptr());
        ffi::lua_pushcfunction(l, crate::handles::handle_tostring);
        ffi::lua_setfield(l, -2, c"__tostring".as_ptr());
        ffi::lua_rawsetp(l, ffi::LUA_REGISTRYINDEX, Key::HandleMeta.ptr());
    }
    0
}

/// `print` and `io.write` (csrc/sb_baselib.c): appends `n` bytes to the run's output.
/// Returns 0, or 1 once the run is aborted (the caller then raises the abort).
///
/// Never raises: an error of `output::emit` is the output abort it trips, and a panic is
/// caught here rather than unwinding into C.
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
        output::emit(bytes).is_ok()
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

/// After every protected call and coroutine resume (csrc/sb_baselib.c, sb_corolib.c):
/// a `LUA_ERRMEM` status is the allocator's refusal and trips the sticky memory abort (the
/// VM's own hook in `luaD_throw` has normally done so already). Returns 1 when the run is
/// aborted. Never raises.
#[no_mangle]
pub extern "C" fn lua_sandbox_after(status: c_int) -> c_int {
    if status == ffi::LUA_ERRMEM {
        budget::trip(Abort::Memory);
    }
    c_int::from(budget::current_abort().is_some())
}

/// The message csrc/sb_baselib.c and sb_corolib.c raise once the run is aborted: a static
/// NUL-terminated string, the ticker's text.
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

thread_local! {
    /// The traceback the runner's message handler saved for the last runtime error on this
    /// thread (the script's frames only); taken (and so cleared) by the run that reports it.
    static TRACEBACK: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The traceback saved by the current run's error handler, if any.
pub fn take_traceback() -> Option<String> {
    TRACEBACK.with(|t| t.borrow_mut().take())
}

/// Forgets a traceback a previous run on this thread left behind.
pub fn clear_traceback() {
    TRACEBACK.with(|t| t.borrow_mut().take());
}

/// The runner's message handler (csrc/sb_baselib.c): keeps the traceback of the script's
/// frames for `Error.traceback`. Never raises.
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
        TRACEBACK.with(|t| *t.borrow_mut() = Some(tb));
    });
}
