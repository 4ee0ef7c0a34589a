//! The NIFs that run Lua: start a run, resume it after a tool call.
//!
//! A run (the core's `exec::Run`) leases a pristine slot and executes in a coroutine of the
//! slot's state, kept in a resource so a tool call can suspend it, hand
//! `{:tool_call, run, name, args}` to Elixir, and be resumed later on any dirty scheduler. The
//! resource belongs to the process that started the run: only it may resume, and when it dies
//! the resource is freed by the GC, which hands the slot back (a restore, O(1) in the state's
//! size). This file turns terms into the core's setup and replies, and its steps into answers.

use std::ffi::c_int;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lua_sandbox_core::chunk::{check_source, Code};
use lua_sandbox_core::error::{line_of, SandboxError};
use lua_sandbox_core::exec::{
    Entry, Home, Limits, Module, Push, Reply, Run as Running, Setup, StateSetup, Step,
};
use lua_sandbox_core::output::Print;
use lua_sandbox_core::pool::{self as slots};
use lua_sandbox_core::scope::Scope;
use lua_sandbox_core::{ffi, stack};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifMap, NifResult, ResourceArc, Term, TermType};

use crate::atoms;
use crate::chunk::CompiledChunk;
use crate::error::Failure;
use crate::handles::Handles;
use crate::marshal::{self, Bounds, Nif};
use crate::term::{binary_term, stats_term};

/// Options, already validated and defaulted by `LuaSandbox.Options`.
#[derive(NifMap)]
pub struct RunOpts<'a> {
    pub max_instructions: u64,
    pub max_memory: u64,
    pub max_depth: u64,
    pub max_result_bytes: u64,
    pub max_output: u64,
    pub max_source: u64,
    pub max_tool_calls: u64,
    pub print: Atom,
    pub print_pid: Option<LocalPid>,
    /// `{:send, pid, tag}`: the tag in the external term format.
    pub print_tag: Option<rustler::Binary<'a>>,
    /// Milliseconds from the start of the run to its deadline (`timeout:`).
    pub timeout: Option<u64>,
    pub chunk_name: String,
    pub globals: Vec<(String, Term<'a>)>,
    pub call: Option<(String, Vec<Term<'a>>)>,
    pub tools: Vec<String>,
    pub modules: Vec<(String, Term<'a>)>,
}

/// A run parked at a tool call, owned by the process that started it.
pub struct Run {
    owner: LocalPid,
    session: Mutex<Option<Running>>,
}

#[rustler::resource_impl]
impl rustler::Resource for Run {}

#[rustler::nif(schedule = "DirtyCpu")]
fn run_start<'a>(env: Env<'a>, source: Term<'a>, opts: RunOpts<'a>) -> NifResult<Term<'a>> {
    let source = Source::decode(source)?;
    Ok(stack::with_big_stack(|| start(env, source, opts, None)))
}

/// Instructions a first attempt on a normal scheduler may execute (~0.25 ms of Lua).
pub const FAST_INSTRUCTIONS: u64 = 10_000;
/// Lua heap a first attempt may use.
pub const FAST_MEMORY: usize = 1 << 20;
/// Result bytes a first attempt may return.
pub const FAST_RESULT_BYTES: u64 = 256 << 10;

/// The tighter limits of a first attempt, and the run's real ones.
#[derive(Clone, Copy)]
pub(crate) struct Fast {
    max_instructions: u64,
    max_memory: usize,
    max_result_bytes: u64,
}

impl Fast {
    /// A session call's first attempt (`session_try`): its instruction slice and result bound
    /// are the attempt's; its memory limit is the session's own (so a memory error is real).
    pub(crate) fn for_session(max_instructions: u64, max_result_bytes: u64) -> Fast {
        Fast {
            max_instructions,
            max_memory: 0,
            max_result_bytes,
        }
    }

    /// Whether `e`, met under the attempt's limits, may not be the run's real outcome.
    fn retry(&self, e: &SandboxError) -> bool {
        match e {
            SandboxError::InstructionLimit => self.max_instructions > FAST_INSTRUCTIONS,
            SandboxError::MemoryLimit => self.max_memory > FAST_MEMORY,
            SandboxError::SizeLimit(_) => self.max_result_bytes > FAST_RESULT_BYTES,
            _ => false,
        }
    }
}

/// A first attempt at a short run, on the caller's normal scheduler, under tighter limits
/// (`FAST_*`). It answers like `run_start` when the run finishes within them, and `:retry`
/// when it did not (a limit of the attempt, or a tool call): the attempt's state, output and
/// stream are then thrown away unseen, and the caller runs it with `run_start`.
#[rustler::nif]
fn run_try<'a>(env: Env<'a>, source: Term<'a>, opts: RunOpts<'a>) -> NifResult<Term<'a>> {
    let source = Source::decode(source)?;
    let fast = Fast {
        max_instructions: opts.max_instructions,
        max_memory: slots::clamp_memory(opts.max_memory),
        max_result_bytes: opts.max_result_bytes,
    };
    Ok(stack::with_big_stack(|| {
        start(env, source, opts, Some(fast))
    }))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn run_resume<'a>(env: Env<'a>, run: ResourceArc<Run>, reply: Term<'a>) -> NifResult<Term<'a>> {
    if env.pid() != run.owner {
        return Err(rustler::Error::RaiseTerm(Box::new(
            "a run can only be resumed by the process that started it",
        )));
    }
    let session = run
        .session
        .try_lock()
        .map_err(|_| rustler::Error::RaiseTerm(Box::new("run is busy")))?
        .take();
    let Some(mut session) = session else {
        return Err(rustler::Error::RaiseTerm(Box::new(
            "run has already finished",
        )));
    };
    Ok(stack::with_big_stack(|| {
        let t0 = Instant::now();
        session.scope.control.clock_start();
        let caller = crate::caller::of(env);
        let step = reply_to_lua(&mut session, caller, reply)
            .and_then(|nargs| session.resume(caller, nargs));
        session.elapsed += t0.elapsed();
        settle(env, session, step, Some(run.clone()), None)
    }))
}

pub(crate) enum Source<'a> {
    Text(rustler::Binary<'a>),
    Chunk(ResourceArc<CompiledChunk>),
}

impl<'a> Source<'a> {
    pub(crate) fn decode(term: Term<'a>) -> NifResult<Source<'a>> {
        if term.get_type() == TermType::Binary {
            return Ok(Source::Text(term.decode()?));
        }
        match term.decode::<ResourceArc<CompiledChunk>>() {
            Ok(chunk) => Ok(Source::Chunk(chunk)),
            Err(_) => Err(rustler::Error::BadArg),
        }
    }
}

fn print_mode(opts: &RunOpts) -> Print {
    crate::print::mode(
        opts.print,
        opts.print_pid,
        opts.print_tag.map(|t| t.as_slice().to_vec()),
    )
}

fn start<'a>(
    env: Env<'a>,
    source: Source<'a>,
    mut opts: RunOpts<'a>,
    fast: Option<Fast>,
) -> Term<'a> {
    if fast.is_some() {
        opts.max_instructions = opts.max_instructions.min(FAST_INSTRUCTIONS);
        opts.max_memory = match opts.max_memory {
            0 => FAST_MEMORY as u64,
            n => n.min(FAST_MEMORY as u64),
        };
        opts.max_result_bytes = opts.max_result_bytes.min(FAST_RESULT_BYTES);
    }
    let t0 = Instant::now();
    let early = |e: SandboxError| early_error(env, e, &opts.chunk_name, t0);
    let max_source = opts.max_source as usize;
    let (code, chunk_name) = match &source {
        Source::Text(bin) => {
            if let Err(e) = check_source(bin.as_slice(), max_source, "source") {
                return early(e);
            }
            (
                Code::new(bin.as_slice(), &opts.chunk_name, false),
                opts.chunk_name.clone(),
            )
        }
        Source::Chunk(chunk) => (
            Code::new(&chunk.bytecode, &chunk.name, true),
            chunk.name.clone(),
        ),
    };
    let code = match code {
        Ok(c) => c,
        Err(e) => return early(e),
    };
    let limits = Limits {
        max_instructions: opts.max_instructions,
        max_memory: slots::clamp_memory(opts.max_memory),
        max_depth: opts.max_depth as usize,
        max_result_bytes: opts.max_result_bytes,
        max_output: opts.max_output as usize,
        max_source,
        max_tool_calls: opts.max_tool_calls,
        timeout: opts.timeout.map(Duration::from_millis),
    };
    let lease = match slots::lease(limits.max_memory) {
        Ok(lease) => lease,
        Err(e) => return early(e),
    };
    let mut running = Running::new(
        Home::Fresh(lease),
        limits,
        print_mode(&opts),
        chunk_name,
        Some(Box::new(Handles::new())),
        t0,
    );
    if fast.is_some() {
        // A first attempt streams nothing until it has succeeded.
        running.scope.output().hold();
    }
    // A module that is not source or a chunk fails the run like the rest of its setup.
    let sources = ModuleSources::decode(&opts.modules, max_source);
    let prepared = sources.and_then(|sources| {
        let modules = sources.codes()?;
        // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
        let mut globals = unsafe { marshal::globals_push::<Nif>(&opts.globals, limits.max_depth) };
        let mut call = opts.call.as_ref().map(|(name, args)| {
            (
                name,
                // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
                unsafe { marshal::values_push::<Nif>(args, limits.max_depth, "call.args") },
            )
        });
        let setup = Setup {
            state: Some(StateSetup {
                globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
                tools: &opts.tools,
                modules: &modules,
            }),
            call_globals: None,
            entry: Entry::Chunk(&code),
            call: call
                .as_mut()
                .map(|(name, args)| (name.as_str(), args as Push)),
        };
        running.prepare(crate::caller::of(env), setup)
    });
    begin(env, prepared, running, t0, fast)
}

/// The `modules:` option's sources as the NIF received them, checked.
pub(crate) struct ModuleSources<'s, 'a> {
    sources: Vec<(&'s str, ModuleSource<'a>)>,
}

/// A module's source: text, or a compiled chunk.
enum ModuleSource<'a> {
    Text(rustler::Binary<'a>),
    Chunk(ResourceArc<CompiledChunk>),
}

impl<'s, 'a> ModuleSources<'s, 'a> {
    pub(crate) fn decode(
        modules: &'s [(String, Term<'a>)],
        max_source: usize,
    ) -> Result<ModuleSources<'s, 'a>, SandboxError> {
        let mut sources = Vec::with_capacity(modules.len());
        for (name, term) in modules {
            let source = if term.get_type() == TermType::Binary {
                let bin: rustler::Binary = term.decode().map_err(|_| bad_module(name))?;
                check_source(bin.as_slice(), max_source, &format!("module '{name}'"))?;
                ModuleSource::Text(bin)
            } else {
                ModuleSource::Chunk(term.decode().map_err(|_| bad_module(name))?)
            };
            sources.push((name.as_str(), source));
        }
        Ok(ModuleSources { sources })
    }

    /// The modules' chunks, ready to load.
    pub(crate) fn codes(&self) -> Result<Vec<Module<'_>>, SandboxError> {
        self.sources
            .iter()
            .map(|(name, source)| {
                let code = match source {
                    ModuleSource::Text(bin) => Code::new(bin.as_slice(), name, false)?,
                    ModuleSource::Chunk(chunk) => Code::new(&chunk.bytecode, &chunk.name, true)?,
                };
                Ok(Module { name, code })
            })
            .collect()
    }
}

fn bad_module(name: &str) -> SandboxError {
    SandboxError::InvalidInput(format!(
        "module '{name}' must be Lua source or a compiled chunk"
    ))
}

/// Runs a prepared run coroutine to its first stop and answers. A first attempt (`fast`)
/// answers `:retry` instead when it stopped at one of the attempt's own limits or a tool call.
pub(crate) fn begin<'a>(
    env: Env<'a>,
    prepared: Result<c_int, SandboxError>,
    mut running: Running,
    t0: Instant,
    fast: Option<Fast>,
) -> Term<'a> {
    let nargs = match prepared {
        Ok(n) => n,
        Err(e) => {
            running.elapsed = t0.elapsed();
            // The error the run would report (`finish_error`): an abort met in the setup is
            // sticky, whatever error the setup itself returned.
            if fast.is_some_and(|f| f.retry(&running.outcome(e.clone()))) {
                return retry_later(env, running);
            }
            return finish_error(env, &mut running, e, None);
        }
    };
    let step = running.resume(crate::caller::of(env), nargs);
    running.elapsed = t0.elapsed();
    if let Some(fast) = &fast {
        let retry = match &step {
            // A tool call (within the limit or over it) needs the real run.
            Ok(Step::ToolCall { .. }) | Err(SandboxError::ToolLimit) => true,
            // Whether the result fits the attempt's bounds is known once it is converted
            // (`settle`).
            Ok(Step::Done { .. }) => false,
            Err(e) => fast.retry(&running.outcome(e.clone())),
            Ok(Step::Failed { .. }) => running
                .scope
                .control
                .abort()
                .is_some_and(|why| fast.retry(&why.into())),
        };
        if retry {
            return retry_later(env, running);
        }
    }
    settle(env, running, step, None, fast)
}

/// Throws a first attempt away unseen: a fresh run's slot is restored, a session's state
/// rolled back to the call's checkpoint without counting the attempt as a call.
fn retry_later(env: Env<'_>, running: Running) -> Term<'_> {
    running.discard();
    atoms::retry().encode(env)
}

/// Turns a step into the NIF's answer; a tool call parks the session in the resource, any
/// other outcome ends the lease (the slot is restored and reused).
fn settle<'a>(
    env: Env<'a>,
    mut session: Running,
    step: Result<Step, SandboxError>,
    run: Option<ResourceArc<Run>>,
    fast: Option<Fast>,
) -> Term<'a> {
    // Converting results and tool arguments is charged to the run's budget (and can be
    // killed or time out), so it runs with the run active; streamed output goes out before a
    // tool call and at the end.
    let scope: *const Scope = &*session.scope;
    let caller = crate::caller::of(env);
    // SAFETY: the scope is boxed in `session`, which lives until the end of this function
    // (dropped, or parked in the resource); the activation ends before that.
    let _active = unsafe { &*scope }.activate(caller);
    session.scope.output().flush(caller);
    lua_sandbox_core::stretch::mark();
    let answer = settle_step(env, &mut session, step, fast);
    lua_sandbox_core::stretch::mark();
    session.scope.control.clock_stop();
    match answer {
        Answer::Final(term) => term,
        // Thrown away unseen: nothing was sent, nothing of the attempt is kept.
        Answer::Retry => retry_later(env, session),
        Answer::ToolCall(name_term, terms) => {
            let run = run.unwrap_or_else(|| {
                ResourceArc::new(Run {
                    owner: env.pid(),
                    session: Mutex::new(None),
                })
            });
            *run.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
            (atoms::tool_call(), run.clone(), name_term, terms).encode(env)
        }
    }
}

/// What a finished NIF call hands back: a final answer, or a tool call to park the run at.
enum Answer<'a> {
    Final(Term<'a>),
    /// The tool's name and its arguments' list.
    ToolCall(Term<'a>, Term<'a>),
    /// A first attempt's result is over the attempt's bounds: run it again (`run_try`).
    Retry,
}

fn settle_step<'a>(
    env: Env<'a>,
    session: &mut Running,
    mut step: Result<Step, SandboxError>,
    fast: Option<Fast>,
) -> Answer<'a> {
    // A tool call whose arguments the host refuses (`marshal::ArgsError::Refused`) raises a
    // Lua error where the script called the tool, and the run goes on to its next stop.
    loop {
        match settle_once(env, session, step, fast) {
            Settled::Answer(answer) => return answer,
            Settled::Refused(message) => {
                let t0 = Instant::now();
                let caller = crate::caller::of(env);
                step = session
                    .reply(caller, Reply::Refused(&message))
                    .and_then(|n| session.resume(caller, n));
                session.elapsed += t0.elapsed();
                session.scope.output().flush(caller);
            }
        }
    }
}

enum Settled<'a> {
    Answer(Answer<'a>),
    /// The tool call's arguments were refused: this message is raised in Lua.
    Refused(String),
}

fn settle_once<'a>(
    env: Env<'a>,
    session: &mut Running,
    step: Result<Step, SandboxError>,
    fast: Option<Fast>,
) -> Settled<'a> {
    let thread = session.thread();
    Settled::Answer(Answer::Final(match step {
        Err(e) => finish_error(env, session, e, None),
        Ok(Step::Failed { idx }) => {
            // SAFETY: `idx` is the error object's slot on the finished thread.
            let message = unsafe { lua_sandbox_core::protect::describe(thread, idx) };
            finish_error(env, session, SandboxError::Runtime(message), Some(idx))
        }
        Ok(Step::Done { first, n }) => {
            // SAFETY: the results are on the finished thread's stack at `first..first + n`.
            let terms =
                unsafe { marshal::to_terms(env, thread, first, n, session.limits.bounds()) }
                    .map_err(|f| f.into_error("result"));
            lua_sandbox_core::stretch::mark();
            match terms {
                Ok(terms) => match terms.list(env) {
                    Ok(values) => {
                        session.succeeded();
                        let output = session.scope.output().finish(crate::caller::of(env));
                        let stats = stats_term(env, &session.stats());
                        (atoms::ok(), values, binary_term(env, &output), stats).encode(env)
                    }
                    Err(why) => finish_error(env, session, why.into(), None),
                },
                Err(e) if fast.is_some_and(|f| f.retry(&e)) => {
                    return Settled::Answer(Answer::Retry)
                }
                Err(e) => finish_error(env, session, e, None),
            }
        }
        Ok(Step::ToolCall {
            name,
            first,
            n,
            keep,
        }) => {
            let root = format!("tools.{name}");
            // SAFETY: the arguments are on the suspended thread at `first..first + n`.
            let terms =
                unsafe { marshal::to_terms(env, thread, first, n, session.limits.bounds()) }
                    .map_err(|f| f.into_args_error(&root));
            session.take_tool_args(keep);
            match terms {
                Err(marshal::ArgsError::Refused(message)) => return Settled::Refused(message),
                Err(marshal::ArgsError::Fatal(e)) => finish_error(env, session, e, None),
                Ok(terms) => match terms.list(env) {
                    Ok(args) => {
                        return Settled::Answer(Answer::ToolCall(
                            binary_term(env, name.as_bytes()),
                            args,
                        ))
                    }
                    Err(why) => finish_error(env, session, why.into(), None),
                },
            }
        }
    }))
}

/// Elixir's answer to a tool call, given to the suspended run: the values the tool function
/// sees. Returns how many.
fn reply_to_lua(
    session: &mut Running,
    caller: lua_sandbox_core::control::Caller,
    reply: Term,
) -> Result<c_int, SandboxError> {
    // A limit's kind: the run ends as it would at that limit inside Lua, output kept.
    // `:timeout`: the run's deadline passed while the tool ran (LuaSandbox.Runner stopped the
    // tool); `:memory_limit` / `:instruction_limit`: the tool's result has more values than
    // the run's limits let in, which LuaSandbox.Encoding found before walking all of it.
    if let Ok(kind) = reply.decode::<Atom>() {
        if kind == atoms::timeout() {
            return Err(SandboxError::Timeout);
        } else if kind == atoms::memory_limit() {
            return Err(SandboxError::MemoryLimit);
        } else if kind == atoms::instruction_limit() {
            return Err(SandboxError::InstructionLimit);
        }
    }
    let (tag, payload): (Atom, Term) = reply
        .decode()
        .map_err(|_| SandboxError::InvalidInput("bad tool reply".to_string()))?;
    let max_depth = session.limits.max_depth;
    if tag == atoms::ok() {
        let values = [payload];
        // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
        let mut push = unsafe { marshal::values_push::<Nif>(&values, max_depth, "tool result") };
        return session.reply(caller, Reply::Values(&mut push));
    }
    let msg: rustler::Binary = payload
        .decode()
        .map_err(|_| SandboxError::InvalidInput("bad tool error".to_string()))?;
    if tag == atoms::error() {
        session.reply(caller, Reply::Error(msg.as_slice()))
    } else {
        session.reply(caller, Reply::Raise(msg.as_slice()))
    }
}

/// The error answer; `value_idx` is the error object's slot on the run coroutine, if any.
fn finish_error<'a>(
    env: Env<'a>,
    session: &mut Running,
    e: SandboxError,
    value_idx: Option<c_int>,
) -> Term<'a> {
    let e = session.outcome(e);
    let line = line_of(&e.message(), &session.chunk_name);
    let traceback = if matches!(e, SandboxError::Runtime(_)) {
        session.scope.take_traceback()
    } else {
        None
    };
    let thread = session.thread();
    // A non-string error object travels as a value, bounded like any result.
    let value = match value_idx {
        Some(idx) if matches!(e, SandboxError::Runtime(_)) => {
            // SAFETY: `idx` is a valid slot of the finished thread; reading never raises.
            let t = unsafe { ffi::lua_type(thread, idx) };
            if t == ffi::LUA_TNIL || t == ffi::LUA_TSTRING {
                None
            } else {
                // SAFETY: as above.
                unsafe { marshal::to_term(env, thread, idx, Bounds::ERROR_VALUE, "error") }.ok()
            }
        }
        _ => None,
    };
    lua_sandbox_core::stretch::mark();
    // A first attempt's held chunks go out with its (final) error.
    let output = session.scope.output().finish(crate::caller::of(env));
    Failure {
        error: e,
        line,
        traceback,
        value,
        output,
        stats: session.stats(),
    }
    .encode(env)
}

/// The error answer of a run that failed before it started (no output, no work done).
pub(crate) fn early_error<'a>(
    env: Env<'a>,
    e: SandboxError,
    chunk_name: &str,
    t0: Instant,
) -> Term<'a> {
    Failure::early(e, chunk_name, t0.elapsed()).encode(env)
}
