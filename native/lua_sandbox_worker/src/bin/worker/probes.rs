//! Test-only (feature `wall-probes`): raw system calls performed from inside the jail, so the
//! tests in `tests/wall.rs` and `test/lua_sandbox/worker_test.exs` can prove each ends in EPERM
//! or SIGSYS and never in an effect outside. Each probe answers `{:errno, n}` if the call
//! returned an error, `{:done, value}` if it succeeded (a hole in the wall), and does not answer
//! at all if seccomp killed the process. Two more serve the tests: `spin` never answers (a
//! request in flight, for a signal from outside or a caller's death: it exits when the BEAM
//! hangs up), `lua <source>` runs a chunk in the worker's
//! state (the jail does not stop ordinary Lua work).

use std::ffi::CString;

use lua_sandbox_worker::proto::Term;

fn answer(r: libc::c_long) -> Term {
    if r < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Term::tuple([Term::atom("errno"), Term::Int(errno.into())])
    } else {
        Term::tuple([Term::atom("done"), Term::Int(r)])
    }
}

/// `name` with its `operand`, a path, a pid or a chunk given by the test.
pub fn probe(slot: &mut lua_sandbox_core::Slot, name: &str, operand: &str) -> Term {
    let path = CString::new(operand).unwrap_or_default();
    let pid: libc::pid_t = operand.parse().unwrap_or(0);
    // SAFETY (every block below): raw system calls with arguments that are either integers or
    // pointers to live buffers (`path`, `argv`, `msg`) of this frame; a call that succeeds
    // has an effect outside this process only, which is what the tests look for.
    let r = unsafe {
        match name {
            // A file the worker does not own: read one, create one.
            "open" => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDONLY,
            ),
            "create" => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT,
                0o600,
            ),
            "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            "connect" => {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 80u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::syscall(
                    libc::SYS_connect,
                    1,
                    &addr as *const libc::sockaddr_in,
                    std::mem::size_of::<libc::sockaddr_in>(),
                )
            }
            // execve("/bin/sh", ["sh", "-c", "echo > <path>"]): a marker file if it ran.
            "execve" => {
                let sh = CString::new("/bin/sh").unwrap();
                let c = CString::new("-c").unwrap();
                let cmd = CString::new(format!("echo escaped > {operand}")).unwrap();
                let argv = [sh.as_ptr(), c.as_ptr(), cmd.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                libc::syscall(libc::SYS_execve, sh.as_ptr(), argv.as_ptr(), envp.as_ptr())
            }
            "fork" => libc::syscall(libc::SYS_fork),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_ATTACH, pid, 0, 0),
            "kill" => libc::syscall(libc::SYS_kill, pid, libc::SIGKILL),
            "tgkill" => libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGKILL),
            // An fd the worker was given before the jail: the jail closed it, and seccomp only
            // lets writes to 1 and 2 through.
            "write_fd" => {
                let msg = b"escaped\n";
                libc::syscall(libc::SYS_write, pid, msg.as_ptr(), msg.len())
            }
            "mmap_exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            }
            "mprotect_exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::syscall(
                    libc::SYS_mprotect,
                    p,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            }
            "io_uring" => {
                let mut params = [0u8; 120];
                libc::syscall(libc::SYS_io_uring_setup, 8, params.as_mut_ptr())
            }
            // Address space: more than max_memory + headroom cannot be mapped.
            "mmap_huge" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4 << 30,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            }
            // Busy until the BEAM hangs up, as a run checks it (then the worker exits).
            "spin" => loop {
                for _ in 0..1_000 {
                    std::hint::spin_loop();
                }
                if lua_sandbox_worker::hung_up() {
                    std::process::exit(0);
                }
            },
            "lua" => {
                let r = super::common::eval(slot, operand);
                slot.restore();
                return match r {
                    Ok(s) => Term::tuple([Term::atom("ok"), Term::bin(s)]),
                    Err(e) => Term::tuple([Term::atom("error"), Term::bin(e.to_string())]),
                };
            }
            _ => {
                return Term::tuple([
                    Term::atom("error"),
                    Term::bin(format!("unknown probe {name:?}")),
                ])
            }
        }
    };
    answer(r)
}
