//! Building a sandboxed Lua state in a slot: the standard-library allowlist, the hardened
//! builtins, the prelude that wraps everything a script could use to dodge a limit, and the
//! natives the prelude calls (print capture, sticky aborts, tracebacks).
//!
//! The state is built once per slot, in place, and then snapshotted (see `slots.rs`); every
//! run starts from that snapshot. Everything below follows the raising discipline of
//! `lua_sandbox_core::protect`: the functions Lua calls are C-ABI, and none holds a Rust value
//! with a destructor across a call that may raise.

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use lua_sandbox_core::{ffi, Slot};

use crate::budget::{self, Abort};
use crate::error::SandboxError;
use crate::output;

const PRELUDE: &str = include_str!("prelude.lua");

/// The prelude compiled once per process: loading bytecode is several times cheaper than
/// parsing the source for every slot. It is our own compiler's output, never user input.
fn prelude_bytecode() -> &'static [u8] {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    BYTECODE.get_or_init(|| {
        crate::chunk::dump(PRELUDE.as_bytes(), "prelude", true).expect("the prelude parses")
    })
}

/// What the prelude returns, kept in the registry under these light-userdata keys.
#[derive(Clone, Copy)]
pub enum Key {
    /// Identifies tool calls yielded up to the host.
    ToolMarker,
    /// Runs the chunk (and the optional `call:` function) inside the run coroutine.
    Runner,
    /// `configure(run_coroutine, max_source)`: per-run settings of the prelude.
    Configure,
    /// `make_tools(names)`.
    MakeTools,
    /// `make_require(loaders)`.
    MakeRequire,
}

static KEYS: [u8; 5] = [0; 5];

impl Key {
    /// A unique address: the registry key of this value.
    pub fn ptr(self) -> *const c_void {
        (&KEYS[self as usize] as *const u8).cast()
    }
}

/// The libraries a script may see; the prelude trims `os` and `string` further.
const LIBS: [(&std::ffi::CStr, ffi::lua_CFunction); 7] = [
    (c"_G", ffi::luaopen_base),
    (c"string", ffi::luaopen_string),
    (c"table", ffi::luaopen_table),
    (c"math", ffi::luaopen_math),
    (c"utf8", ffi::luaopen_utf8),
    (c"coroutine", ffi::luaopen_coroutine),
    (c"os", ffi::luaopen_os),
];

extern "C-unwind" {
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
        for (name, open) in LIBS {
            ffi::luaL_requiref(l, name.as_ptr(), open, 1);
            ffi::lua_settop(l, 0);
        }
        crate::hardened::open_into_globals(l);

        if ffi::luaL_loadbufferx(l, code.cast(), len, c"=prelude".as_ptr(), c"b".as_ptr())
            != ffi::LUA_OK
        {
            ffi::lua_error(l);
        }
        ffi::lua_pushcfunction(l, check_abort);
        ffi::lua_pushcfunction(l, is_aborted);
        ffi::lua_pushcfunction(l, emit);
        ffi::lua_pushcfunction(l, save_traceback);
        ffi::lua_pushcfunction(l, charge_work);
        ffi::lua_call(l, 5, 5);
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
    }
    0
}

/// Raises the abort's message as a plain string error.
///
/// # Safety
/// Only from a C function called by Lua, with no Rust value with a destructor alive.
unsafe fn raise_abort(l: *mut ffi::lua_State, why: Abort) -> ! {
    // SAFETY: per the contract; the message is a static C string.
    unsafe {
        ffi::lua_pushstring(l, why.c_message().as_ptr());
        ffi::lua_error(l)
    }
}

/// `check(...)`: returns its arguments unchanged unless the run was aborted, in which case it
/// raises again. It also recognises the allocator's refusal that `pcall` and friends turned
/// into a `false, "not enough memory"` pair, and makes that abort sticky too.
unsafe extern "C-unwind" fn check_abort(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: `l` is the calling thread; the helpers only read stack slots that exist, and
    // `raise_abort` leaves with no live Drop values in this frame.
    unsafe {
        let n = ffi::lua_gettop(l);
        let memory_error = n >= 2 && ffi::lua_toboolean(l, 1) == 0 && is_memory_error(l, 2);
        if memory_error {
            budget::trip(Abort::Memory);
        }
        if let Some(why) = budget::current_abort() {
            raise_abort(l, why);
        }
        n
    }
}

/// `charge(n)`: charges `n` steps of work the ticker cannot see (parsing in `load`), raising
/// once the budget is used up.
unsafe extern "C-unwind" fn charge_work(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: reads argument 1 (absent reads as 0) and raises with no live Drop values.
    unsafe {
        let n = ffi::lua_tointegerx(l, 1, std::ptr::null_mut()).max(0) as u64;
        if let Err(why) = budget::charge_steps(n) {
            raise_abort(l, why);
        }
    }
    0
}

/// `aborted()`: whether the run was aborted (used by the `xpcall` handler wrapper).
unsafe extern "C-unwind" fn is_aborted(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: pushes one boolean onto the calling thread's stack; never raises.
    unsafe {
        ffi::lua_pushboolean(l, budget::current_abort().is_some() as c_int);
    }
    1
}

/// `emit(s)`: appends printed text to the run's output (see `output.rs`).
unsafe extern "C-unwind" fn emit(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: the prelude always passes a string, checked anyway; the bytes stay valid while
    // the argument is on the stack. `output::emit` returns before any raise, so nothing with
    // a destructor is alive when `raise_abort` jumps.
    unsafe {
        if ffi::lua_type(l, 1) != ffi::LUA_TSTRING {
            return 0;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, 1, &mut len);
        let verdict = if p.is_null() {
            Ok(())
        } else {
            output::emit(std::slice::from_raw_parts(p.cast::<u8>(), len))
        };
        if let Err(why) = verdict {
            raise_abort(l, why);
        }
    }
    0
}

thread_local! {
    /// The traceback the prelude's error handler saved for the last runtime error on this
    /// thread; taken (and so cleared) by the run that reports the error.
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

/// `save_traceback()`: records the traceback of the error being handled (script frames only).
unsafe extern "C-unwind" fn save_traceback(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: `luaL_traceback` may raise (memory) before any Rust value exists; afterwards
    // only non-raising reads happen, and the String built from them is moved into the
    // thread-local before returning.
    unsafe {
        ffi::luaL_traceback(l, l, std::ptr::null(), 2);
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, -1, &mut len);
        if !p.is_null() {
            let tb = String::from_utf8_lossy(std::slice::from_raw_parts(p.cast::<u8>(), len));
            let frames = user_frames(&tb);
            TRACEBACK.with(|t| *t.borrow_mut() = Some(frames));
        }
    }
    0
}

/// Whether stack slot `idx` holds Lua's out-of-memory message.
///
/// # Safety
/// `idx` must be a valid index on `l`.
unsafe fn is_memory_error(l: *mut ffi::lua_State, idx: c_int) -> bool {
    const MSG: &[u8] = b"not enough memory";
    // SAFETY: only called on an existing slot; `lua_tolstring` on a value that already is a
    // string neither allocates nor raises, and the bytes stay valid while the slot holds it.
    unsafe {
        if ffi::lua_type(l, idx) != ffi::LUA_TSTRING {
            return false;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, idx, &mut len);
        !p.is_null() && std::slice::from_raw_parts(p.cast::<u8>(), len) == MSG
    }
}

/// The traceback without the prelude's frames below the script (its runner and `xpcall`).
fn user_frames(tb: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for line in tb.lines() {
        if line.contains("in upvalue 'raw_xpcall'") || line.trim_start().starts_with("prelude:") {
            break;
        }
        lines.push(line);
    }
    if lines
        .last()
        .is_some_and(|l| l.trim() == "(...tail calls...)")
    {
        lines.pop();
    }
    lines.join("\n")
}
