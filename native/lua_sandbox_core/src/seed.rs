//! Fresh randomness for every run.
//!
//! A restored state carries the snapshot's `math.random` generator, so without a new seed
//! every run in a slot would see the same sequence. [`reseed`] seeds it from the kernel's
//! random source (`getrandom`), once per run: a run learns nothing about another run's
//! sequence, as with stock Lua, where each new state seeds itself.

use std::ffi::c_int;

use mlua_sys as ffi;

use crate::protect::{self, LuaFailure};

/// 128 bits from the kernel (falling back to the clock and a counter if `getrandom` fails).
pub fn random_pair() -> (i64, i64) {
    let mut buf = [0u8; 16];
    // SAFETY: `buf` is a writable 16-byte buffer; getrandom writes at most that many bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n != 16 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        buf[..8].copy_from_slice(&t.to_le_bytes());
        buf[8..].copy_from_slice(&c.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    let (a, b) = buf.split_at(8);
    let a = i64::from_le_bytes(a.try_into().unwrap_or([0; 8]));
    let b = i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    (a, b)
}

/// Seeds `math.random` of `l` with fresh kernel randomness (no-op without a `math` table).
///
/// # Safety
/// `l` must be a valid, non-running state with room for a few values.
pub unsafe fn reseed(l: *mut ffi::lua_State) -> Result<(), LuaFailure> {
    let mut seed = random_pair();
    // SAFETY: `reseed_in_lua` follows the raising discipline; `seed` outlives the call.
    unsafe { protect::call(l, reseed_in_lua, (&mut seed as *mut (i64, i64)).cast()) }
}

unsafe extern "C-unwind" fn reseed_in_lua(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: argument 1 is the light userdata `reseed` pushed, pointing at a live pair; the
    // calls below may raise (longjmp) with no Rust value with a destructor alive.
    unsafe {
        let (a, b) = *ffi::lua_touserdata(l, 1).cast::<(i64, i64)>();
        if ffi::lua_getglobal(l, c"math".as_ptr()) != ffi::LUA_TTABLE {
            return 0;
        }
        if ffi::lua_getfield(l, -1, c"randomseed".as_ptr()) != ffi::LUA_TFUNCTION {
            return 0;
        }
        ffi::lua_pushinteger(l, a);
        ffi::lua_pushinteger(l, b);
        ffi::lua_call(l, 2, 0);
    }
    0
}
