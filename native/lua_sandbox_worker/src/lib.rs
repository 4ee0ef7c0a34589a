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

/// Whether the BEAM wants the run in progress stopped: it hung up ([`hung_up`]), or a frame is
/// waiting on fd 0. The BEAM sends nothing to a worker while a run is in progress except a
/// session's `:cancel` (its caller died, `crate::session`), so a readable pipe mid-run is one.
/// The worker reads its frames unbuffered (`main.rs`), so a frame sent is seen here until it
/// is read. Never blocks.
pub fn cancelled() -> bool {
    stdin_events(libc::POLLIN) & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL)
        != 0
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
