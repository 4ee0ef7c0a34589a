//! The one discipline for raising.
//!
//! Lua is built as C: an error is a `longjmp` to the nearest protected call. A `longjmp` over a
//! Rust frame that owns a value with a destructor skips that destructor (a leak at best, a
//! double free or a broken invariant at worst), and over a frame that expects to unwind it is
//! undefined behaviour. So, everywhere in this crate and in the NIF built on it:
//!
//! 1. **Every Lua API call that can raise runs inside a protected call.** Only the calls Lua
//!    documents as never raising (`lua_settop` down, `lua_push{nil,boolean,integer,number,
//!    lightuserdata,cfunction}` with stack room, `lua_to*`/`lua_type`/`lua_raw{get,geti}`
//!    reads, `lua_gettop`, `lua_checkstack`, `lua_pcall`/`lua_resume` themselves) may be made
//!    outside one.
//! 2. **A protected call runs a C-ABI `lua_CFunction`** ([`call`] pushes it and calls it with
//!    `lua_pcall`), never a Rust closure that could own heap values.
//! 3. **Inside such a function, no live Rust value has a destructor** when a raising call is
//!    made: only raw pointers, integers and `Copy` data. Anything that needs freeing is
//!    allocated in the Lua heap (it is then the collector's), or outside the protected call.
//! 4. **Rust panics never reach C**: functions called by Lua are `extern "C-unwind"` only
//!    because Lua's own raising goes through them; they must not panic (no indexing that can
//!    fail, no `unwrap`), and the allocator (`heap::lua_alloc`) is plain `extern "C"`, so a
//!    panic there aborts instead of unwinding into C.
//!
//! # The abort discipline
//!
//! An abort (a kill, a deadline, a spent budget, the memory limit: `budget.rs`) ends a run by
//! raising at its next instruction or raising charge, and again at every one after (aborts are
//! sticky). Code that may not raise (the collector, the allocator, table scans) only debits the
//! countdown, and the collector stops early once it sees the abort. Two rules:
//!
//! 5. **A state is not reused as it was after an abort.** A fresh run's slot is restored from
//!    its snapshot, a session call (`rollback: true`) is rolled back to its checkpoint, before
//!    anything runs in the state again. Only a `rollback: false` session goes on from where the
//!    aborted call left it, as Lua's own semantics would.
//! 6. **Stopping early leaves the state consistent**, for that one case: the collector stops
//!    only between two steps or, in the atomic phase, before the white flip, so nothing is
//!    freed and the next cycle starts over; inside one big object's traversal (a check every
//!    4 096 slots) it stops only where the object is traversed again anyway (a weak table or
//!    a thread, on `grayagain`; the atomic phase, abandoned), or puts a half-traversed strong
//!    table back on `grayagain` (`vendor/lua-src/PATCHES.md`, "The collector under the
//!    budget"); a C function stops by raising (rules 1–4), never by returning half done
//!    (bulk copies stop at a piece boundary and raise; a string being filled is popped first;
//!    a table's rehash raises before it touches the table, or undoes its move of the keys
//!    first: `luaH_resize`; a large stack or array part grows into a new block filled in
//!    pieces, freed on an abort before anything refers to it: `growstackinpieces`,
//!    `growarrayinpieces`).
//!    Two VM primitives answer early instead: `luaH_next` says "no more elements" once the run
//!    is aborted, and a table lookup whose long-string key an abort interrupted (its hash or
//!    its compare, done in pieces) says "absent", leaving the key unhashed; nothing can act on
//!    either (the next instruction or charge raises, and an insert of a long key checks for
//!    the abort before touching the table: `luaH_finishset`).
//!    Walks along a deep recursion's lists (a check every 4 096 steps: `SB_WALKPIECE`) answer
//!    early where the answer leaves a state stock Lua reaches: the search for a `pcall` says
//!    "none" (the error ends the coroutine, as one outside any `pcall` does), `lua_getstack`
//!    says "no such level"; the others finish (moving or closing pointers into a stack, freeing
//!    a thread), as an upvalue left open or a pointer left behind would outlive its stack.
//!    Reading the error, the stats and the output after an abort is always fine.

use std::ffi::{c_int, c_void, CStr};
use std::fmt;

use mlua_sys as ffi;

/// A Lua error caught by a protected call: its status and message (or a description of a
/// non-string error object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaFailure {
    pub status: c_int,
    pub message: String,
}

impl fmt::Display for LuaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `f` under `lua_pcall` with `ud` as a light userdata argument; on error, pops the error
/// object and returns it as a [`LuaFailure`]. `f`'s results are left on the stack.
///
/// # Safety
/// `l` must be a valid state (or thread) that is not running, with room for two values, and
/// `f` must follow the discipline above.
pub unsafe fn call(
    l: *mut ffi::lua_State,
    f: ffi::lua_CFunction,
    ud: *mut c_void,
) -> Result<(), LuaFailure> {
    // SAFETY: pushing a light C function and a light userdata never allocates or raises, and
    // the caller guarantees stack room; `lua_pcall` is the protected call.
    unsafe {
        ffi::lua_pushcfunction(l, f);
        ffi::lua_pushlightuserdata(l, ud);
        let status = ffi::lua_pcall(l, 1, ffi::LUA_MULTRET, 0);
        if status == ffi::LUA_OK {
            return Ok(());
        }
        let message = describe(l, -1);
        ffi::lua_pop(l, 1);
        Err(LuaFailure { status, message })
    }
}

/// Runs Rust code that makes Lua API calls which cannot raise *by construction* (e.g. pushes
/// made with the memory limit lifted and the size checked beforehand) under `lua_pcall`, as a
/// backstop: if one raised after all, the error is caught here instead of reaching Lua's
/// panic handler, which aborts the process. Such a raise would skip the destructors of the
/// closure's frames (a leak); the callers' construction is what rules it out. The values the
/// closure leaves on its stack are the results, left on `l`'s stack.
///
/// # Safety
/// As for [`call`]; `f` must uphold the "cannot raise" construction it relies on.
pub unsafe fn call_backstop(
    l: *mut ffi::lua_State,
    f: &mut dyn FnMut(*mut ffi::lua_State),
) -> Result<(), LuaFailure> {
    let mut f = Some(f);
    // SAFETY: `trampoline` receives a pointer to `f`, which outlives the protected call.
    unsafe {
        call(
            l,
            trampoline,
            (&mut f as *mut Option<&mut dyn FnMut(*mut ffi::lua_State)>).cast(),
        )
    }
}

unsafe extern "C-unwind" fn trampoline(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: argument 1 is the pointer `call_backstop` pushed; the closure is called once.
    unsafe {
        let slot = ffi::lua_touserdata(l, 1).cast::<Option<&mut dyn FnMut(*mut ffi::lua_State)>>();
        ffi::lua_settop(l, 0);
        if let Some(f) = (*slot).take() {
            f(l);
        }
        // Whatever the closure pushed becomes the protected call's results.
        ffi::lua_gettop(l)
    }
}

/// A readable description of the value at `idx`, without calling metamethods.
///
/// # Safety
/// `idx` must be a valid index of `l`.
pub unsafe fn describe(l: *mut ffi::lua_State, idx: c_int) -> String {
    // SAFETY: `lua_type`, `lua_tolstring` on a value that already is a string, and the
    // number getters never allocate or raise.
    unsafe {
        match ffi::lua_type(l, idx) {
            ffi::LUA_TSTRING => {
                let mut len = 0usize;
                let p = ffi::lua_tolstring(l, idx, &mut len);
                if p.is_null() {
                    String::new()
                } else {
                    text_of(std::slice::from_raw_parts(p.cast::<u8>(), len))
                }
            }
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, idx) != 0 => {
                ffi::lua_tointegerx(l, idx, std::ptr::null_mut()).to_string()
            }
            ffi::LUA_TNUMBER => ffi::lua_tonumberx(l, idx, std::ptr::null_mut()).to_string(),
            t => {
                let name = CStr::from_ptr(ffi::lua_typename(l, t));
                format!("(error object is a {} value)", name.to_string_lossy())
            }
        }
    }
}

/// Bytes converted between two charges by [`text_of`]: the VM's piece.
const TEXT_PIECE: usize = crate::budget::PIECE;

/// `bytes` as text, as `String::from_utf8_lossy` would give it, converted in pieces of
/// [`TEXT_PIECE`] bytes with the work charged to the active run (if any) between pieces: an
/// error message can be as large as the heap, and converting it happens after the script's
/// last instruction. When the run is aborted meanwhile (a kill, the deadline, the budget),
/// the conversion stops there: the abort is then the run's outcome, and the message is cut.
fn text_of(bytes: &[u8]) -> String {
    // The whole length at once: growing by doubling would copy a large message again.
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut end = rest.len().min(TEXT_PIECE);
        // Cut before a byte that starts a character (not a continuation byte): a sequence
        // cut there is invalid whole too, so the pieces convert as the whole would.
        while end < rest.len() && end > 0 && rest[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        if end == 0 {
            end = rest.len().min(TEXT_PIECE);
        }
        let (piece, tail) = rest.split_at(end);
        out.push_str(&String::from_utf8_lossy(piece));
        rest = tail;
        if !rest.is_empty()
            && crate::budget::charge_and_check(crate::budget::byte_units(piece.len())).is_err()
        {
            break;
        }
    }
    out
}

extern "C-unwind" {
    fn sb_gcpause(l: *mut ffi::lua_State, saved: *mut [i64; 3]);
    fn sb_gcresume(l: *mut ffi::lua_State, saved: *const [i64; 3]);
}

/// Runs `f` with the collector of `l`'s state paused, so that no collection step (and no
/// finalizer) runs inside it, and its pacing kept: what `f` allocates counts as the
/// collector's debt afterwards, as if its steps were only deferred (`csrc/sb_baselib.c`;
/// stock `LUA_GCSTOP`/`LUA_GCRESTART` would start a step at the next allocation).
///
/// # Safety
/// `l` must be a thread of a live state that no collection step is running on.
pub unsafe fn collector_paused<R>(l: *mut ffi::lua_State, f: impl FnOnce() -> R) -> R {
    let mut saved = [0i64; 3];
    // SAFETY: reads and sets fields of the state's global state; never raises.
    unsafe { sb_gcpause(l, &mut saved) };
    let r = f();
    // SAFETY: as above; `saved` is what `sb_gcpause` wrote for this state.
    unsafe { sb_gcresume(l, &saved) };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_of_converts_in_pieces_as_a_whole() {
        // Characters of 1 to 4 bytes and invalid bytes, across many piece boundaries.
        let mut bytes = Vec::new();
        for i in 0..(3 * TEXT_PIECE / 2) {
            match i % 6 {
                0 => bytes.push(b'a'),
                1 => bytes.extend_from_slice("é".as_bytes()),
                2 => bytes.extend_from_slice("€".as_bytes()),
                3 => bytes.extend_from_slice("😀".as_bytes()),
                4 => bytes.push(0x80),
                _ => bytes.extend_from_slice(&[0xF0, 0x9F]),
            }
        }
        assert!(bytes.len() > 2 * TEXT_PIECE);
        assert_eq!(text_of(&bytes), String::from_utf8_lossy(&bytes));
        let junk = vec![0x80u8; TEXT_PIECE + 5];
        assert_eq!(text_of(&junk), String::from_utf8_lossy(&junk));
    }

    #[test]
    fn text_of_is_charged_and_stops_at_an_abort() {
        use crate::control::{Abort, Caller, Control};
        use crate::scope::Scope;
        let scope = Scope::budget(Control::new(100_000));
        let _a = scope.activate(Caller::none());
        // 4 MiB: 262 144 units, over the budget after ~1.5 MiB.
        let text = text_of(&vec![b'x'; 4 << 20]);
        assert!(text.len() < 2 << 20, "{}", text.len());
        assert_eq!(crate::budget::current_abort(), Some(Abort::Instructions));
    }
}
