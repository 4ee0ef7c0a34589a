//! Building a sandboxed Lua state: the standard-library allowlist, the hardened builtins, the
//! prelude that wraps everything a script could use to dodge a limit, and print capture.

use std::ffi::c_int;
use std::sync::OnceLock;

use mlua::{ffi, Function, Lua, LuaOptions, StdLib, Table};

use crate::budget::{self, Abort};
use crate::output;

const PRELUDE: &str = include_str!("prelude.lua");

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

/// The traceback the prelude's error handler saved for the last runtime error.
pub struct Traceback(pub String);

/// A fresh state with the sandbox installed, before any run-specific setup.
pub struct Sandbox {
    pub lua: Lua,
    /// Identifies tool calls yielded up to the host (see prelude.lua).
    pub tool_marker: Table,
    /// Runs the chunk (and the optional `call:` function) inside the run coroutine.
    pub runner: Function,
    /// `configure(run_coroutine, max_source)`: per-run settings of the prelude.
    pub configure: Function,
    pub make_tools: Function,
    pub make_require: Function,
}

/// The libraries a script may see; the prelude trims `os` and `string` further.
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
        // Before the prelude copies `os.clock`.
        crate::facts::install(&lua)?;

        // SAFETY: both are plain `lua_CFunction`s that follow the Lua C API contract: they only
        // touch their own stack slots, and raise (longjmp) with no Rust value alive that has a
        // destructor.
        let check = unsafe { lua.create_c_function(check_abort) }?;
        let aborted = unsafe { lua.create_c_function(is_aborted) }?;
        let charge = unsafe { lua.create_c_function(charge_work) }?;
        let emit =
            lua.create_function(|lua, s: mlua::LuaString| output::emit(lua, &s.as_bytes()))?;
        let save_traceback = lua.create_function(|lua, ()| {
            let tb = lua.traceback(None, 2)?;
            lua.set_app_data(Traceback(user_frames(&tb.to_string_lossy())));
            Ok(())
        })?;

        let (tool_marker, runner, configure, make_tools, make_require) = lua
            .load(prelude_bytecode())
            .set_name("=prelude")
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .call::<(Table, Function, Function, Function, Function)>((
                check,
                aborted,
                emit,
                save_traceback,
                charge,
            ))?;
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

/// `check(...)`: returns its arguments unchanged unless the run was aborted, in which case it
/// raises again. It also recognises the allocator's refusal that `pcall` and friends turned
/// into a `false, "not enough memory"` pair, and makes that abort sticky too.
unsafe extern "C-unwind" fn check_abort(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: `l` is the calling thread, as Lua guarantees for a C function; the helpers only
    // read stack slots that exist (`lua_gettop`), and `lua_error` leaves with no live Drop
    // values in this frame.
    unsafe {
        let n = ffi::lua_gettop(l);
        let memory_error = n >= 2 && ffi::lua_toboolean(l, 1) == 0 && is_memory_error(l, 2);
        if memory_error {
            budget::trip(Abort::Memory);
        }
        if let Some(why) = budget::current_abort() {
            let msg = why.message();
            ffi::lua_pushlstring(l, msg.as_ptr().cast(), msg.len());
            ffi::lua_error(l);
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
            let msg = why.message();
            ffi::lua_pushlstring(l, msg.as_ptr().cast(), msg.len());
            ffi::lua_error(l);
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
            let check = unsafe { lua.create_c_function(check_abort) }.unwrap();
            let aborted = unsafe { lua.create_c_function(is_aborted) }.unwrap();
            let emit = lua
                .create_function(|_, _s: mlua::LuaString| Ok(()))
                .unwrap();
            let st = lua.create_function(|_, ()| Ok(())).unwrap();
            let charge = unsafe { lua.create_c_function(charge_work) }.unwrap();
            let t4 = std::time::Instant::now();
            let _r: mlua::MultiValue = f.call((check, aborted, emit, st, charge)).unwrap();
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
            "create fns",
            "run prelude",
            "drop",
        ];
        for (name, d) in names.iter().zip(t) {
            eprintln!("{name}: {:?}", d / n);
        }
    }
}
