//! Shared by the core's integration tests: a sandbox-like state built in a slot, and a way to
//! run a chunk in it and read its first result as a string.
#![allow(dead_code)]

use std::ffi::{c_int, c_void};
use std::time::Instant;

use lua_sandbox_core::chunk::Code;
use lua_sandbox_core::control::Caller;
use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::exec::{Entry, Home, Limits, Run, Setup, StateSetup, Step};
use lua_sandbox_core::output::Print;
use lua_sandbox_core::{ffi, pool, protect, LuaFailure, Slot};

pub const MIB: usize = 1 << 20;

/// Opens the libraries the sandbox opens (`lua_sandbox_core::libs`).
pub unsafe extern "C-unwind" fn build_libs(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: runs under lua_pcall (Slot::new); only the C API, no Rust values with Drop.
    unsafe { lua_sandbox_core::libs::open(l) };
    0
}

pub fn new_slot(capacity: usize) -> Slot {
    // SAFETY: `build_libs` follows the raising discipline and ignores its argument.
    unsafe { Slot::new(capacity, build_libs, std::ptr::null_mut()) }.expect("a slot")
}

struct Chunk<'a> {
    code: &'a [u8],
}

unsafe extern "C-unwind" fn run_chunk(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: argument 1 is a pointer to a live `Chunk`; everything below may raise with no
    // Rust value with a destructor alive (the slice is borrowed, not owned).
    unsafe {
        let chunk = &*ffi::lua_touserdata(l, 1).cast::<Chunk>();
        ffi::lua_settop(l, 0);
        if ffi::luaL_loadbufferx(
            l,
            chunk.code.as_ptr().cast(),
            chunk.code.len(),
            c"=test".as_ptr(),
            c"t".as_ptr(),
        ) != ffi::LUA_OK
        {
            ffi::lua_error(l);
        }
        ffi::lua_call(l, 0, 1);
        ffi::luaL_tolstring(l, -1, std::ptr::null_mut());
    }
    1
}

/// Runs `code` and returns `tostring` of its first result.
pub fn eval(slot: &mut Slot, code: &str) -> Result<String, LuaFailure> {
    let l = slot.state();
    let mut chunk = Chunk {
        code: code.as_bytes(),
    };
    // SAFETY: the state is not running; `run_chunk` follows the discipline and `chunk`
    // outlives the call.
    unsafe {
        protect::call(l, run_chunk, (&mut chunk as *mut Chunk).cast::<c_void>())?;
        let s = protect::describe(l, -1);
        ffi::lua_settop(l, 0);
        Ok(s)
    }
}

extern "C-unwind" {
    /// The sandbox's C versions of print, io, load, pcall, ... (csrc/sb_baselib.c); returns the
    /// host's five handles.
    fn lua_sandbox_open_stock(l: *mut ffi::lua_State) -> c_int;
}

/// Opens the sandbox's libraries and its C versions of the base functions (`print` calls the
/// core's output hook).
pub unsafe extern "C-unwind" fn build_stock(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: runs under lua_pcall (Slot::new); only the C API, no Rust values with Drop.
    unsafe {
        lua_sandbox_core::libs::open(l);
        ffi::lua_pushcfunction(l, lua_sandbox_open_stock);
        ffi::lua_call(l, 0, 5);
        ffi::lua_settop(l, 0);
    }
    0
}

/// A slot whose state has the sandbox's C base functions (`print`, `io.write`, `pcall`, ...).
pub fn new_stock_slot(capacity: usize) -> Slot {
    // SAFETY: `build_stock` follows the raising discipline and ignores its argument.
    unsafe { Slot::new(capacity, build_stock, std::ptr::null_mut()) }.expect("a slot")
}

/// Generous limits for a whole run (tests tighten the one they exercise).
pub fn limits() -> lua_sandbox_core::exec::Limits {
    lua_sandbox_core::exec::Limits {
        max_instructions: 10_000_000,
        max_memory: 8 << 20,
        max_depth: 64,
        max_result_bytes: 1 << 20,
        max_output: 1 << 20,
        max_source: 1 << 20,
        max_tool_calls: 10,
        timeout: None,
    }
}

/// A caller's liveness check counting down the `AtomicU64` at `env`: the caller is dead from
/// the check that runs the count out (`Caller { env, alive: Some(alive_for) }`).
///
/// # Safety
/// `env` must point at an `AtomicU64` alive for the run.
pub unsafe fn alive_for(env: *mut c_void) -> bool {
    // SAFETY: the caller guarantees `env` points at a live counter.
    let left = unsafe { &*env.cast::<std::sync::atomic::AtomicU64>() };
    left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) > 1
}

/// Starts `src` as a fresh run in a leased slot, printing to `print`, with the tools `tools`,
/// up to its first stop; `started` runs just before the script (after the slot is leased).
pub fn start_run(
    src: &str,
    limits: Limits,
    print: Print,
    tools: &[String],
    caller: Caller,
    started: impl FnOnce(),
) -> (Run, Result<Step, SandboxError>) {
    let lease = pool::lease(limits.max_memory).expect("a slot");
    let mut run = Run::new(
        Home::Fresh(lease),
        limits,
        print,
        "script".to_string(),
        None,
        Instant::now(),
    );
    let code = Code::new(src.as_bytes(), "script", false).unwrap();
    let setup = Setup {
        state: Some(StateSetup {
            globals: None,
            tools,
            modules: &[],
        }),
        call_globals: None,
        entry: Entry::Chunk(&code),
        call: None,
    };
    started();
    let step = run
        .prepare(caller, setup)
        .and_then(|nargs| run.resume(caller, nargs));
    (run, step)
}
