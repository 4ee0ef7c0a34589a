//! The NIFs that run Lua: start a run, resume it after a tool call.
//!
//! A run is a coroutine inside a fresh sandboxed state, kept in a resource so a tool call can
//! suspend it, hand `{:tool_call, run, name, args}` to Elixir, and be resumed later on any
//! dirty scheduler. The resource belongs to the process that started the run: only it may
//! resume, and when it dies the resource (and the whole Lua state) is freed by the GC.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, MultiValue, Table, Thread, Value};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifMap, NifResult, ResourceArc, Term, TermType};

use crate::atoms;
use crate::budget::{self, Abort, Activation, Control};

use crate::chunk::CompiledChunk;
use crate::error::{line_of, SandboxError};
use crate::facts;
use crate::marshal::{self, binary_term, Bounds};
use crate::output::{self, Output, PrintMode};
use crate::sandbox::Sandbox;
use crate::stack;

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

struct Session {
    thread: Thread,
    tool_marker: Table,
    control: Box<Control>,
    chunk_name: String,
    max_depth: usize,
    max_result_bytes: u64,
    max_tool_calls: u64,
    tool_calls: u64,
    elapsed: Duration,
    // Last: every Lua value above refers into this state.
    sandbox: Sandbox,
}

pub struct Run {
    owner: LocalPid,
    session: Mutex<Option<Session>>,
}

#[rustler::resource_impl]
impl rustler::Resource for Run {}

impl Drop for Run {
    /// A run parked at a tool call is dropped when its owner dies (the GC of the dead
    /// process's heap, on a normal scheduler): closing a large Lua state there would stall that
    /// scheduler, so the state goes to the pool's thread like any finished run.
    fn drop(&mut self) {
        let session = self
            .session
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(session) = session {
            crate::pool::discard(Box::new(session));
        }
    }
}

/// What a step of the run produced.
enum Step {
    Done(MultiValue),
    Failed(Value),
    ToolCall(String, MultiValue),
}

#[rustler::nif(schedule = "DirtyCpu")]
fn run_start<'a>(env: Env<'a>, source: Term<'a>, opts: RunOpts<'a>) -> NifResult<Term<'a>> {
    let source = Source::decode(source)?;
    Ok(stack::with_big_stack(|| start(env, source, opts)))
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
        facts::clock_start(&session.sandbox.lua);
        let step = {
            let _active = Activation::new(&session.control, env.as_c_arg());
            reply_to_lua(&session, reply).and_then(|args| resume(&session, args))
        };
        session.elapsed += t0.elapsed();
        settle(env, session, step, Some(run.clone()))
    }))
}

enum Source<'a> {
    Text(rustler::Binary<'a>),
    Chunk(ResourceArc<CompiledChunk>),
}

impl<'a> Source<'a> {
    fn decode(term: Term<'a>) -> NifResult<Source<'a>> {
        if term.get_type() == TermType::Binary {
            return Ok(Source::Text(term.decode()?));
        }
        match term.decode::<ResourceArc<CompiledChunk>>() {
            Ok(chunk) => Ok(Source::Chunk(chunk)),
            Err(_) => Err(rustler::Error::BadArg),
        }
    }
}

fn print_mode(opts: &RunOpts) -> PrintMode {
    let print = opts.print;
    if print == atoms::send() {
        match opts.print_pid {
            Some(pid) => PrintMode::Send(pid, opts.print_tag.map(|t| t.as_slice().to_vec())),
            None => PrintMode::Capture,
        }
    } else if print == atoms::log() {
        PrintMode::Log
    } else if print == atoms::discard() {
        PrintMode::Discard
    } else {
        PrintMode::Capture
    }
}

fn start<'a>(env: Env<'a>, source: Source<'a>, opts: RunOpts<'a>) -> Term<'a> {
    let t0 = Instant::now();
    let max_source = opts.max_source as usize;
    let (bytes, mode, chunk_name): (&[u8], ChunkMode, String) = match &source {
        Source::Text(bin) => (bin.as_slice(), ChunkMode::Text, opts.chunk_name.clone()),
        Source::Chunk(chunk) => (&chunk.bytecode, ChunkMode::Binary, chunk.name.clone()),
    };
    let early = |e: SandboxError| early_error(env, e, t0);
    if mode == ChunkMode::Text {
        if let Err(e) = crate::chunk::check_source(bytes, max_source, "source") {
            return early(e);
        }
    }
    let sandbox = match crate::pool::take() {
        Ok(s) => s,
        Err(e) => return early(SandboxError::from(e)),
    };
    let control = Box::new(Control::new(opts.max_instructions));
    if let Some(ms) = opts.timeout {
        control.set_deadline(t0 + Duration::from_millis(ms));
    }
    let lua = &sandbox.lua;
    facts::clock_start(lua);
    lua.set_app_data(Output::new(opts.max_output as usize, print_mode(&opts)));
    if let Err(e) = lua.set_memory_limit(opts.max_memory as usize) {
        return early(SandboxError::from(e));
    }

    let prepared = {
        let _active = Activation::new(&control, env.as_c_arg());
        prepare(&sandbox, &control, &opts, bytes, mode, &chunk_name)
    };
    let (thread, args) = match prepared {
        Ok(x) => x,
        Err(e) => {
            let e = control.abort().map(SandboxError::from).unwrap_or(e);
            return error_term(
                env,
                &sandbox,
                &control,
                t0.elapsed(),
                0,
                &chunk_name,
                e,
                Value::Nil,
            );
        }
    };
    let session = Session {
        thread,
        tool_marker: sandbox.tool_marker.clone(),
        control,
        chunk_name,
        max_depth: opts.max_depth as usize,
        max_result_bytes: opts.max_result_bytes,
        max_tool_calls: opts.max_tool_calls,
        tool_calls: 0,
        elapsed: Duration::ZERO,
        sandbox,
    };
    let step = {
        let _active = Activation::new(&session.control, env.as_c_arg());
        resume(&session, args)
    };
    let mut session = session;
    session.elapsed = t0.elapsed();
    settle(env, session, step, None)
}

/// Everything between a pristine state and the first resume: globals, tools, modules, the
/// chunk itself and the run coroutine. Runs under the budget and memory limit.
fn prepare(
    sandbox: &Sandbox,
    control: &Control,
    opts: &RunOpts,
    bytes: &[u8],
    mode: ChunkMode,
    chunk_name: &str,
) -> Result<(Thread, MultiValue), SandboxError> {
    let lua = &sandbox.lua;
    // Pristine states are built with the collector stopped.
    lua.gc_restart();
    let max_depth = opts.max_depth as usize;
    marshal::push_globals(lua, &opts.globals, max_depth)?;
    if !opts.tools.is_empty() {
        let names = lua
            .create_sequence_from(opts.tools.iter().map(|s| s.as_str()))
            .map_err(SandboxError::from)?;
        sandbox
            .make_tools
            .call::<()>(names)
            .map_err(SandboxError::from)?;
    }
    // The pristine state already has a `require` that knows no module.
    if !opts.modules.is_empty() {
        let loaders = lua.create_table().map_err(SandboxError::from)?;
        for (name, term) in &opts.modules {
            let f = load_module(sandbox, name, *term, opts.max_source as usize)?;
            loaders
                .raw_set(name.as_str(), f)
                .map_err(SandboxError::from)?;
        }
        sandbox
            .make_require
            .call::<()>(loaders)
            .map_err(SandboxError::from)?;
    }

    let chunk = lua
        .load(bytes)
        .set_name(format!("={chunk_name}"))
        .set_mode(mode)
        .into_function()
        .map_err(SandboxError::from_parse)?;

    let mut args = MultiValue::new();
    args.push_back(Value::Function(chunk));
    if let Some((name, call_args)) = &opts.call {
        args.push_back(Value::String(
            lua.create_string(name).map_err(SandboxError::from)?,
        ));
        args.extend(marshal::push_values(
            lua,
            call_args,
            max_depth,
            "call.args",
        )?);
    }
    let thread = lua
        .create_thread(sandbox.runner.clone())
        .map_err(SandboxError::from)?;
    budget::install_ticker(thread.state(), control);
    sandbox
        .configure
        .call::<()>((thread.clone(), opts.max_source))
        .map_err(SandboxError::from)?;
    Ok((thread, args))
}

fn load_module(
    sandbox: &Sandbox,
    name: &str,
    term: Term,
    max_source: usize,
) -> Result<Function, SandboxError> {
    let lua = &sandbox.lua;
    if term.get_type() == TermType::Binary {
        let bin: rustler::Binary = term.decode().map_err(|_| bad_module(name))?;
        crate::chunk::check_source(bin.as_slice(), max_source, &format!("module '{name}'"))?;
        lua.load(bin.as_slice())
            .set_name(format!("={name}"))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map_err(SandboxError::from_parse)
    } else {
        let chunk: ResourceArc<CompiledChunk> = term.decode().map_err(|_| bad_module(name))?;
        lua.load(&chunk.bytecode[..])
            .set_name(format!("={}", chunk.name))
            .set_mode(ChunkMode::Binary)
            .into_function()
            .map_err(SandboxError::from)
    }
}

fn bad_module(name: &str) -> SandboxError {
    SandboxError::InvalidInput(format!(
        "module '{name}' must be Lua source or a compiled chunk"
    ))
}

/// Resumes the run coroutine once and classifies what came back.
fn resume(session: &Session, args: MultiValue) -> Result<Step, SandboxError> {
    // The deadline may have passed before the script gets to a check of its own: while a
    // tool ran, or while the state was prepared.
    budget::charge_steps(0)?;
    let result = session.thread.resume::<MultiValue>(args);
    budget::settle_instructions(session.thread.state(), &session.control);
    if let Some(why) = session.control.abort() {
        return Err(why.into());
    }
    let mut values = result.map_err(SandboxError::from)?;
    if session.thread.status() == mlua::thread::ThreadStatus::Resumable {
        let is_tool = matches!(values.front(), Some(Value::Table(t)) if t.to_pointer() == session.tool_marker.to_pointer());
        if !is_tool {
            return Err(SandboxError::Runtime(
                "attempt to yield from outside a coroutine".to_string(),
            ));
        }
        values.pop_front();
        let name = match values.pop_front() {
            Some(Value::String(s)) => s.to_string_lossy(),
            _ => String::new(),
        };
        return Ok(Step::ToolCall(name, values));
    }
    match values.pop_front() {
        Some(Value::Boolean(true)) => Ok(Step::Done(values)),
        _ => {
            let err = values.pop_front().unwrap_or(Value::Nil);
            if let Value::String(s) = &err {
                if &*s.as_bytes() == b"not enough memory" {
                    return Err(SandboxError::MemoryLimit);
                }
            }
            Ok(Step::Failed(err))
        }
    }
}

/// What a finished NIF call hands back: a final answer, or a tool call to park the run at.
enum Answer<'a> {
    Final(Term<'a>),
    ToolCall(Term<'a>, Vec<Term<'a>>),
}

/// Turns a step into the NIF's answer; a tool call parks the session in the resource, any
/// other outcome hands the finished state to the pool's thread to close. Converting results
/// is charged to the run's budget, so it runs with the run active.
fn settle<'a>(
    env: Env<'a>,
    mut session: Session,
    step: Result<Step, SandboxError>,
    run: Option<ResourceArc<Run>>,
) -> Term<'a> {
    if let Ok(Step::ToolCall(..)) = step {
        session.tool_calls += 1;
        if session.tool_calls > session.max_tool_calls {
            session.control.set_abort(Abort::ToolCalls);
        }
    }
    let answer = {
        let _active = Activation::new(&session.control, env.as_c_arg());
        output::flush(&session.sandbox.lua);
        answer(env, &session, step)
    };
    facts::clock_stop(&session.sandbox.lua);
    match answer {
        Answer::Final(term) => {
            crate::pool::discard(Box::new(session));
            term
        }
        Answer::ToolCall(name, terms) => {
            let run = run.unwrap_or_else(|| {
                ResourceArc::new(Run {
                    owner: env.pid(),
                    session: Mutex::new(None),
                })
            });
            *run.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
            (atoms::tool_call(), run.clone(), name, terms).encode(env)
        }
    }
}

fn answer<'a>(env: Env<'a>, session: &Session, step: Result<Step, SandboxError>) -> Answer<'a> {
    Answer::Final(match step {
        Err(e) => finish_error(env, session, e, Value::Nil),
        Ok(Step::Failed(value)) => {
            let message = error_message(&value);
            finish_error(env, session, SandboxError::Runtime(message), value)
        }
        Ok(Step::Done(values)) => finish_ok(env, session, &values),
        Ok(Step::ToolCall(_, _)) if session.tool_calls > session.max_tool_calls => {
            finish_error(env, session, SandboxError::ToolLimit, Value::Nil)
        }
        Ok(Step::ToolCall(name, args)) => match tool_call_args(env, session, &name, &args) {
            Err(e) => finish_error(env, session, e, Value::Nil),
            Ok(terms) => return Answer::ToolCall(binary_term(env, name.as_bytes()), terms),
        },
    })
}

fn bounds(session: &Session) -> Bounds {
    Bounds {
        max_depth: session.max_depth,
        max_bytes: session.max_result_bytes,
    }
}

fn finish_ok<'a>(env: Env<'a>, session: &Session, values: &MultiValue) -> Term<'a> {
    let lua = &session.sandbox.lua;
    let terms = match marshal::to_terms(env, lua, values, bounds(session), "result") {
        Ok(terms) => terms,
        Err(e) => return finish_error(env, session, e, Value::Nil),
    };
    let output = take_output(&session.sandbox);
    (
        atoms::ok(),
        terms,
        binary_term(env, &output),
        stats(env, session),
    )
        .encode(env)
}

fn tool_call_args<'a>(
    env: Env<'a>,
    session: &Session,
    name: &str,
    args: &MultiValue,
) -> Result<Vec<Term<'a>>, SandboxError> {
    let root = format!("tools.{name}");
    marshal::to_terms(env, &session.sandbox.lua, args, bounds(session), &root)
}

/// Lua's own rendering of an error object, without running metamethods.
fn error_message(value: &Value) -> String {
    match value {
        Value::String(s) => s.to_string_lossy(),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => format!("{n}"),
        Value::Nil => "(error object is a nil value)".to_string(),
        other => format!("(error object is a {} value)", other.type_name()),
    }
}

/// Elixir's answer to a tool call, as the values the tool function sees.
fn reply_to_lua(session: &Session, reply: Term) -> Result<MultiValue, SandboxError> {
    let lua = &session.sandbox.lua;
    let (tag, payload): (Atom, Term) = reply
        .decode()
        .map_err(|_| SandboxError::InvalidInput("bad tool reply".to_string()))?;
    let mut values = MultiValue::new();
    if tag == atoms::ok() {
        let converted = marshal::push_values(lua, &[payload], session.max_depth, "tool result")?;
        values.push_back(Value::Boolean(true));
        values.extend(converted);
    } else if tag == atoms::error() {
        let msg: rustler::Binary = payload
            .decode()
            .map_err(|_| SandboxError::InvalidInput("bad tool error".to_string()))?;
        values.push_back(Value::Boolean(true));
        values.push_back(Value::Nil);
        values.push_back(Value::String(
            lua.create_string(msg.as_slice())
                .map_err(SandboxError::from)?,
        ));
    } else {
        let msg: rustler::Binary = payload
            .decode()
            .map_err(|_| SandboxError::InvalidInput("bad tool failure".to_string()))?;
        values.push_back(Value::Boolean(false));
        values.push_back(Value::String(
            lua.create_string(msg.as_slice())
                .map_err(SandboxError::from)?,
        ));
    }
    Ok(values)
}

fn take_output(sandbox: &Sandbox) -> Vec<u8> {
    sandbox
        .lua
        .app_data_mut::<Output>()
        .map(|mut o| o.take())
        .unwrap_or_default()
}

fn stats<'a>(env: Env<'a>, session: &Session) -> Term<'a> {
    stats_term(
        env,
        &session.sandbox,
        &session.control,
        session.elapsed,
        session.tool_calls,
    )
}

fn stats_term<'a>(
    env: Env<'a>,
    sandbox: &Sandbox,
    control: &Control,
    elapsed: Duration,
    tool_calls: u64,
) -> Term<'a> {
    control.note_memory(sandbox.lua.used_memory());
    stats_map(
        env,
        [
            control.instructions(),
            control.memory_peak() as u64,
            elapsed.as_micros() as u64,
            tool_calls,
            facts::cpu_time(&sandbox.lua).as_micros() as u64,
        ],
    )
}

/// `%{instructions:, memory_peak:, duration_us:, tool_calls:, cpu_us:}` from values in that
/// order.
fn stats_map(env: Env<'_>, values: [u64; 5]) -> Term<'_> {
    let keys = [
        atoms::instructions().encode(env),
        atoms::memory_peak().encode(env),
        atoms::duration_us().encode(env),
        atoms::tool_calls().encode(env),
        atoms::cpu_us().encode(env),
    ];
    let values = values.map(|v| v.encode(env));
    Term::map_from_arrays(env, &keys, &values).unwrap_or_else(|_| atoms::nil().encode(env))
}

fn finish_error<'a>(env: Env<'a>, session: &Session, e: SandboxError, value: Value) -> Term<'a> {
    let e = session.control.abort().map(SandboxError::from).unwrap_or(e);
    error_term(
        env,
        &session.sandbox,
        &session.control,
        session.elapsed,
        session.tool_calls,
        &session.chunk_name,
        e,
        value,
    )
}

#[allow(clippy::too_many_arguments)]
fn error_term<'a>(
    env: Env<'a>,
    sandbox: &Sandbox,
    control: &Control,
    elapsed: Duration,
    tool_calls: u64,
    chunk_name: &str,
    e: SandboxError,
    value: Value,
) -> Term<'a> {
    let message = e.to_string();
    let line = line_of(&message, chunk_name);
    let traceback = if matches!(e, SandboxError::Runtime(_)) {
        sandbox
            .lua
            .remove_app_data::<crate::sandbox::Traceback>()
            .map(|t| t.0)
    } else {
        None
    };
    // A non-string error object travels as a value, bounded like any result.
    let value_term = match &value {
        Value::Nil | Value::String(_) => atoms::nil().encode(env),
        v => {
            let bounds = Bounds {
                max_depth: 64,
                max_bytes: 1 << 20,
            };
            marshal::to_term(env, &sandbox.lua, v, bounds, "error")
                .unwrap_or_else(|_| atoms::nil().encode(env))
        }
    };
    let output = take_output(sandbox);
    let stats = stats_term(env, sandbox, control, elapsed, tool_calls);
    (
        atoms::error(),
        (e.kind(), message, line, traceback, value_term),
        binary_term(env, &output),
        stats,
    )
        .encode(env)
}

fn early_error(env: Env<'_>, e: SandboxError, t0: Instant) -> Term<'_> {
    let stats = stats_map(env, [0, 0, t0.elapsed().as_micros() as u64, 0, 0]);
    let none: Option<String> = None;
    (
        atoms::error(),
        (e.kind(), e.to_string(), none.clone(), none, atoms::nil()),
        binary_term(env, b""),
        stats,
    )
        .encode(env)
}
