//! The jail a worker process applies to itself after its snapshot is built and before it reads
//! any script (issue 18). Layers, in the order they are applied:
//!
//! 1. user, pid and ipc namespaces, where the kernel allows an unprivileged `unshare`;
//! 2. only the pipes stay open: every fd above stderr is closed (`close_range`);
//! 3. `no_new_privs`;
//! 4. Landlock deny-all: every filesystem and network access right handled, none granted, and
//!    the signal / abstract-socket scopes, as far as the kernel's ABI goes;
//! 5. rlimits: no new files (`RLIMIT_NOFILE` = 3), no processes
//!    (`RLIMIT_NPROC` = 0), no core dumps, address space bounded by the Lua arena's reservation + headroom;
//! 6. a seccomp-bpf allowlist (built with `seccompiler`) whose default kills the process.
//!
//! Layers 2, 3, 5 and 6 are required: if one cannot be applied, `apply` fails and the worker
//! must not serve. Layers 1 and 4 depend on the kernel; what is in force is reported in
//! [`Layers`], which the worker reports at boot, and each one missing is a warning (logged by
//! the BEAM) — never a
//! silent downgrade.

use std::collections::BTreeMap;
use std::fmt;

use crate::proto::Term;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Address space the worker may use on top of its Lua arena and its run buffers: its binary,
/// libc, stack.
pub const HEADROOM: u64 = 64 << 20;

/// The run buffers a worker serving runs of up to `max_memory` heap bytes gets: a run's
/// input frame and its decoded terms (bounded on the BEAM side by the run's `max_memory`), and
/// its answer (about `max_result_bytes`, 16 MiB by default, plus `max_output`), each while a
/// vector doubles. Four times `max_memory` held every case measured (a 50 MB string in and
/// out, a list of 2.5 M integers); a run past it ends `:worker_crashed`, the node unaffected.
pub fn buffers_for(max_memory: u64) -> u64 {
    max_memory.saturating_mul(4)
}

/// What the jail is asked to enforce.
#[derive(Clone, Debug)]
pub struct Config {
    /// The address space reserved for the worker's Lua arena (`pool::capacity_for` of the
    /// largest `max_memory` it serves); the address space is bounded by this, `buffers` and
    /// [`HEADROOM`].
    pub arena: u64,
    /// The run buffers ([`buffers_for`]).
    pub buffers: u64,
}

/// Which layers are in force, as the worker reports them at boot ([`Layers::to_term`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layers {
    /// Namespaces unshared, or why not.
    pub user_ns: Result<(), String>,
    pub pid_ns: Result<(), String>,
    pub ipc_ns: Result<(), String>,
    /// Every fd above 2 closed.
    pub fds_closed: bool,
    /// `RLIMIT_AS` in bytes.
    pub address_space: u64,
    pub rlimits: bool,
    pub no_new_privs: bool,
    /// Landlock: `Ok(abi)` when fully enforced at that ABI, or why not (partially or not at all).
    pub landlock: Result<String, String>,
    pub seccomp: bool,
}

impl Layers {
    /// The boot frame's list (`src/proto.rs`): `{name, state}` per layer, in the order they
    /// are applied, where `state` is `:on`, `{:on, detail}`, `{:off, reason}` or, for
    /// `address_space`, the bound in bytes.
    pub fn to_term(&self) -> Term {
        let on = Term::atom("on");
        let off = |why: &str| Term::tuple([Term::atom("off"), Term::bin(why)]);
        let ns = |r: &Result<(), String>| match r {
            Ok(()) => on.clone(),
            Err(why) => off(why),
        };
        let flag = |b: bool| if b { on.clone() } else { off("not applied") };
        let layers = [
            ("user_ns", ns(&self.user_ns)),
            ("pid_ns", ns(&self.pid_ns)),
            ("ipc_ns", ns(&self.ipc_ns)),
            ("fds_closed", flag(self.fds_closed)),
            ("no_new_privs", flag(self.no_new_privs)),
            (
                "landlock",
                match &self.landlock {
                    Ok(abi) => Term::tuple([on.clone(), Term::bin(abi)]),
                    Err(why) => off(why),
                },
            ),
            ("rlimits", flag(self.rlimits)),
            ("address_space", Term::Int(self.address_space as i64)),
            ("seccomp", flag(self.seccomp)),
        ];
        Term::List(
            layers
                .into_iter()
                .map(|(name, state)| Term::tuple([Term::atom(name), state]))
                .collect(),
        )
    }
}

/// A required layer could not be applied: the worker must exit instead of serving.
#[derive(Debug)]
pub struct JailError(pub String);

impl fmt::Display for JailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jail: {}", self.0)
    }
}

impl std::error::Error for JailError {}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

extern "C" {
    fn tzset();
}

/// Loads the time zone once, before the jail: `os.date` and `os.time{...}` (strftime,
/// localtime, mktime) call glibc's `tzset`, which with `TZ` unset stats and re-reads
/// /etc/localtime every time, system calls the filter kills (a jailed `os.date()` was a
/// SIGSYS). With `TZ` naming the zone, every later `tzset` sees the name it already loaded and
/// touches no file. The zone is the BEAM's: its `TZ` is inherited, and glibc's default file
/// when it has none, so `os.date` reads as under the NIF.
fn freeze_time_zone() {
    if std::env::var_os("TZ").is_none() {
        // The worker has one thread at this point: nothing reads the environment concurrently.
        std::env::set_var("TZ", ":/etc/localtime");
    }
    // SAFETY: tzset takes no arguments; single-threaded here, as above.
    unsafe { tzset() };
}

/// Applies every layer to the calling process. Must be called while the process has one
/// thread (an unprivileged user namespace requires it, and seccomp is installed for this
/// thread only).
pub fn apply(config: &Config) -> Result<Layers, JailError> {
    let unshare = |flag: libc::c_int| -> Result<(), String> {
        // SAFETY: unshare only changes this process's namespace membership; no memory is
        // passed.
        if unsafe { libc::unshare(flag) } == 0 {
            Ok(())
        } else {
            Err(errno().to_string())
        }
    };
    // Sessions' checkpoints would open /proc/self/pagemap and a userfaultfd on first use;
    // the filter below forbids both.
    lua_sandbox_core::written::disable();
    freeze_time_zone();
    // The user namespace first: in it, the process may create the others without privileges.
    let user_ns = unshare(libc::CLONE_NEWUSER);
    let pid_ns = unshare(libc::CLONE_NEWPID);
    let ipc_ns = unshare(libc::CLONE_NEWIPC);

    close_other_fds()?;

    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError(format!("no_new_privs: {}", errno())));
    }

    // Landlock needs an fd for its ruleset: before RLIMIT_NOFILE forbids new ones.
    let landlock = landlock_deny_all();
    let address_space = config
        .arena
        .saturating_add(config.buffers)
        .saturating_add(HEADROOM);
    set_rlimits(address_space)?;
    install_seccomp()?;

    Ok(Layers {
        user_ns,
        pid_ns,
        ipc_ns,
        fds_closed: true,
        address_space,
        rlimits: true,
        no_new_privs: true,
        landlock,
        seccomp: true,
    })
}

fn close_other_fds() -> Result<(), JailError> {
    // SAFETY: close_range(3, ~0, 0) closes fds this process holds above stderr; nothing in
    // the worker owns one at this point (the snapshot is in memory, not behind an fd), so no
    // Rust object is left with a dangling descriptor.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(JailError(format!("close_range: {}", errno())));
    }
    Ok(())
}

fn set_rlimits(address_space: u64) -> Result<(), JailError> {
    let limits = [
        // fds 0, 1, 2 are the only ones: the next would be 3.
        (libc::RLIMIT_NOFILE, 3, "RLIMIT_NOFILE"),
        (libc::RLIMIT_NPROC, 0, "RLIMIT_NPROC"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (libc::RLIMIT_AS, address_space, "RLIMIT_AS"),
    ];
    for (resource, value, name) in limits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `lim` is a live rlimit for the duration of the call.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(JailError(format!("{name}: {}", errno())));
        }
    }
    Ok(())
}

fn landlock_deny_all() -> Result<String, String> {
    use landlock::{Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope, ABI};
    // The newest ABI this crate knows; best effort: the kernel's intersection is enforced and
    // the status says whether that was all of it.
    let abi = ABI::V6;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| e.to_string())?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(format!("{:?}", status.landlock)),
        RulesetStatus::PartiallyEnforced => Err(format!("partial: {:?}", status.landlock)),
        RulesetStatus::NotEnforced => Err(format!("not enforced: {:?}", status.landlock)),
    }
}

/// The system calls a jailed worker makes while serving: reading requests on fd 0, writing
/// answers on fds 1 and 2, memory (never executable), time, randomness, futexes, signals to
/// itself, exit. Everything else — open/openat, socket, connect, execve, fork/clone, ptrace,
/// kill of another process, io_uring, ... — kills the process with SIGSYS.
pub fn filter() -> Result<BpfProgram, JailError> {
    let err = |e: seccompiler::BackendError| JailError(format!("seccomp rule: {e}"));
    let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
    };
    let rule = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(err);
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    let no_exec = || cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        // only reads the state of fds it holds: how the worker sees its BEAM hang up
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(nr, vec![]);
    }
    rules.insert(
        libc::SYS_read,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, 0)?])?],
    );
    for nr in [libc::SYS_write, libc::SYS_writev] {
        rules.insert(
            nr,
            vec![
                rule(vec![cond(0, SeccompCmpOp::Eq, 1)?])?,
                rule(vec![cond(0, SeccompCmpOp::Eq, 2)?])?,
            ],
        );
    }
    // Memory, never executable.
    rules.insert(libc::SYS_mmap, vec![rule(vec![no_exec()?])?]);
    rules.insert(libc::SYS_mprotect, vec![rule(vec![no_exec()?])?]);
    // Signals only to itself (abort() raises SIGABRT through tgkill).
    rules.insert(
        libc::SYS_kill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, me)?])?],
    );
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, me)?])?],
    );

    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| JailError(format!("seccomp arch: {e}")))?;
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(f).map_err(err)
}

fn install_seccomp() -> Result<(), JailError> {
    let prog = filter()?;
    seccompiler::apply_filter(&prog).map_err(|e| JailError(format!("seccomp: {e}")))
}
