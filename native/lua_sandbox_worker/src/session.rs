//! A session in the worker (`isolation: :process`): a worker started for one
//! `LuaSandbox.Session` holds its state for the session's life, in the worker's one slot, and
//! the states of its forks ([`Family`], below), built
//! and called with the core's `session::Session` as the NIF does (a checkpoint before each call,
//! the rollback after a failed one, `rollback: false` too). The calls run with the same run
//! machinery as fresh runs (`crate::run::Runner`), so they answer in the same shapes and park at
//! a tool call the same way (the `{:reply, reply}` request resumes them).
//!
//! The session's process in the BEAM owns the port, not the caller of a call: a caller's death
//! does not close it. The session process sends `:cancel` instead. A call in Lua sees the frame
//! waiting on fd 0 at its next budget tick (`crate::cancelled`) and ends `:killed`; a call parked
//! at a tool is dropped when the worker reads it ([`Runner::cancel`]). Either way the loan ends
//! and the state is rolled back; the worker answers the call (if it was running) and then
//! `:cancelled`, and the session serves its next call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lua_sandbox_core::error::SandboxError;
use lua_sandbox_core::exec::{self, Entry, Limits, Push, Setup, StateSetup};
use lua_sandbox_core::pool;
use lua_sandbox_core::session::{NotLent, Session};

use crate::marshal::Handles;
use crate::proto::Term;
use crate::run::{caller, early, Opts, PrintOpt, Runner, Source};

/// The session between calls, `None` while a call has it (its loan gives it back here).
type Home = Arc<Mutex<Option<Session<Handles>>>>;

/// The worker's session: its state and its state-wide settings.
pub struct WorkerSession {
    home: Home,
    max_memory: usize,
    max_depth: usize,
    max_source: usize,
    chunk_name: String,
    print: PrintOpt,
}

fn lock(home: &Home) -> MutexGuard<'_, Option<Session<Handles>>> {
    // Only take/put happen under the lock: a panic cannot leave it inconsistent.
    home.lock().unwrap_or_else(|p| p.into_inner())
}

impl WorkerSession {
    /// `{:session_new, opts}`: the session's state, set up once with the state-wide options of
    /// `opts` (a run's options, `LuaSandbox.Worker.run_opts/1`'s shape). `Err` is the error
    /// answer (a module that does not load, a global that cannot go in).
    pub fn new(runner: &Runner, opts: &Term) -> Result<WorkerSession, Term> {
        let t0 = Instant::now();
        let opts = Opts::decode(opts, runner.max_memory).map_err(|e| early(e, "", t0))?;
        let early = |e: SandboxError| early(e, &opts.chunk_name, t0);
        let lease = pool::lease_from(runner.capacity).map_err(early)?;
        let limits = opts.limits;
        let session = Session::<Handles>::build(lease, caller(), |slot| {
            let modules = opts.modules()?;
            let mut globals = opts.push_globals(limits.max_depth);
            let setup = StateSetup {
                globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
                tools: &opts.tools,
                modules: &modules,
            };
            exec::prepare_state(slot, setup, limits.max_memory)
        })
        .map_err(early)?;
        Ok(WorkerSession {
            home: Arc::new(Mutex::new(Some(session))),
            max_memory: limits.max_memory,
            max_depth: limits.max_depth,
            max_source: limits.max_source,
            chunk_name: opts.chunk_name,
            print: opts.print,
        })
    }

    /// `{:session_run, source, opts}`: one call (`source` Lua text, a compiled chunk's
    /// `{:bytecode, bytes, name}`, or nil for a `call:` or `globals:` only), with the per-call options of `opts` (`rollback` among them); answers
    /// like a run. A call still parked at a tool is dropped first (its caller gave up on it).
    pub fn run(&self, runner: &mut Runner, source: &Term, opts: &Term) -> Term {
        runner.cancel();
        let t0 = Instant::now();
        let early = |e: SandboxError| early(e, &self.chunk_name, t0);
        let opts = match Opts::decode(opts, runner.max_memory) {
            Ok(opts) => opts,
            Err(e) => return early(e),
        };
        // Lua text, or a compiled chunk's `{:bytecode, bytes, name}` (run under its own name,
        // as the NIF runs a chunk resource in a session), or nil
        let source = match source {
            Term::Atom(a) if a == "nil" => None,
            other => match Source::decode(other, "source") {
                Ok(source) => Some(source),
                Err(e) => return early(e),
            },
        };
        let code = match &source {
            None => None,
            Some(source) => match source.code(&self.chunk_name, self.max_source, "source") {
                Ok(code) => Some(code),
                Err(e) => return early(e),
            },
        };
        let chunk_name = source
            .as_ref()
            .map_or(self.chunk_name.as_str(), |s| s.name(&self.chunk_name))
            .to_string();
        let Some(session) = lock(&self.home).take() else {
            return early(SandboxError::Runtime(
                "session state did not come back".to_string(),
            ));
        };
        let limits = Limits {
            max_memory: self.max_memory,
            max_depth: self.max_depth,
            max_source: self.max_source,
            ..opts.limits
        };
        let print = runner.print(self.print);
        let home = self.home.clone();
        let give_back = move |session| *lock(&home) = Some(session);
        let started = session.call(
            opts.rollback,
            false,
            give_back,
            limits,
            print,
            chunk_name,
            t0,
        );
        let mut run = match started {
            Ok(run) => run,
            Err(NotLent::ArenaBusy(session)) => {
                // Another member's call has the family's slot: never, as the BEAM sends a
                // member's call only when no other member's call is in progress (or parked).
                *lock(&self.home) = Some(session);
                return Term::atom("arena_busy");
            }
            // A copy the call needs (the other member's image, the checkpoint) does not fit
            // the worker's address space: refused before it ran, `:memory_limit`.
            Err(NotLent::Refused(session, refused)) => {
                *lock(&self.home) = Some(session);
                return early(refused.into());
            }
        };
        let max_depth = limits.max_depth;
        let prepared = {
            let mut globals = opts.push_globals(max_depth);
            let mut call = opts.push_call(max_depth);
            let setup = Setup {
                state: None,
                call_globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
                entry: match &code {
                    Some(code) => Entry::Chunk(code),
                    None => Entry::Nothing,
                },
                call: call.as_mut().map(|(name, push)| (*name, push as Push)),
            };
            run.prepare(caller(), setup)
        };
        runner.go(run, prepared, t0)
    }

    /// `:session_info`: `{:ok, %{memory:, calls:, instructions:, rollbacks:}}` (the NIF's
    /// `session_info`), or `:busy` while a call is parked at a tool.
    pub fn info(&self) -> Term {
        let guard = lock(&self.home);
        let Some(session) = guard.as_ref() else {
            return Term::atom("busy");
        };
        let int = |v: u64| Term::Int(v.min(i64::MAX as u64) as i64);
        Term::tuple([
            Term::atom("ok"),
            Term::Map(vec![
                (
                    Term::atom("memory"),
                    int(session.used().unwrap_or(0) as u64),
                ),
                (Term::atom("calls"), int(session.calls)),
                (Term::atom("instructions"), int(session.instructions)),
                (Term::atom("rollbacks"), int(session.rollbacks)),
            ]),
        ])
    }
}

impl WorkerSession {
    /// A new member of this session's family holding a copy of its state (the core's
    /// `Session::fork`), with its settings; `Err` is the answer (`:busy`, `:arena_busy`, or a
    /// `:memory_limit` error answer when the copy does not fit the worker's address space).
    fn fork(&self) -> Result<WorkerSession, Term> {
        let t0 = Instant::now();
        let guard = lock(&self.home);
        let Some(session) = guard.as_ref() else {
            return Err(Term::atom("busy"));
        };
        let copy = match session.fork() {
            Ok(Some(copy)) => copy,
            Ok(None) => return Err(Term::atom("arena_busy")),
            Err(refused) => return Err(early(refused.into(), &self.chunk_name, t0)),
        };
        Ok(WorkerSession {
            home: Arc::new(Mutex::new(Some(copy))),
            max_memory: self.max_memory,
            max_depth: self.max_depth,
            max_source: self.max_source,
            chunk_name: self.chunk_name.clone(),
            print: self.print,
        })
    }
}

/// The sessions a session's worker holds: the session (member 0, `{:session_new, opts}`) and
/// its forks (`{:session_fork, from, new}`), members of one core family (`family.rs`): they
/// share the worker's one slot and take turns in it, as a NIF session and its forks do. A Lua
/// state works only at the address it was built at, and the addresses of this binary's C
/// functions differ from one worker to the next (ASLR), so a fork's state cannot move to
/// another worker: it stays in its origin's. The members are numbered by the BEAM
/// (`LuaSandbox.Session.Worker`, which also sends a member's call only when no other member's
/// call is in progress or parked, so the slot is always free for it).
#[derive(Default)]
pub struct Family {
    members: HashMap<i64, WorkerSession>,
}

fn member_of(t: &Term) -> Option<i64> {
    match t {
        Term::Int(i) => Some(*i),
        _ => None,
    }
}

fn error(message: &str) -> Term {
    Term::tuple([Term::atom("error"), Term::bin(message)])
}

impl Family {
    /// Answers a session request of `src/proto.rs`, or `None` when `request` is not one.
    pub fn answer(&mut self, runner: &mut Runner, request: &Term) -> Option<Term> {
        let Term::Tuple(t) = request else {
            return (request.as_atom() == Some("session_info")).then(|| self.info(0));
        };
        let tag = t.first().and_then(Term::as_atom)?;
        Some(match (tag, t.as_slice()) {
            ("session_new", [_, opts]) => {
                if !self.members.is_empty() {
                    return Some(error("this worker holds a session already"));
                }
                match WorkerSession::new(runner, opts) {
                    Ok(made) => {
                        self.members.insert(0, made);
                        Term::atom("ok")
                    }
                    Err(answer) => answer,
                }
            }
            ("session_run", [_, source, opts]) => self.run(runner, 0, source, opts),
            ("session_run", [_, member, source, opts]) => match member_of(member) {
                Some(m) => self.run(runner, m, source, opts),
                None => error("a member is an integer"),
            },
            ("session_info", [_, member]) => match member_of(member) {
                Some(m) => self.info(m),
                None => error("a member is an integer"),
            },
            ("session_fork", [_, from, new]) => match (member_of(from), member_of(new)) {
                (Some(from), Some(new)) => self.fork(from, new),
                _ => error("members are integers"),
            },
            ("session_close", [_, member]) => {
                // Its state is forgotten (the core's `Family::leave`); the slot goes back to
                // the worker's pool with the last member.
                if let Some(m) = member_of(member) {
                    self.members.remove(&m);
                }
                Term::atom("ok")
            }
            _ => return None,
        })
    }

    fn run(&self, runner: &mut Runner, member: i64, source: &Term, opts: &Term) -> Term {
        match self.members.get(&member) {
            Some(session) => session.run(runner, source, opts),
            None => error("no such session in this worker"),
        }
    }

    fn info(&self, member: i64) -> Term {
        match self.members.get(&member) {
            Some(session) => session.info(),
            None => error("no such session in this worker"),
        }
    }

    fn fork(&mut self, from: i64, new: i64) -> Term {
        if self.members.contains_key(&new) {
            return error("that member exists already");
        }
        let Some(origin) = self.members.get(&from) else {
            return error("no such session in this worker");
        };
        match origin.fork() {
            Ok(copy) => {
                self.members.insert(new, copy);
                Term::atom("ok")
            }
            Err(answer) => answer,
        }
    }
}
