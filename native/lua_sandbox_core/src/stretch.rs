//! The hole finder (issue 16), in test builds only (the `stretch` feature, off in release):
//! records the longest stretch of this thread's CPU time between two budget checks while a
//! run is active, and where the check that ended it was made.
//!
//! A check is a run of the ticker (the budget's `tick`), the start of an activation (a
//! NIF call starts running a script) or its end. A stretch longer than any seen before in
//! this OS process is appended to the file named by `LUA_SANDBOX_STRETCH_LOG` as
//! `<µs>\t<where>`, `where` being the Lua position of the running function (`source:line`,
//! or `[C]`/`no frame`) and the event. So any operation that does work no check follows —
//! the next hole — shows up without anyone naming it: `make stretch` runs the generated and
//! adversarial suites under this build and fails if the longest stretch exceeds 1 ms.

use std::cell::Cell;
use std::ffi::CStr;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mlua_sys as ffi;

use crate::clock::thread_cpu;

thread_local! {
    /// This thread's CPU time at its last check (None outside a run).
    static LAST: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// The longest stretch seen by this process, in µs.
static LONGEST: AtomicU64 = AtomicU64::new(0);

/// A run became active on this thread: its first stretch starts now.
pub(crate) fn start() {
    LAST.with(|c| c.set(Some(thread_cpu())));
}

/// The active run left this thread: its last stretch ends now.
pub(crate) fn stop() {
    check(std::ptr::null_mut(), "end of a NIF call");
    LAST.with(|c| c.set(None));
}

/// A budget check on `l` (null: no state at hand).
pub(crate) fn check(l: *mut ffi::lua_State, event: &str) {
    let now = thread_cpu();
    let Some(last) = LAST.with(|c| c.replace(Some(now))) else {
        return;
    };
    let us = now.saturating_sub(last).as_micros() as u64;
    if us <= LONGEST.load(Ordering::Relaxed) {
        return;
    }
    LONGEST.fetch_max(us, Ordering::Relaxed);
    let place = where_(l);
    if let Some(path) = std::env::var_os("LUA_SANDBOX_STRETCH_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{us}\t{place} ({event})");
        }
    }
}

fn where_(l: *mut ffi::lua_State) -> String {
    if l.is_null() {
        return "no state".to_string();
    }
    // SAFETY: called from the ticker (or a check) of the running state `l` on its own thread;
    // `lua_getstack` and `lua_getinfo` with "Sl" only read the call info and the function's
    // prototype into `ar` (no allocation, no raise, no stack change), which the ticker's
    // contract allows (test builds only).
    unsafe {
        let mut ar: ffi::lua_Debug = std::mem::zeroed();
        if ffi::lua_getstack(l, 0, &mut ar) == 0 {
            return "no frame".to_string();
        }
        if ffi::lua_getinfo(l, c"Sl".as_ptr(), &mut ar) == 0 {
            return "no info".to_string();
        }
        let src = CStr::from_ptr(ar.short_src.as_ptr()).to_string_lossy();
        format!("{src}:{}", ar.currentline)
    }
}
