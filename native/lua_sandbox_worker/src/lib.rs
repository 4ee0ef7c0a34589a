//! The worker process of `isolation: :process` (issue 18), rustler-free: the jail the worker
//! applies to itself ([`jail`]), the frames it speaks with the BEAM ([`proto`]), the runs it
//! serves ([`run`], with the values converted by [`marshal`]) and, in
//! `src/bin/worker/`, the worker binary (built by the Mix compiler and installed in `priv/`).

pub mod jail;
pub mod marshal;
pub mod proto;
pub mod run;
pub mod session;

/// Whether the BEAM has closed the worker's end (the port was closed: its caller died, or the
/// pool gave up on it): the pipe on fd 0 has hung up. Never blocks. A busy worker checks it as
/// it goes and exits when it is true, so no one has to kill it by pid from outside (a pid may be
/// reused once its process is gone).
pub fn hung_up() -> bool {
    stdin_events(0) & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Whether the BEAM wants the run in progress stopped: it hung up ([`hung_up`]), or it sent
/// `{id, :cancel}` (a session's caller died, `crate::session`). A frame waiting on fd 0 during
/// a run is read here (the worker reads its frames unbuffered, `main.rs`, so a frame sent is
/// seen here until it is read): a cancel is kept ([`take_cancel`], answered after the run's
/// answer) and stops the run from then on; any other frame is a protocol error (the BEAM sends
/// nothing else to a worker while a run is in progress), which ends the worker at once with a
/// message on stderr and exit status [`PROTOCOL_ERROR`]. Never blocks, except to read the rest
/// of a frame whose start has arrived.
pub fn cancelled() -> bool {
    if lock_cancel().is_some() {
        return true;
    }
    let events = stdin_events(libc::POLLIN);
    if events & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 && events & libc::POLLIN == 0
    {
        return true;
    }
    if events & libc::POLLIN == 0 {
        return false;
    }
    // SAFETY: fd 0 is open for the life of the process (the port's pipe), and the ManuallyDrop
    // never closes it.
    let mut input = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(0)
    });
    let frame = match proto::read_frame(&mut *input) {
        // the BEAM closed its end
        Ok(None) | Err(_) => return true,
        Ok(Some(frame)) => frame,
    };
    match proto::decode(&frame) {
        Ok(proto::Term::Tuple(t)) if t.len() == 2 && t[1].as_atom() == Some("cancel") => {
            *lock_cancel() = Some(t[0].clone());
            true
        }
        other => protocol_error(&format!(
            "a frame other than {{id, :cancel}} arrived during a run: {other:?}"
        )),
    }
}

/// The exit status of a worker that ended on a protocol error.
pub const PROTOCOL_ERROR: i32 = 4;

/// Ends the worker: the BEAM broke the protocol (`src/proto.rs`), so nothing it sends can be
/// trusted to mean what it should. `std::process::exit` unwinds nothing (no Lua frame is
/// crossed by a Rust unwind): the process ends where it stands.
pub fn protocol_error(what: &str) -> ! {
    eprintln!("lua_sandbox_worker: protocol error: {what}");
    std::process::exit(PROTOCOL_ERROR)
}

/// The id of a `:cancel` read during a run ([`cancelled`]), to answer `:cancelled` after the
/// run's answer; taken once.
pub fn take_cancel() -> Option<proto::Term> {
    lock_cancel().take()
}

static CANCEL: std::sync::Mutex<Option<proto::Term>> = std::sync::Mutex::new(None);

fn lock_cancel() -> std::sync::MutexGuard<'static, Option<proto::Term>> {
    // Only a store or a take happen under the lock: a panic cannot leave it inconsistent.
    CANCEL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `revents` of fd 0 polled for `events` (0 when nothing happened). Never blocks.
fn stdin_events(events: libc::c_short) -> libc::c_short {
    let mut fd = libc::pollfd {
        fd: 0,
        events,
        revents: 0,
    };
    // SAFETY: `fd` is one live pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    if n > 0 {
        fd.revents
    } else {
        0
    }
}

/// Makes the kernel kill this process when its parent (the BEAM's port forker) dies, so a busy
/// worker cannot outlive its node. Exits at once if the parent is already gone.
pub fn die_with_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl(PR_SET_PDEATHSIG, SIGKILL) takes no pointers.
    let set = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: as above.
    if set != 0 || parent == 1 || unsafe { libc::getppid() } != parent {
        std::process::exit(3);
    }
}
