//! Proof the wall holds: the worker (built with its `wall-probes`) performs raw system calls
//! from inside the jail, and each ends in EPERM or SIGSYS, never in an effect outside — checked
//! from outside (the file is not there, the victim process is alive, the fd's file is empty).
//! Each probe is also run once without the jail (`--no-jail`), where it must have its effect:
//! the check can fail.

use std::io::BufReader;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use lua_sandbox_worker::proto::{self, Term};

const WORKER: &str = env!("CARGO_BIN_EXE_worker");
/// The fd number a file is handed to the worker under, before its jail.
const GIVEN_FD: i32 = 5;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The boot frame's layers: `{name, state}` each.
    boot: Vec<(String, Term)>,
    next_id: i64,
}

impl Worker {
    /// Spawns the worker; `given` is opened and handed to it as fd 5 (inherited, as a leaked
    /// descriptor of the parent would be).
    fn spawn(jailed: bool, given: Option<&PathBuf>) -> Worker {
        let mut cmd = Command::new(WORKER);
        if !jailed {
            cmd.arg("--no-jail");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = given {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .unwrap();
            let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
            // SAFETY: between fork and exec only dup2 or fcntl runs, both async-signal-safe; the
            // new fd 5 has no close-on-exec flag, so the worker inherits it. When the file
            // was opened as fd 5 itself (the lowest free fd, as concurrent tests left it),
            // dup2 would leave its close-on-exec flag on: it is cleared instead.
            unsafe {
                cmd.pre_exec(move || {
                    let r = if fd == GIVEN_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, GIVEN_FD)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("the worker binary");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let frame = proto::read_frame(&mut stdout)
            .unwrap()
            .expect("a boot frame");
        let Ok(Term::Tuple(t)) = proto::decode(&frame) else {
            panic!("boot frame {frame:?}")
        };
        assert_eq!(t[0], Term::atom("boot"));
        let Term::List(layers) = &t[1] else {
            panic!("boot layers {t:?}")
        };
        let boot = layers
            .iter()
            .map(|l| match l {
                Term::Tuple(p) => (p[0].as_atom().unwrap().to_string(), p[1].clone()),
                other => panic!("layer {other:?}"),
            })
            .collect();
        Worker {
            child,
            stdin,
            stdout,
            boot,
            next_id: 1,
        }
    }

    fn layer(&self, name: &str) -> Option<&Term> {
        self.boot.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Sends one request; the answer, or None when the worker died instead.
    fn ask(&mut self, request: Term) -> Option<Term> {
        let id = self.next_id;
        self.next_id += 1;
        proto::write_frame(&mut self.stdin, &Term::tuple([Term::Int(id), request])).ok()?;
        let frame = proto::read_frame(&mut self.stdout).ok()??;
        match proto::decode(&frame) {
            Ok(Term::Tuple(mut t)) if t.len() == 2 && t[0] == Term::Int(id) => t.pop(),
            other => panic!("answer to {id}: {other:?}"),
        }
    }

    /// `{:probe, name, operand}`, from `"name operand"`.
    fn probe(&mut self, probe: &str) -> Option<Term> {
        let (name, operand) = probe.split_once(' ').unwrap_or((probe, ""));
        self.ask(Term::tuple([
            Term::atom("probe"),
            Term::bin(name),
            Term::bin(operand),
        ]))
    }

    /// Runs `source` in the worker's state: `tostring` of its first result.
    fn lua(&mut self, source: &str) -> Option<Term> {
        self.probe(&format!("lua {source}"))
    }

    /// Waits for the worker to exit: the signal that killed it, if one did.
    fn signal(mut self) -> Option<i32> {
        drop(self.stdin);
        self.child.wait().unwrap().signal()
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lua_sandbox_wall_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// How a probe ended in the jail.
#[derive(Debug, PartialEq)]
enum Ended {
    Errno(i32),
    Sigsys,
    Succeeded(Term),
    Other(Option<Term>, Option<i32>),
}

fn ok(s: &str) -> Option<Term> {
    Some(Term::tuple([Term::atom("ok"), Term::bin(s)]))
}

fn errno(answer: &Term) -> Option<i32> {
    match answer {
        Term::Tuple(t) if t[0] == Term::atom("errno") => match t[1] {
            Term::Int(n) => Some(n as i32),
            _ => None,
        },
        _ => None,
    }
}

fn jailed_probe(probe: &str, given: Option<&PathBuf>) -> Ended {
    let mut w = Worker::spawn(true, given);
    assert_eq!(w.layer("seccomp"), Some(&Term::atom("on")), "{:?}", w.boot);
    // The jail does not stop ordinary work.
    assert_eq!(w.lua("return 6 * 7"), ok("42"));
    assert_eq!(w.ask(Term::atom("ping")), Some(Term::atom("pong")));
    match w.probe(probe) {
        Some(a) if errno(&a).is_some() => {
            // Still serving after a refused call.
            assert_eq!(w.lua("return 1 + 1"), ok("2"));
            Ended::Errno(errno(&a).unwrap())
        }
        Some(a) => Ended::Succeeded(a),
        None => match w.signal() {
            Some(libc::SIGSYS) => Ended::Sigsys,
            sig => Ended::Other(None, sig),
        },
    }
}

/// The probe's answer without the jail: `done` when the call had its effect.
fn unjailed_probe(probe: &str, given: Option<&PathBuf>) -> bool {
    let mut w = Worker::spawn(false, given);
    assert!(w.boot.is_empty(), "{:?}", w.boot);
    match w.probe(probe) {
        Some(Term::Tuple(t)) => t[0] == Term::atom("done"),
        _ => false,
    }
}

/// EPERM or SIGSYS, nothing else.
fn assert_walled(probe: &str, ended: Ended) {
    assert!(
        matches!(ended, Ended::Sigsys | Ended::Errno(libc::EPERM)),
        "{probe}: {ended:?}"
    );
}

#[test]
fn boot_reports_every_layer() {
    let w = Worker::spawn(true, None);
    let names: Vec<&str> = w.boot.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "user_ns",
            "pid_ns",
            "ipc_ns",
            "fds_closed",
            "no_new_privs",
            "landlock",
            "rlimits",
            "address_space",
            "seccomp"
        ]
    );
    for required in ["fds_closed", "rlimits", "no_new_privs", "seccomp"] {
        assert_eq!(w.layer(required), Some(&Term::atom("on")), "{required}");
    }
    // the arena for the default 64 MiB max_memory, the run buffers, the headroom
    let arena = lua_sandbox_core::pool::capacity_for(64 << 20) as i64;
    let buffers = lua_sandbox_worker::jail::buffers_for(64 << 20) as i64;
    let headroom = lua_sandbox_worker::jail::HEADROOM as i64;
    assert_eq!(
        w.layer("address_space"),
        Some(&Term::Int(arena + buffers + headroom))
    );
    assert!(w.signal().is_none());
}

#[test]
fn opening_or_creating_a_file_is_refused() {
    let target = temp("created");
    assert_walled(
        "create",
        jailed_probe(&format!("create {}", target.display()), None),
    );
    assert!(!target.exists());
    assert_walled("open", jailed_probe("open /etc/hostname", None));
    // Unjailed, the same probe creates the file.
    assert!(unjailed_probe(
        &format!("create {}", target.display()),
        None
    ));
    assert!(target.exists());
}

#[test]
fn network_is_refused() {
    assert_walled("socket", jailed_probe("socket", None));
    assert_walled("connect", jailed_probe("connect", None));
    assert!(unjailed_probe("socket", None));
}

#[test]
fn execve_and_fork_are_refused() {
    let marker = temp("exec_marker");
    assert_walled(
        "execve",
        jailed_probe(&format!("execve {}", marker.display()), None),
    );
    assert!(!marker.exists());
    assert_walled("fork", jailed_probe("fork", None));
    // Unjailed, execve replaces the worker with a shell that writes the marker.
    unjailed_probe(&format!("execve {}", marker.display()), None);
    assert!(marker.exists());
}

#[test]
fn other_processes_cannot_be_signalled_or_traced() {
    let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = victim.id();
    let parent = std::process::id();
    for probe in ["kill", "tgkill", "ptrace"] {
        assert_walled(probe, jailed_probe(&format!("{probe} {pid}"), None));
        assert!(victim.try_wait().unwrap().is_none(), "{probe}: victim died");
    }
    // The parent (this test) too: had it worked, this test would be dead.
    assert_walled("ptrace", jailed_probe(&format!("ptrace {parent}"), None));
    assert_walled("kill", jailed_probe(&format!("kill {parent}"), None));
    // Unjailed, the probe kills the victim.
    assert!(unjailed_probe(&format!("kill {pid}"), None));
    assert_eq!(victim.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn an_inherited_fd_is_closed_and_unwritable() {
    let file = temp("given_fd");
    assert_walled(
        "write_fd",
        jailed_probe(&format!("write_fd {GIVEN_FD}"), Some(&file)),
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"");
    assert!(unjailed_probe(&format!("write_fd {GIVEN_FD}"), Some(&file)));
    assert_eq!(std::fs::read(&file).unwrap(), b"escaped\n");
}

#[test]
fn executable_memory_and_io_uring_are_refused() {
    for probe in ["mmap_exec", "mprotect_exec", "io_uring"] {
        assert_walled(probe, jailed_probe(probe, None));
    }
    assert!(unjailed_probe("mmap_exec", None));
}

#[test]
fn the_address_space_is_bounded() {
    // 4 GiB is far above the default arena (256 MiB) + 64 MiB headroom.
    assert_eq!(jailed_probe("mmap_huge", None), Ended::Errno(libc::ENOMEM));
    assert!(unjailed_probe("mmap_huge", None));
}
