//! Runs scripts in the worker, with the core's run machinery (`exec::Run`) as the NIF does
//! (`native/lua_sandbox_nif/src/run.rs`), answering in the same shapes: `{:ok, values, output,
//! stats}`, the error answer `{:error, {kind, message, line, traceback, value}, output, stats}`,
//! or `{:tool_call, name, args}` with the run parked until the `{:reply, reply}` request.
//!
//! The worker has one slot, built before the jail and kept in the core's pool
//! ([`pool::keep`]); every run leases it and gives it back restored from its snapshot. A run's
//! caller is the BEAM end of the pipe: when the port closes (the caller died, the pool gave up
//! on the worker) fd 0 hangs up, or a session's `:cancel` frame waits on it (`crate::cancelled`),
//! the budget's liveness check sees it at the next tick and the run ends `:killed`; the deadline
//! is the run's own (`timeout` in its limits). A session's calls (`crate::session`) run here too.

use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lua_sandbox_core::chunk::{check_source, Code};
use lua_sandbox_core::control::Caller;
use lua_sandbox_core::error::{line_of, SandboxError};
use lua_sandbox_core::exec::{
    Entry, Home, Limits, Module, Push, Reply, Run, Setup, StateSetup, Stats, Step,
};
use lua_sandbox_core::output::{Print, Sink};
use lua_sandbox_core::{ffi, pool, protect, Slot};

use crate::marshal::{self, ArgsError, Bounds, Proto};
use crate::proto::{self, Term};

/// Runs scripts in the worker's one slot; holds the run parked at a tool call, if any.
pub struct Runner {
    pub(crate) capacity: usize,
    /// The largest `max_memory` the slot serves (the worker's argument).
    pub(crate) max_memory: usize,
    parked: Option<Run>,
    /// The id of the request being answered ([`Runner::serving`]): streamed output
    /// (`print: {:send, ...}`) goes out as `{id, {:print, bytes}}` frames under it.
    request: Arc<Mutex<Term>>,
}

/// Streams a run's output as `{id, {:print, bytes}}` frames on fd 1, ahead of the request's
/// answer; the BEAM forwards each as the NIF's `{:lua_print, ...}` message (the pid and the tag
/// never leave the BEAM). When to send (coalescing) is the core's `output.rs`, as in the NIF.
struct Frames {
    request: Arc<Mutex<Term>>,
}

impl Sink for Frames {
    fn send(&mut self, _caller: Caller, chunk: &[u8]) {
        let id = self
            .request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let frame = Term::tuple([id, Term::tuple([Term::atom("print"), Term::bin(chunk)])]);
        // SAFETY: fd 1 is the port's pipe, open for the life of the process (main.rs); the
        // ManuallyDrop never closes it, and frames are written from this one thread only,
        // each whole before the next (main.rs writes the answers after the run returns).
        let mut out = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
        // A broken pipe is the caller gone: the budget's liveness check ends the run at its
        // next tick; the output is still captured meanwhile.
        let _ = proto::write_frame(&mut *out, &frame);
    }
}

impl Runner {
    /// Keeps `slot` (pristine, built for `max_memory`) in the core's pool for the runs.
    pub fn new(slot: Slot, max_memory: usize) -> Runner {
        let capacity = slot.capacity();
        pool::keep(slot);
        Runner {
            capacity,
            max_memory,
            parked: None,
            request: Arc::new(Mutex::new(Term::atom("nil"))),
        }
    }

    /// The id of the request about to be answered (its streamed output goes under it).
    pub fn serving(&self, id: &Term) {
        *self.request.lock().unwrap_or_else(|p| p.into_inner()) = id.clone();
    }

    /// Where a run's or a session call's output goes, for its `print` option.
    pub(crate) fn print(&self, opt: PrintOpt) -> Print {
        match opt {
            PrintOpt::Discard => Print::Discard,
            PrintOpt::Capture => Print::Capture,
            PrintOpt::Send => Print::Stream(Box::new(Frames {
                request: self.request.clone(),
            })),
        }
    }

    /// The worker's slot, leased (for the test-only probes that run Lua directly).
    pub fn lease(&self) -> Result<pool::Lease, SandboxError> {
        pool::lease_from(self.capacity)
    }

    /// Starts a run: `source` (Lua text) with `opts` (the map `LuaSandbox.Worker.run_opts/1`
    /// builds from the NIF's options). A run parked at a tool call is dropped first (its
    /// caller gave up on it).
    pub fn start(&mut self, source: &Term, opts: &Term) -> Term {
        self.parked = None;
        let t0 = Instant::now();
        let opts = match Opts::decode(opts, self.max_memory) {
            Ok(opts) => opts,
            Err(e) => return early(e, "", t0),
        };
        let early = |e: SandboxError| early(e, &opts.chunk_name, t0);
        let limits = opts.limits;
        let source = match Source::decode(source, "source") {
            Ok(source) => source,
            Err(e) => return early(e),
        };
        let code = match source.code(&opts.chunk_name, limits.max_source, "source") {
            Ok(code) => code,
            Err(e) => return early(e),
        };
        let lease = match pool::lease_from(self.capacity) {
            Ok(lease) => lease,
            Err(e) => return early(e),
        };
        let mut run = Run::new(
            Home::Fresh(lease),
            limits,
            self.print(opts.print),
            // A chunk runs under its own name, as in the NIF.
            source.name(&opts.chunk_name).to_string(),
            // the token of the run's handles (`marshal::Handles`)
            Some(Box::new(marshal::Handles::default())),
            t0,
        );
        let max_depth = limits.max_depth;
        let prepared = opts.modules().and_then(|modules| {
            let mut globals = opts.push_globals(max_depth);
            let mut call = opts.push_call(max_depth);
            let setup = Setup {
                state: Some(StateSetup {
                    globals: (!opts.globals.is_empty()).then_some(&mut globals as Push),
                    tools: &opts.tools,
                    modules: &modules,
                }),
                call_globals: None,
                entry: Entry::Chunk(&code),
                call: call.as_mut().map(|(name, push)| (*name, push as Push)),
            };
            run.prepare(caller(), setup)
        });
        self.go(run, prepared, t0)
    }

    /// Runs a prepared run (`prepared`: what `Run::prepare` answered) to its first stop and
    /// answers: the end of a fresh run or a session call (`crate::session`) alike.
    pub(crate) fn go(
        &mut self,
        mut run: Run,
        prepared: Result<c_int, SandboxError>,
        t0: Instant,
    ) -> Term {
        let step = prepared.and_then(|nargs| run.resume(caller(), nargs));
        run.elapsed = t0.elapsed();
        self.settle(run, step)
    }

    /// Drops the run parked at a tool call, if any (its caller gave up on it: a session call
    /// is rolled back as the loan ends). Whether there was one.
    pub fn cancel(&mut self) -> bool {
        self.parked.take().is_some()
    }

    /// Gives the tool's reply to the parked run and runs it to its next stop.
    pub fn reply(&mut self, reply: &Term) -> Term {
        let Some(mut run) = self.parked.take() else {
            return Term::tuple([Term::atom("error"), Term::bin("no run is parked")]);
        };
        let t0 = Instant::now();
        run.scope.control.clock_start();
        let step = reply_to_lua(&mut run, reply).and_then(|nargs| run.resume(caller(), nargs));
        run.elapsed += t0.elapsed();
        self.settle(run, step)
    }

    /// Turns a step into the answer; a tool call parks the run, any other outcome ends it
    /// (the slot goes back, restored).
    fn settle(&mut self, mut run: Run, mut step: Result<Step, SandboxError>) -> Term {
        // Converting results and tool arguments is charged to the run's budget, so it runs
        // with the run's scope active.
        let scope: *const lua_sandbox_core::scope::Scope = &*run.scope;
        // SAFETY: the scope is boxed in `run`, which outlives the activation (dropped at the
        // end of this function, before `run` is parked or dropped).
        let active = unsafe { &*scope }.activate(caller());
        // Streamed output goes out before a tool call and at the end (the NIF's `settle`).
        run.scope.output().flush(caller());
        let answer = loop {
            match settle_once(&mut run, step) {
                Settled::Final(term) => break term,
                Settled::ToolCall(term) => {
                    drop(active);
                    run.scope.control.clock_stop();
                    self.parked = Some(run);
                    return term;
                }
                Settled::Refused(message) => {
                    let t0 = Instant::now();
                    step = run
                        .reply(caller(), Reply::Refused(&message))
                        .and_then(|n| run.resume(caller(), n));
                    run.elapsed += t0.elapsed();
                    run.scope.output().flush(caller());
                }
            }
        };
        drop(active);
        run.scope.control.clock_stop();
        answer
    }
}

enum Settled {
    Final(Term),
    ToolCall(Term),
    /// The tool call's arguments were refused: this message is raised in Lua.
    Refused(String),
}

fn settle_once(run: &mut Run, step: Result<Step, SandboxError>) -> Settled {
    let thread = run.thread();
    Settled::Final(match step {
        Err(e) => finish_error(run, e, None),
        Ok(Step::Failed { idx }) => {
            // SAFETY: `idx` is the error object's slot on the finished thread.
            let message = unsafe { protect::describe(thread, idx) };
            finish_error(run, SandboxError::Runtime(message), Some(idx))
        }
        Ok(Step::Done { first, n }) => {
            // SAFETY: the results are on the finished thread's stack at `first..first + n`.
            match unsafe { marshal::to_terms(thread, first, n, run.limits.bounds()) }
                .map_err(|f| f.into_error("result"))
            {
                Ok(values) => {
                    run.succeeded();
                    let output = run.scope.output().finish(caller());
                    Term::tuple([
                        Term::atom("ok"),
                        values,
                        Term::Bin(output),
                        stats_term(&run.stats()),
                    ])
                }
                Err(e) => finish_error(run, e, None),
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
            let args = unsafe { marshal::to_terms(thread, first, n, run.limits.bounds()) }
                .map_err(|f| f.into_args_error(&root));
            run.take_tool_args(keep);
            match args {
                Err(ArgsError::Refused(message)) => return Settled::Refused(message),
                Err(ArgsError::Fatal(e)) => finish_error(run, e, None),
                Ok(args) => {
                    return Settled::ToolCall(Term::tuple([
                        Term::atom("tool_call"),
                        Term::bin(name),
                        args,
                    ]))
                }
            }
        }
    })
}

/// The tool's answer (`LuaSandbox.Tools.call/4`'s, or a limit's kind) given to the parked run.
fn reply_to_lua(run: &mut Run, reply: &Term) -> Result<c_int, SandboxError> {
    // A limit's kind: the run ends as it would at that limit inside Lua (run.rs of the NIF).
    match reply.as_atom() {
        Some("timeout") => return Err(SandboxError::Timeout),
        Some("memory_limit") => return Err(SandboxError::MemoryLimit),
        Some("instruction_limit") => return Err(SandboxError::InstructionLimit),
        _ => {}
    }
    let bad = || SandboxError::InvalidInput("bad tool reply".to_string());
    let Term::Tuple(t) = reply else {
        return Err(bad());
    };
    let [tag, payload] = t.as_slice() else {
        return Err(bad());
    };
    let max_depth = run.limits.max_depth;
    match (tag.as_atom(), payload) {
        (Some("ok"), value) => {
            let values = std::slice::from_ref(value);
            // SAFETY: the push goes to `exec` (the setup or the reply) and nowhere else.
            let mut push =
                unsafe { marshal::values_push::<Proto>(values, max_depth, "tool result") };
            run.reply(caller(), Reply::Values(&mut push))
        }
        (Some("error"), Term::Bin(msg)) => run.reply(caller(), Reply::Error(msg)),
        (Some("raise"), Term::Bin(msg)) => run.reply(caller(), Reply::Raise(msg)),
        _ => Err(SandboxError::InvalidInput("bad tool error".to_string())),
    }
}

/// The error answer; `value_idx` is the error object's slot on the run coroutine, if any.
fn finish_error(run: &mut Run, e: SandboxError, value_idx: Option<c_int>) -> Term {
    let e = run.outcome(e);
    let line = line_of(&e.message(), &run.chunk_name);
    let runtime = matches!(e, SandboxError::Runtime(_));
    let traceback = if runtime {
        run.scope.take_traceback()
    } else {
        None
    };
    let thread = run.thread();
    // A non-string error object travels as a value, bounded like any result.
    let value = match value_idx {
        Some(idx) if runtime => {
            // SAFETY: `idx` is a valid slot of the finished thread; reading never raises.
            let t = unsafe { ffi::lua_type(thread, idx) };
            if t == ffi::LUA_TNIL || t == ffi::LUA_TSTRING {
                None
            } else {
                // SAFETY: as above.
                unsafe { marshal::to_term(thread, idx, Bounds::ERROR_VALUE, "error") }.ok()
            }
        }
        _ => None,
    };
    let output = run.scope.output().finish(caller());
    let stats = run.stats();
    failure(e, line, traceback, value, output, &stats)
}

/// The error answer of a run that failed before it started.
pub(crate) fn early(e: SandboxError, chunk_name: &str, t0: Instant) -> Term {
    let line = line_of(&e.message(), chunk_name);
    let stats = Stats {
        duration_us: t0.elapsed().as_micros() as u64,
        ..Stats::default()
    };
    failure(e, line, None, None, Vec::new(), &stats)
}

/// `{:error, {kind, message, line, traceback, value}, output, stats}`, the NIF's `Failure`.
/// The message is moved into the answer, not copied: it can be as large as the heap (a
/// 20 MB error message was copied twice more here, with no check, after the run's end).
fn failure(
    e: SandboxError,
    line: Option<u32>,
    traceback: Option<String>,
    value: Option<Term>,
    output: Vec<u8>,
    stats: &Stats,
) -> Term {
    let nil = || Term::atom("nil");
    Term::tuple([
        Term::atom("error"),
        Term::tuple([
            Term::atom(e.kind_name()),
            Term::Bin(e.into_message().into_bytes()),
            line.map_or_else(nil, |l| Term::Int(l.into())),
            traceback.map_or_else(nil, Term::bin),
            value.unwrap_or_else(nil),
        ]),
        Term::Bin(output),
        stats_term(stats),
    ])
}

/// `%{instructions:, memory_peak:, duration_us:, tool_calls:, cpu_us:, denied:}` (the NIF's
/// `term::stats_term`).
fn stats_term(stats: &Stats) -> Term {
    let int = |v: u64| Term::Int(v.min(i64::MAX as u64) as i64);
    let denied = stats
        .denied
        .iter()
        .map(|(name, n)| (Term::bin(name), int(*n)))
        .collect();
    Term::Map(vec![
        (Term::atom("instructions"), int(stats.instructions)),
        (Term::atom("memory_peak"), int(stats.memory_peak)),
        (Term::atom("duration_us"), int(stats.duration_us)),
        (Term::atom("tool_calls"), int(stats.tool_calls)),
        (Term::atom("cpu_us"), int(stats.cpu_us)),
        (Term::atom("denied"), Term::Map(denied)),
    ])
}

/// The worker's caller: the BEAM end of its pipe, alive until the port closes or a session's
/// `:cancel` arrives (`crate::cancelled`).
pub(crate) fn caller() -> Caller {
    Caller {
        // Never read: `alive` looks at fd 0. Non-null, so the budget asks.
        env: std::ptr::NonNull::<c_void>::dangling().as_ptr(),
        alive: Some(alive),
    }
}

/// # Safety
/// None needed: the env is not read.
unsafe fn alive(_env: *mut c_void) -> bool {
    !crate::cancelled()
}

/// A run's options as `LuaSandbox.Worker` sends them.
pub(crate) struct Opts {
    pub(crate) limits: Limits,
    pub(crate) chunk_name: String,
    pub(crate) globals: Vec<(String, Term)>,
    pub(crate) call: Option<(String, Vec<Term>)>,
    pub(crate) tools: Vec<String>,
    modules: Vec<(String, Source)>,
    pub(crate) print: PrintOpt,
    /// A session call's `rollback` (absent: true; fresh runs have nothing to roll back).
    pub(crate) rollback: bool,
}

/// The `print` option: `:discard`; `:capture` and `:log` both capture (the BEAM logs); `:send`
/// also streams ([`Frames`]).
#[derive(Clone, Copy)]
pub(crate) enum PrintOpt {
    Discard,
    Capture,
    Send,
}

impl Opts {
    pub(crate) fn decode(opts: &Term, worker_memory: usize) -> Result<Opts, SandboxError> {
        let bad = |what: &str| SandboxError::InvalidInput(format!("bad run option {what}"));
        let Term::Map(pairs) = opts else {
            return Err(bad("map"));
        };
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k.as_atom() == Some(key))
                .map(|(_, v)| v)
        };
        let int = |key: &str| match get(key) {
            Some(Term::Int(i)) if *i >= 0 => Ok(*i as u64),
            _ => Err(bad(key)),
        };
        let text = |t: &Term, what: &str| match t {
            Term::Bin(b) => String::from_utf8(b.clone()).map_err(|_| bad(what)),
            _ => Err(bad(what)),
        };
        let list = |key: &str| match get(key) {
            Some(Term::List(items)) => Ok(items.as_slice()),
            _ => Err(bad(key)),
        };
        let max_memory = pool::clamp_memory(int("max_memory")?);
        if max_memory > worker_memory {
            return Err(SandboxError::InvalidInput(format!(
                "max_memory above {worker_memory} bytes is not yet supported with \
                 isolation: :process (the worker's arena is built for that much)"
            )));
        }
        let timeout = match get("timeout") {
            Some(Term::Int(ms)) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
            Some(Term::Atom(a)) if a == "nil" => None,
            _ => return Err(bad("timeout")),
        };
        let limits = Limits {
            max_instructions: int("max_instructions")?,
            max_memory,
            max_depth: int("max_depth")? as usize,
            max_result_bytes: int("max_result_bytes")?,
            max_output: int("max_output")? as usize,
            max_source: int("max_source")? as usize,
            max_tool_calls: int("max_tool_calls")?,
            timeout,
        };
        let pair = |t: &Term, what: &str| match t {
            Term::Tuple(kv) if kv.len() == 2 => Ok((text(&kv[0], what)?, kv[1].clone())),
            _ => Err(bad(what)),
        };
        let globals = list("globals")?
            .iter()
            .map(|g| pair(g, "globals"))
            .collect::<Result<_, _>>()?;
        let call = match get("call") {
            Some(Term::Atom(a)) if a == "nil" => None,
            Some(c) => match pair(c, "call")? {
                (name, Term::List(args)) => Some((name, args)),
                _ => return Err(bad("call")),
            },
            None => return Err(bad("call")),
        };
        let tools = list("tools")?
            .iter()
            .map(|t| text(t, "tools"))
            .collect::<Result<_, _>>()?;
        let modules = list("modules")?
            .iter()
            .map(|m| {
                let (name, source) = pair(m, "modules")?;
                let source = Source::decode(&source, &format!("module '{name}'"))?;
                Ok::<_, SandboxError>((name, source))
            })
            .collect::<Result<_, _>>()?;
        let chunk_name = match get("chunk_name") {
            Some(t) => text(t, "chunk_name")?,
            None => return Err(bad("chunk_name")),
        };
        let print = match get("print").and_then(Term::as_atom) {
            Some("discard") => PrintOpt::Discard,
            Some("capture" | "log") => PrintOpt::Capture,
            Some("send") => PrintOpt::Send,
            _ => return Err(bad("print")),
        };
        let rollback = match get("rollback").and_then(Term::as_atom) {
            None | Some("true") => true,
            Some("false") => false,
            Some(_) => return Err(bad("rollback")),
        };
        Ok(Opts {
            print,
            rollback,
            limits,
            chunk_name,
            globals,
            call,
            tools,
            modules,
        })
    }

    /// The `globals` as a [`Push`] for `exec` (the run's state-wide ones, or a session call's).
    pub(crate) fn push_globals(
        &self,
        max_depth: usize,
    ) -> impl FnMut(*mut ffi::lua_State, usize) -> Result<c_int, SandboxError> + '_ {
        // SAFETY: the callers (`Runner::start`, `crate::session`) give it to `exec`'s setup
        // and nowhere else.
        unsafe { marshal::globals_push::<Proto>(&self.globals, max_depth) }
    }

    /// The `call:` (the function's name and its arguments as a [`Push`]), if any.
    #[allow(clippy::type_complexity)]
    pub(crate) fn push_call(
        &self,
        max_depth: usize,
    ) -> Option<(
        &str,
        impl FnMut(*mut ffi::lua_State, usize) -> Result<c_int, SandboxError> + '_,
    )> {
        self.call.as_ref().map(|(name, args)| {
            (
                name.as_str(),
                // SAFETY: as for the globals.
                unsafe { marshal::values_push::<Proto>(args, max_depth, "call.args") },
            )
        })
    }

    /// The modules' chunks, checked against `max_source`, ready to load.
    pub(crate) fn modules(&self) -> Result<Vec<Module<'_>>, SandboxError> {
        self.modules
            .iter()
            .map(|(name, source)| {
                let what = format!("module '{name}'");
                Ok(Module {
                    name,
                    code: source.code(name, self.limits.max_source, &what)?,
                })
            })
            .collect()
    }
}

/// A chunk as the BEAM sends it: Lua text, or `{:bytecode, bytes, name}`, the bytecode of a
/// compiled chunk (`LuaSandbox.compile/2`) and its name: a run's source and modules, and a
/// session call's source (`crate::session`).
pub(crate) enum Source {
    Text(Vec<u8>),
    Bytecode(Vec<u8>, String),
}

impl Source {
    /// `what` names the chunk in messages (`source`, `module 'x'`).
    pub(crate) fn decode(term: &Term, what: &str) -> Result<Source, SandboxError> {
        match term {
            Term::Bin(text) => Ok(Source::Text(text.clone())),
            Term::Tuple(t) => match t.as_slice() {
                [tag, Term::Bin(bytes), Term::Bin(name)] if tag.as_atom() == Some("bytecode") => {
                    let name = String::from_utf8(name.clone()).map_err(|_| {
                        SandboxError::InvalidInput(format!("{what}: chunk name is not UTF-8"))
                    })?;
                    Ok(Source::Bytecode(bytes.clone(), name))
                }
                _ => Err(Source::bad(what)),
            },
            _ => Err(Source::bad(what)),
        }
    }

    /// The name the run goes by: a compiled chunk's own, else `given` (the `chunk_name`).
    pub(crate) fn name<'s>(&'s self, given: &'s str) -> &'s str {
        match self {
            Source::Text(_) => given,
            Source::Bytecode(_, own) => own,
        }
    }

    fn bad(what: &str) -> SandboxError {
        SandboxError::InvalidInput(format!("{what} must be Lua source or a compiled chunk"))
    }

    /// The chunk ready to load: text under `name` after the checks every source passes
    /// (`max_source`, no bytecode smuggled in as text); bytecode under its own name, as the
    /// NIF loads a chunk resource's.
    ///
    /// Loading bytecode is sound here because only the BEAM writes to this worker's fd 0 (the
    /// port it opened), and the BEAM sends bytecode only as `LuaSandbox.Worker` takes it from
    /// a chunk resource (`Native.chunk_bytecode/1`), which only the core's
    /// `chunk::compile_bytes` fills: the same bytes the NIF would load, produced by the same
    /// core. A script never reaches this path (`load` in the sandbox is text only, and source
    /// text starting with the bytecode signature is refused by `check_source`).
    pub(crate) fn code(
        &self,
        name: &str,
        max_source: usize,
        what: &str,
    ) -> Result<Code<'_>, SandboxError> {
        match self {
            Source::Text(text) => {
                check_source(text, max_source, what)?;
                Code::new(text, name, false)
            }
            Source::Bytecode(bytes, own) => Code::new(bytes, own, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        /// Bytes this thread allocated (or grew blocks by).
        static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    }

    /// The system allocator, counting what each thread allocates.
    struct Counting;

    // SAFETY: every method forwards to the system allocator with its caller's arguments; the
    // count is a thread-local `Cell` with a const initializer and no destructor, whose access
    // never allocates, never fails and never reenters the allocator.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + layout.size()));
            // SAFETY: the caller's contract, forwarded.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, forwarded (the block came from `System`).
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get() + new_size.saturating_sub(layout.size())));
            // SAFETY: the caller's contract, forwarded (the block came from `System`).
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// An error message can be as large as the heap: the error answer moves it in, where it
    /// was copied twice more (`to_string` for its line, and for the answer), ~10 ms of work for
    /// 20 MB with no check after the run's end (issue 16).
    #[test]
    fn a_huge_error_message_is_moved_into_the_answer() {
        let message = "x".repeat(8 << 20);
        let before = ALLOCATED.with(Cell::get);
        let answer = early(SandboxError::Runtime(message), "script", Instant::now());
        let allocated = ALLOCATED.with(Cell::get) - before;
        assert!(
            allocated < 1 << 20,
            "{allocated} bytes allocated to answer with an 8 MiB message"
        );
        let Term::Tuple(outer) = &answer else {
            panic!("not an error answer")
        };
        let Term::Tuple(error) = &outer[1] else {
            panic!("not an error answer")
        };
        assert!(matches!(&error[1], Term::Bin(m) if m.len() == 8 << 20));
    }
}
