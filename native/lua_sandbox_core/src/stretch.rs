//! The hole finder (issue 16), in test builds only (the `stretch` feature, off in release):
//! records the stretches of this thread's CPU time between two budget checks while a run is
//! active, and names each one.
//!
//! A check is a run of the ticker (the budget's `tick`), a charge made outside the VM, the
//! start of an activation (a NIF call starts running a script) or its end. Every stretch of
//! at least `LUA_SANDBOX_STRETCH_MIN_US` µs (default 1000), and every one longer than any seen
//! before in this OS process, is appended to the file named by `LUA_SANDBOX_STRETCH_LOG` as
//! one tab-separated line:
//!
//! `<µs>  <where it ended> (<event>)  <test>  from <where it started>[ | +<µs> <site>]...`
//!
//! A place is `source:line` of the running Lua function, or `[C] name in source:line` for a C
//! function (its Lua name when a Lua function called it, `?` otherwise, and the nearest Lua
//! frame below it), or the Rust site of a charge outside the VM. Work charged up front and
//! done after its check shows up as a stretch *from* the function that charged. `<test>` is
//! the content of the file named by `LUA_SANDBOX_STRETCH_TEST` when the line is written (the
//! test suite's formatter keeps the current test's name there). The `+<µs> <site>` parts are
//! [`mark`]s: named points inside the boundary's own work (after the script returned, after
//! the result was converted, ...), so a stretch that ends a NIF call says which part of the
//! call's tail it was spent in. So any operation that does work no check follows — the next
//! hole — shows up located, without anyone naming it: `make stretch` runs the generated and
//! adversarial suites under this build and fails if the longest stretch exceeds 1 ms.

#[cfg(feature = "stretch")]
pub(crate) use imp::{check, start, stop};

/// Notes that the active run's thread reached the caller's source position (a named point of
/// the boundary's own work, not a budget check): a stretch logged later lists the CPU time
/// spent up to each mark since the last check. A no-op outside the `stretch` feature.
#[track_caller]
#[inline(always)]
pub fn mark() {
    #[cfg(feature = "stretch")]
    imp::mark(std::panic::Location::caller());
}

#[cfg(feature = "stretch")]
mod imp {
    use std::cell::{Cell, RefCell};
    use std::ffi::CStr;
    use std::fmt::Write as _;
    use std::io::Write;
    use std::panic::Location;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    use mlua_sys as ffi;

    use crate::clock::thread_cpu;

    /// Marks kept between two checks (the earliest ones; a stretch has a handful).
    const MAX_MARKS: usize = 32;

    thread_local! {
        /// This thread's CPU time at its last check (None outside a run).
        static LAST: Cell<Option<Duration>> = const { Cell::new(None) };
        /// Where the last check was made.
        static FROM: RefCell<String> = const { RefCell::new(String::new()) };
        /// The marks passed since the last check: CPU time and source position.
        static MARKS: RefCell<Vec<(Duration, &'static Location<'static>)>> =
            const { RefCell::new(Vec::new()) };
    }

    /// The longest stretch seen by this process, in µs.
    static LONGEST: AtomicU64 = AtomicU64::new(0);

    fn min_us() -> u64 {
        static MIN: OnceLock<u64> = OnceLock::new();
        *MIN.get_or_init(|| {
            std::env::var("LUA_SANDBOX_STRETCH_MIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000)
        })
    }

    /// A run became active on this thread: its first stretch starts now.
    pub(crate) fn start() {
        LAST.with(|c| c.set(Some(thread_cpu())));
        FROM.with(|f| {
            let mut f = f.borrow_mut();
            f.clear();
            f.push_str("start of a NIF call");
        });
        MARKS.with(|m| m.borrow_mut().clear());
    }

    /// The active run left this thread: its last stretch ends now.
    pub(crate) fn stop() {
        check(std::ptr::null_mut(), "end of a NIF call");
        LAST.with(|c| c.set(None));
    }

    pub(super) fn mark(site: &'static Location<'static>) {
        if LAST.with(|c| c.get()).is_none() {
            return;
        }
        let now = thread_cpu();
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() < MAX_MARKS {
                m.push((now, site));
            }
        });
    }

    /// A budget check on `l` (null: no state at hand), `event` saying which.
    pub(crate) fn check(l: *mut ffi::lua_State, event: &str) {
        let now = thread_cpu();
        let Some(last) = LAST.with(|c| c.replace(Some(now))) else {
            return;
        };
        let here = format!("{} ({event})", where_(l));
        let from = FROM.with(|f| std::mem::replace(&mut *f.borrow_mut(), here.clone()));
        let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
        let us = now.saturating_sub(last).as_micros() as u64;
        let record = LONGEST.fetch_max(us, Ordering::Relaxed) < us;
        if us < min_us() && !record {
            return;
        }
        let Some(path) = std::env::var_os("LUA_SANDBOX_STRETCH_LOG") else {
            return;
        };
        let test = std::env::var_os("LUA_SANDBOX_STRETCH_TEST")
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().replace(['\t', '\n'], " "))
            .unwrap_or_default();
        let mut line = format!("{us}\t{here}\t{test}\tfrom {from}");
        let mut at = last;
        for (t, site) in marks {
            let _ = write!(line, " | +{} {site}", t.saturating_sub(at).as_micros());
            at = t;
        }
        if at != last {
            let _ = write!(line, " | +{} here", now.saturating_sub(at).as_micros());
        }
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    fn where_(l: *mut ffi::lua_State) -> String {
        if l.is_null() {
            return "no state".to_string();
        }
        // SAFETY: called from the ticker (or a check) of the running state `l` on its own
        // thread; `lua_getstack` and `lua_getinfo` with "Sln" only read the call info, the
        // calling instruction and the function's prototype into `ar` (no allocation, no raise,
        // no stack change: no "f" or "L"), which the ticker's contract allows (test builds
        // only). The strings they point `ar` at live in the state, which outlives this call.
        unsafe {
            let mut ar: ffi::lua_Debug = std::mem::zeroed();
            if ffi::lua_getstack(l, 0, &mut ar) == 0 {
                return "no frame".to_string();
            }
            if ffi::lua_getinfo(l, c"Sln".as_ptr(), &mut ar) == 0 {
                return "no info".to_string();
            }
            if ar.currentline >= 0 {
                return position(&ar);
            }
            let name = if ar.name.is_null() {
                "?".into()
            } else {
                CStr::from_ptr(ar.name).to_string_lossy()
            };
            let mut level = 1;
            while ffi::lua_getstack(l, level, &mut ar) != 0 {
                if ffi::lua_getinfo(l, c"Sl".as_ptr(), &mut ar) != 0 && ar.currentline >= 0 {
                    return format!("[C] {name} in {}", position(&ar));
                }
                level += 1;
            }
            format!("[C] {name}")
        }
    }

    /// `source:line` of a Lua frame `lua_getinfo` filled in.
    fn position(ar: &ffi::lua_Debug) -> String {
        // SAFETY: `short_src` is a NUL-terminated buffer inside `ar`, written by
        // `lua_getinfo`.
        let src = unsafe { CStr::from_ptr(ar.short_src.as_ptr()) }.to_string_lossy();
        format!("{src}:{}", ar.currentline)
    }
}
