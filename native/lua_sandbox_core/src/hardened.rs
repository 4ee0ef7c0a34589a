//! Budget-charging builtins: `string.find/match/gmatch/gsub/rep` and
//! `table.sort/insert/remove/move/concat`.
//!
//! The instruction ticker (like a count hook) never fires while a C function runs, so these
//! builtins could otherwise burn CPU for hours in one call (`string.find(string.rep('a', 3000), '.-.-.-b')`, a plain
//! `find` is O(n*m), `table.sort` of a huge table). They are replaced by patched copies of Lua
//! 5.4.9's own C code (`csrc/sb_strlib.c`, `csrc/sb_tablib.c`, built by `build.rs`): same
//! algorithms, same argument checks and error messages, plus a step counter that charges the
//! VM's work countdown (`lua_sandboxcharge`, vendor/lua-src/PATCHES.md) every `SB_BATCH`
//! (1000) steps: the same countdown the instructions, the VM's own patches and the Rust side
//! ([`crate::budget::charge_steps`]) use. Once the run is aborted the charge raises the abort message
//! as a plain Lua string error, exactly like a tick in the VM, and the abort is sticky (see
//! `crate::budget`).
//!
//! # Unwinding
//!
//! The C functions raise with `lua_error` or through `lua_sandboxcharge`, i.e. `longjmp`.
//! They are only ever entered from the Lua VM (itself C) or, for the two openers, from a
//! protected call made by [`install`], so the jump only crosses C frames. The ticker the
//! charge calls back into (`budget::tick`) never raises and holds nothing with a destructor;
//! it is `extern "C"`, so a panic inside it aborts instead of unwinding into C.

use std::ffi::c_int;

use crate::ffi;

extern "C-unwind" {
    /// Sets the patched `find`, `match`, `gmatch` and `gsub` on the table at stack index 1.
    /// A `lua_CFunction` from `csrc/sb_strlib.c`; raises (longjmp) if argument 1 is no table.
    fn lua_sandbox_open_strlib(l: *mut ffi::lua_State) -> c_int;
    /// Sets the patched `sort` on the table at stack index 1.
    /// A `lua_CFunction` from `csrc/sb_tablib.c`; raises (longjmp) if argument 1 is no table.
    fn lua_sandbox_open_tablib(l: *mut ffi::lua_State) -> c_int;
}

/// Puts the budget-charging copies into the `string` and `table` globals of a state being
/// built (raw API; see `install` for what they replace).
///
/// # Safety
/// Only inside a protected call on `l` (it may raise), with `string` and `table` opened.
pub unsafe fn open_into_globals(l: *mut ffi::lua_State) {
    // SAFETY: per the contract; the openers are genuine `lua_CFunction`s (see `install`),
    // called with the library table as their only argument.
    unsafe {
        for (name, open) in [
            (c"string", lua_sandbox_open_strlib as ffi::lua_CFunction),
            (c"table", lua_sandbox_open_tablib as ffi::lua_CFunction),
        ] {
            ffi::lua_pushcfunction(l, open);
            ffi::lua_getglobal(l, name.as_ptr());
            ffi::lua_call(l, 1, 0);
        }
    }
}

/// Replaces `string.find`, `string.match`, `string.gmatch`, `string.gsub` and `table.sort`
/// (in the `string` and `table` global tables, which the string metatable's `__index` shares)
/// with the budget-charging copies.
///
/// Call it once per state, before running untrusted code and before anything copies the
/// originals. Calling it again is harmless.
#[cfg(test)]
pub fn install(lua: &mlua::Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    let string: mlua::Table = globals.get("string")?;
    let table: mlua::Table = globals.get("table")?;

    // SAFETY: `lua_sandbox_open_strlib` is a genuine `lua_CFunction` (compiled from
    // csrc/sb_strlib.c against the same Lua 5.4.9 headers and configuration as the VM mlua
    // links): it only uses the documented C API on its own stack frame, checks that argument 1
    // is a table, stores five C functions in it (`find`, `match`, `gmatch`, `gsub`, `rep`) and
    // returns 0 results. Its only failure mode is
    // a Lua error (longjmp), and `Function::call` below runs it under `lua_pcall`, so that jump
    // lands in the pcall inside mlua's protected-call machinery without crossing a Rust frame.
    // The functions it installs follow the same rules (see the module docs).
    let open_strlib = unsafe { lua.create_c_function(lua_sandbox_open_strlib) }?;
    open_strlib.call::<()>(string)?;

    // SAFETY: as above, for `lua_sandbox_open_tablib` (csrc/sb_tablib.c), which stores five C
    // functions (`sort`, `insert`, `remove`, `move`, `concat`) in the table given as argument 1.
    let open_tablib = unsafe { lua.create_c_function(lua_sandbox_open_tablib) }?;
    open_tablib.call::<()>(table)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::budget::Abort;

    #[test]
    fn c_messages_match_budget_messages() {
        for why in [
            Abort::Instructions,
            Abort::Memory,
            Abort::Output,
            Abort::Killed,
            Abort::ToolCalls,
        ] {
            assert_eq!(why.c_message().to_str().unwrap(), why.message());
        }
    }
}

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod differential_tests;
#[cfg(test)]
mod loop_tests;
