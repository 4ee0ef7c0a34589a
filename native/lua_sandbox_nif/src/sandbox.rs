//! Building a sandboxed Lua state: the standard-library allowlist, the hardened builtins, the
//! sandbox's C versions of the functions that must differ from stock (csrc/sb_baselib.c,
//! csrc/sb_corolib.c), the prelude that trims the globals, and the C-ABI hooks those C
//! functions call (output, abort checks, the saved traceback).

use std::ffi::{c_char, c_int};
use std::sync::OnceLock;

use mlua::{ffi, Function, Lua, LuaOptions, StdLib, Table};

use crate::budget::{self, Abort};
use crate::output;

const PRELUDE: &str = include_str!("prelude.lua");

extern "C-unwind" {
    /// Installs the C versions of print, io, load, pcall, xpcall, collectgarbage, require,
    /// coroutine.*, debug.traceback and the stubs of removed functions in the globals, and
    /// returns the host's handles (tool marker, runner, configure, tool factory, set-modules).
    /// A `lua_CFunction` from csrc/sb_baselib.c.
    fn lua_sandbox_open_stock(l: *mut ffi::lua_State) -> c_int;
}

/// The prelude compiled once per process: loading bytecode is several times cheaper than
/// parsing the source for every state. It is our own compiler's output, never user input.
fn prelude_bytecode() -> &'static [u8] {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    BYTECODE.get_or_init(|| {
        let lua = Lua::new_with(StdLib::NONE, LuaOptions::default()).expect("a bare Lua state");
        lua.load(PRELUDE)
            .set_name("=prelude")
            .into_function()
            .expect("the prelude parses")
            .dump(true)
    })
}

/// The traceback saved for the last runtime error (only the script's frames).
pub struct Traceback(pub String);

/// A fresh state with the sandbox installed, before any run-specific setup.
pub struct Sandbox {
    pub lua: Lua,
    /// Identifies tool calls yielded up to the host.
    pub tool_marker: Table,
    /// Runs the chunk (and the optional `call:` function) inside the run coroutine.
    pub runner: Function,
    /// `configure(run_coroutine, max_source)`: per-run settings.
    pub configure: Function,
    /// `make_tools(names)`: builds the `tools` table.
    pub make_tools: Function,
    /// `make_require(loaders)`: the host's modules for `require`.
    pub make_require: Function,
}

/// The libraries a script may see; csrc/sb_baselib.c trims `os` and `string` further.
fn libs() -> StdLib {
    StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE | StdLib::OS
}

impl Sandbox {
    /// Creates a pristine sandboxed state: no user code has run in it, and no limit is set yet.
    pub fn new() -> mlua::Result<Sandbox> {
        let lua = Lua::new_with(libs(), LuaOptions::default())?;
        // Nothing built here is garbage: collecting while building is wasted work. The run
        // restarts the collector (see `run::prepare`).
        lua.gc_stop();
        crate::hardened::install(&lua)?;

        // SAFETY: `lua_sandbox_open_stock` is a genuine `lua_CFunction` compiled against the
        // same Lua headers and configuration as the VM: it uses the documented C API on its
        // own frame, and can only fail with a Lua error (longjmp), which lands in the
        // `lua_pcall` that `Function::call` runs it under, crossing no Rust frame. The C
        // functions it installs follow the same rule (they raise only from C frames).
        let open = unsafe { lua.create_c_function(lua_sandbox_open_stock) }?;
        let (tool_marker, runner, configure, make_tool, make_require) =
            open.call::<(Table, Function, Function, Function, Function)>(())?;

        let make_tools = lua
            .load(prelude_bytecode())
            .set_name("=prelude")
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .call::<Function>(make_tool)?;
        Ok(Sandbox {
            lua,
            tool_marker,
            runner,
            configure,
            make_tools,
            make_require,
        })
    }
}

/// `print` and `io.write` (csrc/sb_baselib.c): appends `n` bytes to the run's output.
/// Returns 0, or 1 once the run is aborted (the caller then raises the abort).
///
/// Never raises: errors of `output::emit` become the output abort it trips, and a panic is
/// caught here rather than unwinding into C.
#[no_mangle]
pub extern "C-unwind" fn lua_sandbox_emit(
    l: *mut ffi::lua_State,
    s: *const c_char,
    n: usize,
) -> c_int {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: `l` is the running thread of a state built by `Sandbox::new`, whose `Lua`
        // lives (in the run's session) for the whole call; `get_or_init_from_ptr` only reads
        // its registry. `s` points at `n` bytes of a Lua string kept alive on the caller's
        // stack for the duration of this call.
        let (lua, bytes) = unsafe {
            (
                Lua::get_or_init_from_ptr(l),
                std::slice::from_raw_parts(s.cast::<u8>(), n),
            )
        };
        output::emit(lua, bytes).is_ok()
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
/// a `LUA_ERRMEM` status is the allocator's refusal and trips the sticky memory abort.
/// Returns 1 when the run is aborted. Never raises.
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

/// The runner's message handler: keeps the traceback of the script's frames for
/// `Error.traceback`. Never raises.
#[no_mangle]
pub extern "C-unwind" fn lua_sandbox_save_traceback(
    l: *mut ffi::lua_State,
    s: *const c_char,
    n: usize,
) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: as in `lua_sandbox_emit`: a live state of ours, and `n` bytes of a Lua
        // string on the caller's stack.
        let (lua, bytes) = unsafe {
            (
                Lua::get_or_init_from_ptr(l),
                std::slice::from_raw_parts(s.cast::<u8>(), n),
            )
        };
        lua.set_app_data(Traceback(String::from_utf8_lossy(bytes).into_owned()));
    });
}

#[cfg(test)]
mod timing_probe {
    use super::*;

    /// Where building a state goes: `cargo test --release probe -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn probe() {
        let n = 2000u32;
        let mut t = [std::time::Duration::ZERO; 6];
        for _ in 0..n {
            let t0 = std::time::Instant::now();
            let lua = Lua::new_with(libs(), LuaOptions::default()).unwrap();
            let t1 = std::time::Instant::now();
            crate::hardened::install(&lua).unwrap();
            let t2 = std::time::Instant::now();
            let f = lua
                .load(prelude_bytecode())
                .set_mode(mlua::chunk::ChunkMode::Binary)
                .into_function()
                .unwrap();
            let t3 = std::time::Instant::now();
            let open = unsafe { lua.create_c_function(lua_sandbox_open_stock) }.unwrap();
            let (_m, _r, _c, tool, _s) = open
                .call::<(Table, Function, Function, Function, Function)>(())
                .unwrap();
            let t4 = std::time::Instant::now();
            let _r: mlua::MultiValue = f.call(tool).unwrap();
            let t5 = std::time::Instant::now();
            drop(_r);
            drop(lua);
            let t6 = std::time::Instant::now();
            for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5]
                .iter()
                .enumerate()
            {
                t[k] += *d;
            }
        }
        let names = [
            "new_with",
            "hardened",
            "load prelude",
            "open stock",
            "run prelude",
            "drop",
        ];
        for (name, d) in names.iter().zip(t) {
            eprintln!("{name}: {:?}", d / n);
        }
    }
}
