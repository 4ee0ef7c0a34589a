//! The jailed worker of `isolation: :process`: builds a sandboxed Lua state in a slot, applies
//! the jail, sends the boot frame naming the layers in force, then answers requests framed as
//! `src/proto.rs` describes until the BEAM closes its end. The BEAM side is
//! `lib/lua_sandbox/worker.ex`; it warns for each layer not in force.
//!
//! Scripts run with the core's run machinery, as in the NIF (`lua_sandbox_worker::run`); a
//! session's worker holds one session and its forks (`lua_sandbox_worker::session`); the worker also answers
//! `:ping` and `:cancel` (and, in test builds, the probes of `probes.rs`).
//!
//! Usage: `worker [max_memory_bytes]` (default 64 MiB): the state is the NIF's sandbox
//! (`lua_sandbox_core::sandbox`), in an arena sized for that `max_memory` as the NIF sizes it.

use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

use lua_sandbox_worker::jail;
use lua_sandbox_worker::proto::{self, Term};
use lua_sandbox_worker::run::Runner;
use lua_sandbox_worker::session::Family;

// The core's test support runs a chunk in a state (the `lua` probe of test builds only).
#[cfg(feature = "wall-probes")]
#[path = "../../../../lua_sandbox_core/tests/common/mod.rs"]
mod common;

#[cfg(feature = "wall-probes")]
mod probes;

fn main() {
    let max_memory: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.parse().expect("max_memory in bytes"))
        .unwrap_or(64 << 20);
    lua_sandbox_worker::die_with_parent();
    // The sandbox a run of the NIF gets, in an arena of the same size.
    let capacity = lua_sandbox_core::pool::capacity_for(max_memory);
    let slot = match lua_sandbox_core::sandbox::new_slot(capacity) {
        Ok(slot) => slot,
        Err(e) => {
            eprintln!("worker: the sandbox could not be built: {e}");
            std::process::exit(2);
        }
    };
    // Frames go to fd 1 as they are, one write each: std's stdout is line-buffered and would
    // split a frame at every byte 10 in it.
    // SAFETY: fd 1 is open for the life of the process (the port's pipe), and the ManuallyDrop
    // never closes it.
    let mut runner = Runner::new(slot, max_memory);
    let mut out = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });

    // Test builds only: `--no-jail` serves unjailed, so the wall tests can show that each
    // probe does have an effect when the jail is not there.
    #[cfg(feature = "wall-probes")]
    if std::env::args().any(|a| a == "--no-jail") {
        let boot = Term::tuple([Term::atom("boot"), Term::List(vec![])]);
        if proto::write_frame(&mut *out, &boot).is_ok() {
            serve(&mut runner, &mut *out);
        }
        return;
    }

    let layers = match jail::apply(&jail::Config {
        arena: capacity as u64,
        buffers: jail::buffers_for(max_memory as u64),
    }) {
        Ok(layers) => layers,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let boot = Term::tuple([Term::atom("boot"), layers.to_term()]);
    if proto::write_frame(&mut *out, &boot).is_ok() {
        serve(&mut runner, &mut *out);
    }
}

/// Answers requests until stdin closes (or a frame cannot be read or written).
fn serve(runner: &mut Runner, out: &mut impl std::io::Write) {
    // Unbuffered: a frame that arrives during a run stays in the pipe, where the run's
    // liveness check sees it (`lua_sandbox_worker::cancelled`), until it is read here.
    // SAFETY: fd 0 is open for the life of the process (the port's pipe), and the ManuallyDrop
    // never closes it.
    let mut input = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    // The session this worker holds, once `{:session_new, opts}` made it, and its forks.
    let mut family = Family::default();
    while let Ok(Some(frame)) = proto::read_frame(&mut *input) {
        let (id, answer) = match proto::decode(&frame) {
            Ok(Term::Tuple(mut t)) if t.len() == 2 => {
                let request = t.pop().unwrap();
                let id = t.pop().unwrap();
                runner.serving(&id);
                let answer = answer(runner, &mut family, &request);
                (id, answer)
            }
            Ok(_) => (Term::atom("nil"), error("a request is {id, request}")),
            Err(e) => (Term::atom("nil"), error(&e.to_string())),
        };
        if proto::write_frame(out, &Term::tuple([id, answer])).is_err() {
            break;
        }
        // A `:cancel` that the run just answered read from the pipe (it stopped the run): its
        // own answer now, after dropping the run if it parked meanwhile.
        if let Some(id) = lua_sandbox_worker::take_cancel() {
            runner.cancel();
            let cancelled = Term::tuple([id, Term::atom("cancelled")]);
            if proto::write_frame(out, &cancelled).is_err() {
                break;
            }
        }
    }
}

fn error(message: &str) -> Term {
    Term::tuple([Term::atom("error"), Term::bin(message)])
}

fn answer(runner: &mut Runner, family: &mut Family, request: &Term) -> Term {
    if let Some(answer) = family.answer(runner, request) {
        return answer;
    }
    match request {
        Term::Atom(a) if a == "ping" => Term::atom("pong"),
        Term::Atom(a) if a == "cancel" => {
            runner.cancel();
            Term::atom("cancelled")
        }
        Term::Tuple(t) if t.len() == 3 && t[0].as_atom() == Some("run") => {
            runner.start(&t[1], &t[2])
        }
        Term::Tuple(t) if t.len() == 2 && t[0].as_atom() == Some("reply") => runner.reply(&t[1]),
        #[cfg(feature = "wall-probes")]
        Term::Tuple(t) if t.len() == 3 && t[0].as_atom() == Some("probe") => {
            match (t[1].as_bin(), t[2].as_bin()) {
                (Some(name), Some(operand)) => match runner.lease() {
                    Ok(mut lease) => probes::probe(
                        lease.slot_mut(),
                        &String::from_utf8_lossy(name),
                        &String::from_utf8_lossy(operand),
                    ),
                    Err(e) => error(&e.to_string()),
                },
                _ => error("a probe is {:probe, name, operand}"),
            }
        }
        other => error(&format!("unknown request {other:?}")),
    }
}
