//! Sessions: a sandboxed state that lives across calls, with per-call limits and rollback.
//!
//! The state, its checkpoint before each call and the rollback after a failed one are the
//! core's `session::Session` (see there; forks share its slot and take turns in it, the core's
//! `family.rs`); this file holds the NIFs, the session's settings
//! (the options every call reads) and the resource a call's loan gives the session back to.
//! With `rollback: false` a failed call keeps what it changed, as Lua would.
//!
//! The resource belongs to the `LuaSandbox.Session` process, which serializes calls; the
//! call itself runs in the calling process (so its death stops the call, as for `run/2`).

use std::sync::Mutex;

use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifMap, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::handles::Handles;
use crate::marshal::{self, Nif};
use crate::run::{self, Source};
use lua_sandbox_core::chunk::{check_source, Code};
use lua_sandbox_core::exec::{self, Entry, Limits, Push, Setup, StateSetup};
use lua_sandbox_core::pool as slots;
use lua_sandbox_core::session::{NotLent, Session};

/// State-wide options, validated by `LuaSandbox.Session`.
#[derive(NifMap)]
pub struct SessionOpts<'a> {
    pub max_memory: u64,
    pub max_depth: u64,
    pub max_source: u64,
    pub print: Atom,
    pub print_pid: Option<LocalPid>,
    pub print_tag: Option<rustler::Binary<'a>>,
    pub chunk_name: String,
    pub globals: Vec<(String, Term<'a>)>,
    pub tools: Vec<String>,
    pub modules: Vec<(String, Term<'a>)>,
}

/// Per-call options.
#[derive(NifMap)]
pub struct CallOpts<'a> {
    pub max_instructions: u64,
    pub max_output: u64,
    pub max_tool_calls: u64,
    pub max_result_bytes: u64,
    pub rollback: bool,
    pub call: Option<(String, Vec<Term<'a>>)>,
    /// Globals set for this call (part of it: rolled back with it).
    pub globals: Vec<(String, Term<'a>)>,
    /// Milliseconds to the call's deadline (`timeout:`), checked inside the run.
    pub timeout: Option<u64>,
}

/// What a session keeps between calls: the core's session (slot, checkpoint, counters,
/// handles) and its state-wide settings.
pub struct SessionState {
    session: Session<Handles>,
    settings: Settings,
}

/// A session's state-wide settings, read by each call.
#[derive(Clone)]
struct Settings {
    max_memory: usize,
    max_depth: usize,
    max_source: u64,
    chunk_name: String,
    print: Atom,
    print_pid: Option<LocalPid>,
    print_tag: Option<Vec<u8>>,
}

/// The session resource: its state, or `None` while a call has it on loan.
pub struct SessionRes {
    state: Mutex<Option<SessionState>>,
}

#[rustler::resource_impl]
impl rustler::Resource for SessionRes {}

impl SessionRes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SessionState>> {
        // Only take/put happen under the lock: a panic cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn session_new<'a>(env: Env<'a>, opts: SessionOpts<'a>) -> Term<'a> {
    let t0 = std::time::Instant::now();
    lua_sandbox_core::stack::with_big_stack(|| {
        let max_memory = slots::clamp_memory(opts.max_memory);
        let lease = match slots::lease(max_memory) {
            Ok(lease) => lease,
            Err(e) => return run::early_error(env, e, &opts.chunk_name, t0),
        };
        let max_depth = opts.max_depth as usize;
        let sources = run::ModuleSources::decode(&opts.modules, opts.max_source as usize);
        // Handles in the state-wide globals are the session's, for its life.
        let built = Session::<Handles>::build(lease, crate::caller::of(env), |slot| {
            let sources = sources?;
            let modules = sources.codes()?;
            // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
            let mut globals = unsafe { marshal::globals_push::<Nif>(&opts.globals, max_depth) };
            let setup = StateSetup {
                globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
                tools: &opts.tools,
                modules: &modules,
            };
            exec::prepare_state(slot, setup, max_memory)
        });
        let session = match built {
            Ok(session) => session,
            Err(e) => return run::early_error(env, e, &opts.chunk_name, t0),
        };
        let state = SessionState {
            session,
            settings: Settings {
                max_memory,
                max_depth: opts.max_depth as usize,
                max_source: opts.max_source,
                chunk_name: opts.chunk_name,
                print: opts.print,
                print_pid: opts.print_pid,
                print_tag: opts.print_tag.map(|t| t.as_slice().to_vec()),
            },
        };
        let res = ResourceArc::new(SessionRes {
            state: Mutex::new(Some(state)),
        });
        (atoms::ok(), res).encode(env)
    })
}

/// Runs `source` (text, a compiled chunk, or `nil` for a `call:` only) in the session's
/// state. Answers like `run_start`, or `:busy` if another call has the state.
#[rustler::nif(schedule = "DirtyCpu")]
fn session_run<'a>(
    env: Env<'a>,
    res: ResourceArc<SessionRes>,
    source: Term<'a>,
    opts: CallOpts<'a>,
) -> NifResult<Term<'a>> {
    call(env, res, source, opts, None)
}

/// The state size up to which a call is first tried on the caller's normal scheduler: the
/// attempt's checkpoint and, when it is thrown away, its rollback copy this much.
const TRY_MAX_USED: usize = run::FAST_MEMORY;

/// A first attempt at a call on the caller's normal scheduler, like `run_try`: at most
/// `FAST_INSTRUCTIONS` and `FAST_RESULT_BYTES`, no tool call, no output streamed. It answers
/// like `session_run` when the call finished within them, and `:retry` when not (also,
/// without trying, for a state over `TRY_MAX_USED`): the attempt is then
/// rolled back unseen and uncounted, and the caller runs the call with `session_run`.
#[rustler::nif]
fn session_try<'a>(
    env: Env<'a>,
    res: ResourceArc<SessionRes>,
    source: Term<'a>,
    opts: CallOpts<'a>,
) -> NifResult<Term<'a>> {
    let mut opts = opts;
    let small = res
        .lock()
        .as_ref()
        .and_then(|state| state.session.used())
        .is_some_and(|used| used <= TRY_MAX_USED);
    if !small {
        return Ok(atoms::retry().encode(env));
    }
    let fast = run::Fast::for_session(opts.max_instructions, opts.max_result_bytes);
    opts.max_instructions = opts.max_instructions.min(run::FAST_INSTRUCTIONS);
    opts.max_result_bytes = opts.max_result_bytes.min(run::FAST_RESULT_BYTES);
    call(env, res, source, opts, Some(fast))
}

fn call<'a>(
    env: Env<'a>,
    res: ResourceArc<SessionRes>,
    source: Term<'a>,
    opts: CallOpts<'a>,
    fast: Option<run::Fast>,
) -> NifResult<Term<'a>> {
    let source = if source == atoms::nil().encode(env) {
        None
    } else {
        Some(Source::decode(source)?)
    };
    let Some(state) = res.lock().take() else {
        return Ok(atoms::busy().encode(env));
    };
    Ok(lua_sandbox_core::stack::with_big_stack(|| {
        let t0 = std::time::Instant::now();
        let code = match &source {
            None => Ok(None),
            Some(Source::Text(bin)) => {
                check_source(bin.as_slice(), state.settings.max_source as usize, "source")
                    .and_then(|()| Code::new(bin.as_slice(), &state.settings.chunk_name, false))
                    .map(Some)
            }
            Some(Source::Chunk(chunk)) => Code::new(&chunk.bytecode, &chunk.name, true).map(Some),
        };
        let code = match code {
            Ok(code) => code,
            Err(e) => {
                let answer = run::early_error(env, e, &state.settings.chunk_name, t0);
                *res.lock() = Some(state);
                return answer;
            }
        };
        let SessionState { session, settings } = state;
        let chunk_name = match &source {
            Some(Source::Chunk(chunk)) => chunk.name.clone(),
            _ => settings.chunk_name.clone(),
        };
        let print = crate::print::mode(
            settings.print,
            settings.print_pid,
            settings.print_tag.clone(),
        );
        let limits = Limits {
            max_instructions: opts.max_instructions,
            max_memory: settings.max_memory,
            max_depth: settings.max_depth,
            max_result_bytes: opts.max_result_bytes,
            max_output: opts.max_output as usize,
            max_source: settings.max_source as usize,
            max_tool_calls: opts.max_tool_calls,
            timeout: opts.timeout.map(std::time::Duration::from_millis),
        };
        let owner = res.clone();
        let back = settings.clone();
        // A first attempt may be thrown away (`session_try`): it takes a checkpoint even with
        // `rollback: false`, which then only means a failure that ends the call keeps what it
        // changed.
        let started = session.call(
            opts.rollback,
            fast.is_some(),
            move |session| {
                *owner.lock() = Some(SessionState { session, settings });
            },
            limits,
            print,
            chunk_name,
            t0,
        );
        let mut running = match started {
            Ok(running) => running,
            Err(NotLent::ArenaBusy(session)) => {
                *res.lock() = Some(SessionState {
                    session,
                    settings: back,
                });
                return atoms::arena_busy().encode(env);
            }
            // A copy the call needs did not get its memory: refused before it ran.
            Err(NotLent::Refused(session, refused)) => {
                let answer = run::early_error(env, refused.into(), &back.chunk_name, t0);
                *res.lock() = Some(SessionState {
                    session,
                    settings: back,
                });
                return answer;
            }
        };
        if fast.is_some() {
            // An attempt streams nothing until it has succeeded.
            running.scope.output().hold();
        }
        let entry = match &code {
            Some(code) => Entry::Chunk(code),
            None => Entry::Nothing,
        };
        let max_depth = limits.max_depth;
        // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
        let mut globals = unsafe { marshal::globals_push::<Nif>(&opts.globals, max_depth) };
        let mut call = opts.call.as_ref().map(|(name, args)| {
            (
                name,
                // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
                unsafe { marshal::values_push::<Nif>(args, max_depth, "call.args") },
            )
        });
        let setup = Setup {
            state: None,
            call_globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
            entry,
            call: call
                .as_mut()
                .map(|(name, args)| (name.as_str(), args as Push)),
        };
        let prepared = running.prepare(crate::caller::of(env), setup);
        run::begin(env, prepared, running, t0, fast)
    }))
}

/// What `session_info` reports.
#[derive(NifMap)]
struct Info {
    memory: u64,
    calls: u64,
    instructions: u64,
    rollbacks: u64,
}

/// `{:ok, %{memory:, calls:, instructions:, rollbacks:}}`, or `:busy` during a call.
#[rustler::nif]
fn session_info(env: Env<'_>, res: ResourceArc<SessionRes>) -> Term<'_> {
    let guard = res.lock();
    let Some(state) = guard.as_ref() else {
        return atoms::busy().encode(env);
    };
    let info = Info {
        memory: state.session.used().unwrap_or(0) as u64,
        calls: state.session.calls,
        instructions: state.session.instructions,
        rollbacks: state.session.rollbacks,
    };
    (atoms::ok(), info).encode(env)
}

/// `{:ok, session}`: a new session holding a copy of this one's state (its globals, functions
/// and handles), independent from then on; `:busy` while a call has this session,
/// `:arena_busy` while a call of its family has the slot (the core's `family.rs`), or a
/// `:memory_limit` error answer when the copy could not get its memory.
#[rustler::nif(schedule = "DirtyCpu")]
fn session_fork(env: Env<'_>, res: ResourceArc<SessionRes>) -> Term<'_> {
    let t0 = std::time::Instant::now();
    // Out of the lock while the state is copied, like a call: others see `:busy`.
    let Some(state) = res.lock().take() else {
        return atoms::busy().encode(env);
    };
    let answer = match state.session.fork() {
        Err(refused) => run::early_error(env, refused.into(), &state.settings.chunk_name, t0),
        Ok(None) => atoms::arena_busy().encode(env),
        Ok(Some(session)) => {
            let fork = ResourceArc::new(SessionRes {
                state: Mutex::new(Some(SessionState {
                    session,
                    settings: state.settings.clone(),
                })),
            });
            (atoms::ok(), fork).encode(env)
        }
    };
    *res.lock() = Some(state);
    answer
}
