//! The hole finder (issue 16), in test builds only (the `stretch` feature, off in release):
//! records the stretches of this thread's CPU time between two budget checks while a run is
//! active (never counted above the wall time that passed: see `Point::since`), and names each
//! one.
//!
//! A check is a run of the ticker (the budget's `tick`), a charge made outside the VM, the
//! start of an activation (a NIF call starts running a script) or its end. Every stretch of
//! at least `LUA_SANDBOX_STRETCH_MIN_US` µs (default 1000), and every one longer than any seen
//! before in this OS process, is appended to the file named by `LUA_SANDBOX_STRETCH_LOG` as
//! one tab-separated line (shown on two here):
//!
//! `<µs>  <where it ended> (<event>)  <test>  from <where it started>[ | +<µs> <site>]...`
//! `| at <t>`
//!
//! A place is `source:line` of the running Lua function, or `[C] name in source:line` for a C
//! function (its Lua name when a Lua function called it, `?` otherwise, and the nearest Lua
//! frame below it), or the Rust site of a charge outside the VM. Work charged up front and
//! done after its check shows up as a stretch *from* the function that charged. `<test>` is
//! the content of the file named by `LUA_SANDBOX_STRETCH_TEST` when the line is written (the
//! test suite's formatter keeps the current test's name there). The `+<µs> <site>` parts are
//! [`mark`]s: named points inside the boundary's own work (after the script returned, after
//! the result was converted, ...), so a stretch that ends a NIF call says which part of the
//! call's tail it was spent in. `<t>` is the Unix time (s.µs) when the line was written, to
//! match a stretch with what happened outside the process then (bench/stall_witness.c records
//! the moments the machine stalls every thread at once). So any operation that does work no
//! check follows — the next hole — shows up located, without anyone naming it: `make stretch`
//! runs the generated and adversarial suites under this build and fails if the longest
//! stretch exceeds 1 ms.
//!
//! A Lua position names the script's line, not the C function at work under it (the
//! collector's phase, a table's growth). With `LUA_SANDBOX_STRETCH_NATIVE` set, every check
//! also captures the native stack (its cost is not counted: the stretch restarts after it)
//! and a logged line ends with `| native: <f> < <caller> < ...` for both ends, `here` and
//! `from`: the functions below the check, innermost first (`make stretch` builds with line
//! tables, so C functions inlined into their callers are named too). It slows the suites
//! several times over: it is for locating a stretch, not for the full run.

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
    use std::backtrace::Backtrace;
    use std::cell::{Cell, RefCell};
    use std::ffi::CStr;
    use std::fmt::Write as _;
    use std::io::Write;
    use std::panic::Location;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use mlua_sys as ffi;

    use crate::clock::thread_cpu;

    /// A moment of the running thread: its CPU time and the wall clock.
    #[derive(Clone, Copy)]
    struct Point {
        cpu: Duration,
        wall: Instant,
    }

    impl Point {
        fn now() -> Point {
            Point {
                cpu: thread_cpu(),
                wall: Instant::now(),
            }
        }

        /// The thread's CPU time since `earlier`, never more than the wall time between the
        /// two: on a virtual machine the thread CPU clock was seen to advance 1.4 ms in 30 µs
        /// of wall time (bench/stall_witness.c), which is no work of the run's.
        fn since(self, earlier: Point) -> Duration {
            let cpu = self.cpu.saturating_sub(earlier.cpu);
            cpu.min(self.wall.saturating_duration_since(earlier.wall))
        }
    }

    /// Marks kept between two checks (the earliest ones; a stretch has a handful).
    const MAX_MARKS: usize = 32;

    thread_local! {
        /// This thread's CPU and wall time at its last check (None outside a run).
        static LAST: Cell<Option<Point>> = const { Cell::new(None) };
        /// Where the last check was made.
        static FROM: RefCell<String> = const { RefCell::new(String::new()) };
        /// The marks passed since the last check: time and source position.
        static MARKS: RefCell<Vec<(Point, &'static Location<'static>)>> =
            const { RefCell::new(Vec::new()) };
        /// The native stack at the last check (with `LUA_SANDBOX_STRETCH_NATIVE` only).
        static FROM_STACK: RefCell<Option<Backtrace>> = const { RefCell::new(None) };
    }

    /// The longest stretch seen by this process, in µs.
    static LONGEST: AtomicU64 = AtomicU64::new(0);

    /// Whether checks capture the native stack (`LUA_SANDBOX_STRETCH_NATIVE` set).
    fn native() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("LUA_SANDBOX_STRETCH_NATIVE").is_some())
    }

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
        let stack = native().then(Backtrace::force_capture);
        FROM_STACK.with(|f| *f.borrow_mut() = stack);
        LAST.with(|c| c.set(Some(Point::now())));
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
        let now = Point::now();
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() < MAX_MARKS {
                m.push((now, site));
            }
        });
    }

    /// A budget check on `l` (null: no state at hand), `event` saying which.
    pub(crate) fn check(l: *mut ffi::lua_State, event: &str) {
        let now = Point::now();
        let Some(last) = LAST.with(|c| c.replace(Some(now))) else {
            return;
        };
        let here = format!("{} ({event})", where_(l));
        let from = FROM.with(|f| std::mem::replace(&mut *f.borrow_mut(), here.clone()));
        let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
        let us = now.since(last).as_micros() as u64;
        let record = LONGEST.fetch_max(us, Ordering::Relaxed) < us;
        // This check's native stack (unresolved: cheap), kept as where the next stretch starts.
        let stack = native().then(Backtrace::force_capture);
        let logged = us >= min_us() || record;
        if logged {
            let from_stack = FROM_STACK.with(|f| f.borrow_mut().take());
            let stacks = stack.as_ref().map(|s| (s, from_stack.as_ref()));
            log(us, here, from, marks, last, now, stacks);
        }
        if stack.is_some() {
            FROM_STACK.with(|f| *f.borrow_mut() = stack);
        }
        if logged || native() {
            // The next stretch starts after the capture and the line's writing (stacks
            // resolved, a file appended): the hole finder's own work, not the run's.
            LAST.with(|c| c.set(Some(Point::now())));
        }
    }

    /// Appends the line of a stretch of `us` µs from the check at `last` to the one at `now`.
    fn log(
        us: u64,
        here: String,
        from: String,
        marks: Vec<(Point, &'static Location<'static>)>,
        last: Point,
        now: Point,
        stacks: Option<(&Backtrace, Option<&Backtrace>)>,
    ) {
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
            let _ = write!(line, " | +{} {site}", t.since(at).as_micros());
            at = t;
        }
        if at.wall != last.wall {
            let _ = write!(line, " | +{} here", now.since(at).as_micros());
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = write!(line, " | at {}.{:06}", t.as_secs(), t.subsec_micros());
        if let Some((here, from)) = stacks {
            let from = from.map_or_else(|| "-".to_string(), below_check);
            let _ = write!(
                line,
                " | native: {} | native from: {from}",
                below_check(here)
            );
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

    /// Frames of the native stack shown per end of a stretch.
    const NATIVE_FRAMES: usize = 8;

    /// The names of the first [`NATIVE_FRAMES`] functions below the check on `stack`, innermost
    /// first: the frames of the capture, of this module and of the ticker are left out.
    fn below_check(stack: &Backtrace) -> String {
        // `Backtrace` gives its frames only as text: `   <n>: <function>` lines, each followed
        // by an indented `at <file>:<line>` line when the build has line tables.
        let text = stack.to_string();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                let (n, name) = l.trim_start().split_once(": ")?;
                n.parse::<usize>().ok().map(|_| name)
            })
            .collect();
        // The capture's frames and the check's own (this module's, the ticker's) come first.
        // With line tables an inlined frame has its bare name (`check`, `then<...>`), so a
        // frame is matched by its name without path or generic arguments.
        let own = |name: &str| {
            let bare = name.split('<').next().unwrap_or(name);
            let bare = bare.rsplit("::").next().unwrap_or(bare);
            name.to_ascii_lowercase().contains("backtrace")
                || name.starts_with("lua_sandbox_core::stretch")
                || ["start", "stop", "check", "tick", "sandboxcall"].contains(&bare)
        };
        let first = names.iter().position(|n| !own(n)).unwrap_or(names.len());
        names[first..]
            .iter()
            .take(NATIVE_FRAMES)
            .copied()
            .collect::<Vec<_>>()
            .join(" < ")
    }

    /// `source:line` of a Lua frame `lua_getinfo` filled in.
    fn position(ar: &ffi::lua_Debug) -> String {
        // SAFETY: `short_src` is a NUL-terminated buffer inside `ar`, written by
        // `lua_getinfo`.
        let src = unsafe { CStr::from_ptr(ar.short_src.as_ptr()) }.to_string_lossy();
        format!("{src}:{}", ar.currentline)
    }
}
