//! Proof the wall holds: the worker (built with its `wall-probes`) performs raw system calls
//! from inside the jail, and each ends in EPERM or SIGSYS, never in an effect outside — checked
//! from outside (the file is not there, the victim process is alive, the fd's file is empty).
//! Each probe is also run once without the jail (`--no-jail`), where it must have its effect:
//! the check can fail.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const WORKER: &str = env!("CARGO_BIN_EXE_worker");
/// The fd number a file is handed to the worker under, before its jail.
const GIVEN_FD: i32 = 5;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    boot: String,
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
            // SAFETY: between fork and exec only dup2 runs, which is async-signal-safe; the new
            // fd 5 has no close-on-exec flag, so the worker inherits it.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(fd, GIVEN_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("the worker binary");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut boot = String::new();
        stdout.read_line(&mut boot).unwrap();
        Worker {
            child,
            stdin,
            stdout,
            boot,
        }
    }

    /// Sends one request; the answer line, or None when the worker died instead.
    fn ask(&mut self, request: &str) -> Option<String> {
        writeln!(self.stdin, "{request}").ok()?;
        self.stdin.flush().ok()?;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
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
    Succeeded(String),
    Other(Option<String>, Option<i32>),
}

fn jailed_probe(probe: &str, given: Option<&PathBuf>) -> Ended {
    let mut w = Worker::spawn(true, given);
    assert!(w.boot.contains("seccomp=on"), "boot: {}", w.boot);
    // The jail does not stop ordinary work.
    assert_eq!(w.ask("run return 6 * 7").as_deref(), Some("ok 42"));
    match w.ask(&format!("probe {probe}")) {
        Some(a) if a.starts_with("errno ") => {
            let n = a["errno ".len()..].parse().unwrap();
            // Still serving after a refused call.
            assert_eq!(w.ask("run return 1 + 1").as_deref(), Some("ok 2"));
            Ended::Errno(n)
        }
        Some(a) if a.starts_with("done ") => Ended::Succeeded(a),
        answer => match w.signal() {
            Some(libc::SIGSYS) if answer.is_none() => Ended::Sigsys,
            sig => Ended::Other(answer, sig),
        },
    }
}

fn unjailed_probe(probe: &str, given: Option<&PathBuf>) -> String {
    let mut w = Worker::spawn(false, given);
    assert_eq!(w.boot.trim(), "jail none");
    w.ask(&format!("probe {probe}")).unwrap_or_default()
}

/// EPERM or SIGSYS, nothing else.
fn assert_walled(probe: &str, ended: Ended) {
    assert!(
        matches!(ended, Ended::Sigsys | Ended::Errno(libc::EPERM)),
        "{probe}: {ended:?}"
    );
}

#[test]
fn boot_reports_every_layer_and_warns_for_each_missing_one() {
    let mut w = Worker::spawn(true, None);
    for required in ["fds=on", "rlimits=on", "no_new_privs=on", "seccomp=on"] {
        assert!(w.boot.contains(required), "{required} in {}", w.boot);
    }
    let off = w.boot.matches("off(").count();
    drop(w.stdin);
    let mut stderr = String::new();
    std::io::Read::read_to_string(w.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    w.child.wait().unwrap();
    assert_eq!(
        stderr.matches("warning: jail layer not in force").count(),
        off,
        "boot: {}stderr: {stderr}",
        w.boot
    );
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
    assert!(unjailed_probe(&format!("create {}", target.display()), None).starts_with("done"));
    assert!(target.exists());
}

#[test]
fn network_is_refused() {
    assert_walled("socket", jailed_probe("socket", None));
    assert_walled("connect", jailed_probe("connect", None));
    assert!(unjailed_probe("socket", None).starts_with("done"));
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
    assert!(unjailed_probe(&format!("kill {pid}"), None).starts_with("done"));
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
    assert!(unjailed_probe(&format!("write_fd {GIVEN_FD}"), Some(&file)).starts_with("done"));
    assert_eq!(std::fs::read(&file).unwrap(), b"escaped\n");
}

#[test]
fn executable_memory_and_io_uring_are_refused() {
    for probe in ["mmap_exec", "mprotect_exec", "io_uring"] {
        assert_walled(probe, jailed_probe(probe, None));
    }
    assert!(unjailed_probe("mmap_exec", None).starts_with("done"));
}

#[test]
fn the_address_space_is_bounded() {
    // 4 GiB is far above the default 64 MiB max_memory + 64 MiB headroom.
    assert_eq!(jailed_probe("mmap_huge", None), Ended::Errno(libc::ENOMEM));
    assert!(unjailed_probe("mmap_huge", None).starts_with("done"));
}
