//! The NIFs that run Lua: start a run, resume it after a tool call.
//!
//! A run leases a pristine slot (`slots.rs`) and executes in a coroutine of the slot's state,
//! kept in a resource so a tool call can suspend it, hand `{:tool_call, run, name, args}` to
//! Elixir, and be resumed later on any dirty scheduler. The resource belongs to the process
//! that started the run: only it may resume, and when it dies the resource is freed by the GC,
//! which hands the slot back (a restore, O(1) in the state's size).
//!
//! Every Lua API call here follows `lua_sandbox_core::protect`: what can raise runs under a
//! protected call (`protect::call` of a C function, `lua_pcall`, `lua_resume`), and what runs
//! outside one is a call that cannot raise (reads, non-allocating pushes, `lua_load`, which
//! protects itself).

use std::ffi::c_int;
use std::ptr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lua_sandbox_core::{ffi, protect, seed};
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifMap, NifResult, ResourceArc, Term, TermType};

use crate::atoms;
use crate::budget::{self, Abort, Activation, Control};
use crate::chunk::{Code, CompiledChunk};
use crate::error::{line_of, SandboxError};
use crate::handles::{self, Handles};
use crate::marshal::{self, Bounds};
use crate::output::{self, Output, PrintMode};
use crate::registry::Key;
use crate::sandbox;
use crate::slots::{self, Lease};
use crate::stack;
use crate::term::binary_term;

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

pub(crate) struct Running {
    /// The run coroutine: a thread of the leased state, kept alive on its main stack (index
    /// 1). Valid as long as the lease (the slot is restored only when the lease ends).
    pub(crate) thread: *mut ffi::lua_State,
    pub(crate) control: Box<Control>,
    pub(crate) output: Output,
    pub(crate) chunk_name: String,
    pub(crate) max_depth: usize,
    pub(crate) max_result_bytes: u64,
    pub(crate) max_tool_calls: u64,
    pub(crate) max_memory: usize,
    pub(crate) tool_calls: u64,
    pub(crate) elapsed: Duration,
    /// The tool the run is parked at (for the messages about its reply).
    pub(crate) pending_tool: String,
    /// The terms behind this run's handles (boxed: activations point at it across moves); a
    /// session call's are the session's, lent for the call.
    pub(crate) handles: Box<Handles>,
    // Last: `thread` points into this slot.
    pub(crate) home: Home,
}

/// Where a run's slot comes from, and where it goes when the run ends.
pub(crate) enum Home {
    /// A fresh run's own slot, restored from its snapshot when the run ends.
    Fresh(Lease),
    /// A session's slot, lent to one call and given back (rolled back if the call failed).
    Session(Box<dyn Lent>),
}

/// A slot lent to one run by the state that owns it (a session's `Loan`), given back when it
/// is dropped. A trait so that runs know nothing of sessions (sessions build on runs).
pub(crate) trait Lent: Send {
    fn slot(&self) -> &lua_sandbox_core::Slot;
    fn slot_mut(&mut self) -> &mut lua_sandbox_core::Slot;
    /// The run finished with a result: its changes stay.
    fn succeeded(&mut self);
    /// The instructions the run used.
    fn record(&mut self, instructions: u64);
    /// The run was a first attempt that is thrown away: roll back, count nothing.
    fn discard(&mut self);
    /// The session's handles, lent to the run, come back (before the loan is dropped).
    fn give_back_handles(&mut self, handles: Box<crate::handles::Handles>);
}

impl Home {
    fn slot(&self) -> &lua_sandbox_core::Slot {
        match self {
            Home::Fresh(lease) => lease.slot(),
            Home::Session(loan) => loan.slot(),
        }
    }

    pub(crate) fn slot_mut(&mut self) -> &mut lua_sandbox_core::Slot {
        match self {
            Home::Fresh(lease) => lease.slot_mut(),
            Home::Session(loan) => loan.slot_mut(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Home::Session(loan) = &mut self.home {
            loan.record(self.control.instructions());
            // The session's handles go back with its state (the loan, dropped next).
            loan.give_back_handles(std::mem::take(&mut self.handles));
        }
    }
}

// SAFETY: `thread` points into the leased slot's arena, which the session owns exclusively and
// which moves with it (a `Slot` is `Send`); nothing else in a session is tied to a thread. All
// access goes through `&mut Running` (taken out of the resource's mutex), so never concurrent.
unsafe impl Send for Running {}

impl Running {
    /// The main state of the run's slot.
    pub(crate) fn main(&self) -> *mut ffi::lua_State {
        self.home.slot().state()
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            max_depth: self.max_depth,
            max_bytes: self.max_result_bytes,
        }
    }
}

pub struct Run {
    owner: LocalPid,
    session: Mutex<Option<Running>>,
}

#[rustler::resource_impl]
impl rustler::Resource for Run {}

/// What a step of the run produced, as stack positions on the run coroutine.
enum Step {
    /// Finished: `n` results from absolute index `first`.
    Done { first: c_int, n: c_int },
    /// Failed with the error object at `idx`.
    Failed { idx: c_int },
    /// Yielded a tool call: `n` arguments from `first`; `keep` is the stack height to restore
    /// once they are converted.
    ToolCall {
        name: String,
        first: c_int,
        n: c_int,
        keep: c_int,
    },
}

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
        session.control.clock_start();
        let handles_ptr: *mut Handles = &mut *session.handles;
        // SAFETY: as in `start`: the box outlives every marshaling call of this NIF call.
        let _handles = unsafe { handles::Activation::new_raw(handles_ptr) };
        sandbox::clear_traceback();
        let control: *const Control = &*session.control;
        // SAFETY: the control is boxed in `session`, which outlives this block.
        let step = {
            let _active = Activation::new(unsafe { &*control }, crate::caller::of(env));
            reply_to_lua(&mut session, reply).and_then(|nargs| {
                let _out = output::Activation::new(&mut session.output);
                resume(session.thread, &session.control, nargs)
            })
        };
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

fn print_mode(opts: &RunOpts) -> PrintMode {
    print_mode_of(
        opts.print,
        opts.print_pid,
        opts.print_tag.map(|t| t.as_slice().to_vec()),
    )
}

/// The print mode from the NIF's `print` atom, `print_pid` and encoded `print_tag`.
pub(crate) fn print_mode_of(
    print: Atom,
    print_pid: Option<LocalPid>,
    print_tag: Option<Vec<u8>>,
) -> PrintMode {
    if print == atoms::send() {
        match print_pid {
            Some(pid) => PrintMode::Send(pid, print_tag),
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
    let early = |e: SandboxError| early_error(env, e, t0);
    let max_source = opts.max_source as usize;
    let (code, chunk_name) = match &source {
        Source::Text(bin) => {
            if let Err(e) = crate::chunk::check_source(bin.as_slice(), max_source, "source") {
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
    let max_memory = slots::clamp_memory(opts.max_memory);
    let lease = match slots::lease(max_memory) {
        Ok(lease) => lease,
        Err(e) => return early(e),
    };
    let control = Box::new(Control::new(opts.max_instructions));
    if let Some(ms) = opts.timeout {
        control.set_deadline(t0 + Duration::from_millis(ms));
    }
    control.clock_start();
    let mut session = Running {
        thread: ptr::null_mut(),
        control,
        output: Output::new(opts.max_output as usize, print_mode(&opts)),
        chunk_name,
        max_depth: opts.max_depth as usize,
        max_result_bytes: opts.max_result_bytes,
        max_tool_calls: opts.max_tool_calls,
        max_memory,
        tool_calls: 0,
        elapsed: Duration::ZERO,
        pending_tool: String::new(),
        handles: Box::new(Handles::new()),
        home: Home::Fresh(lease),
    };
    let handles_ptr: *mut Handles = &mut *session.handles;
    // SAFETY: the box lives in `session` until `settle` is done with it (it is dropped, or
    // parked in the resource, at the very end), after the last marshaling call.
    let _handles = unsafe { handles::Activation::new_raw(handles_ptr) };
    if fast.is_some() {
        // A first attempt streams nothing until it has succeeded.
        session.output.hold();
    }
    sandbox::clear_traceback();

    let setup = StateSetup {
        globals: &opts.globals,
        tools: &opts.tools,
        modules: &opts.modules,
        max_depth: opts.max_depth as usize,
        max_memory,
        max_source,
    };
    // The budget and the kill check cover everything below, compiling the chunk included.
    let control: *const Control = &*session.control;
    let state = session.main();
    // SAFETY: the control is boxed in `session`, which outlives the call, and the slot's state
    // outlives the control (both live in `session`).
    let prepared = unsafe {
        under_budget(env, control, state, || {
            prepare_state(session.home.slot_mut(), &setup).and_then(|()| {
                let call = opts.call.as_ref().map(|(n, a)| (n.as_str(), a.as_slice()));
                prepare_thread(&mut session, Entry::Chunk(&code), call, opts.max_source)
            })
        })
    };
    begin(env, prepared, session, t0, fast)
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
            if fast.is_some_and(|f| f.retry(&e)) {
                return retry_later(env, running);
            }
            return finish_error(env, &mut running, e, None);
        }
    };
    let step = {
        let _active = Activation::new(&running.control, crate::caller::of(env));
        let _out = output::Activation::new(&mut running.output);
        resume(running.thread, &running.control, nargs)
    };
    running.elapsed = t0.elapsed();
    if let Some(fast) = &fast {
        let retry = match &step {
            Ok(Step::ToolCall { .. }) => true,
            // Whether the result fits the attempt's bounds is known once it is converted
            // (`settle`).
            Ok(Step::Done { .. }) => false,
            Err(e) => fast.retry(
                &running
                    .control
                    .abort()
                    .map(SandboxError::from)
                    .unwrap_or_else(|| e.clone()),
            ),
            Ok(Step::Failed { .. }) => running
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
fn retry_later(env: Env<'_>, mut running: Running) -> Term<'_> {
    if let Home::Session(loan) = &mut running.home {
        loan.discard();
    }
    drop(running);
    atoms::retry().encode(env)
}

/// Runs setup work (converting globals, loading modules, compiling the chunk) under
/// `control`'s budget, kill and deadline checks, with the work ticker installed on `state`.
///
/// # Safety
/// `control` must stay valid until `f` returns, and `state` must outlive every later use of
/// `control` (as a run's slot outlives its budget).
pub(crate) unsafe fn under_budget<R>(
    env: Env,
    control: *const Control,
    state: *mut ffi::lua_State,
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: per the contract.
    let control = unsafe { &*control };
    let _active = Activation::new(control, crate::caller::of(env));
    // SAFETY: per the contract.
    unsafe { budget::install_ticker(state, control) };
    f()
}

/// The state-wide part of a run's setup: what `globals:`, `tools:` and `modules:` put into a
/// pristine state (once per run, or once per session).
pub(crate) struct StateSetup<'s, 'a> {
    pub globals: &'s [(String, Term<'a>)],
    pub tools: &'s [String],
    pub modules: &'s [(String, Term<'a>)],
    pub max_depth: usize,
    pub max_memory: usize,
    pub max_source: usize,
}

/// Gives a pristine state a fresh random seed, the globals, the tools and the modules. Runs
/// under the memory limit (lifted only while terms are converted, which checks it itself)
/// and, for charging, under the caller's budget activation.
pub(crate) fn prepare_state(
    slot: &mut lua_sandbox_core::Slot,
    setup: &StateSetup,
) -> Result<(), SandboxError> {
    let l = slot.state();
    // SAFETY: the state is pristine and not running, its main stack empty.
    unsafe { seed::reseed(l) }.map_err(|e| SandboxError::Runtime(e.message))?;
    if !setup.globals.is_empty() {
        slot.set_limit(usize::MAX);
        // SAFETY: `l` is not running; the limit is lifted (marshal's contract).
        let pushed =
            unsafe { marshal::push_globals(l, setup.globals, setup.max_depth, setup.max_memory) };
        slot.set_limit(setup.max_memory);
        pushed?;
    }
    slot.set_limit(setup.max_memory);
    if !setup.tools.is_empty() {
        let mut names: &[String] = setup.tools;
        // SAFETY: `make_tools` follows the raising discipline and only borrows `names`.
        unsafe { protect::call(l, make_tools, (&mut names as *mut &[String]).cast()) }
            .map_err(|e| SandboxError::Runtime(e.message))?;
    }
    if !setup.modules.is_empty() {
        load_modules(l, setup.modules, setup.max_source)?;
    }
    Ok(())
}

/// What the run coroutine runs first: a chunk, or nothing (a session's `call`).
pub(crate) enum Entry<'c> {
    Chunk(&'c Code<'c>),
    Nothing,
}

/// Creates the run coroutine on a state whose main stack is empty: the prelude's runner with
/// the entry chunk and the optional `call:` function name and arguments, `configure`d as
/// the run's main thread, with the ticker installed. Returns how many arguments the first
/// resume passes.
pub(crate) fn prepare_thread(
    running: &mut Running,
    entry: Entry,
    call: Option<(&str, &[Term])>,
    max_source: u64,
) -> Result<c_int, SandboxError> {
    let l = running.main();
    // SAFETY: the state is not running and its main stack is empty, so the new thread lands
    // at index 1, where it stays referenced for the run's life.
    unsafe {
        ffi::lua_settop(l, 0);
        sandbox::set_json_depth(l, running.max_depth);
        protect::call(l, new_thread, ptr::null_mut()).map_err(|_| SandboxError::MemoryLimit)?;
        running.thread = ffi::lua_tothread(l, 1);
    }
    let limit = running.max_memory;
    let max_depth = running.max_depth;
    let call_values = match call {
        None => 0,
        Some((name, args)) => {
            running.home.slot_mut().set_limit(usize::MAX);
            // SAFETY: `l` is not running; the limit is lifted (marshal's contract).
            let pushed = unsafe {
                push_string(l, name.as_bytes(), limit).and_then(|()| {
                    marshal::push_values(l, args, max_depth, "call.args", limit).map(|n| n + 1)
                })
            };
            running.home.slot_mut().set_limit(limit);
            pushed?
        }
    };

    let thread = running.thread;
    // SAFETY: the thread is fresh (not started) with LUA_MINSTACK free slots; `lua_rawgetp`
    // reads the registry without allocating, and pushing a C function does not allocate;
    // `Code::load` does not raise; `lua_xmove` moves values already built, after
    // `lua_checkstack` made room (which does not raise either).
    unsafe {
        ffi::lua_rawgetp(thread, ffi::LUA_REGISTRYINDEX, Key::Runner.ptr());
        match entry {
            Entry::Chunk(code) => code.load(thread)?,
            Entry::Nothing => ffi::lua_pushcfunction(thread, nothing),
        }
        if call_values > 0 {
            if ffi::lua_checkstack(thread, call_values + 4) == 0 {
                return Err(SandboxError::InvalidInput(
                    "call: has more arguments than the Lua stack allows".to_string(),
                ));
            }
            ffi::lua_xmove(l, thread, call_values);
        }
        // configure(run_coroutine, max_source)
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::Configure.ptr());
        ffi::lua_pushvalue(l, 1);
        ffi::lua_pushinteger(l, max_source.min(i64::MAX as u64) as i64);
        if ffi::lua_pcall(l, 2, 0, 0) != ffi::LUA_OK {
            let message = protect::describe(l, -1);
            ffi::lua_pop(l, 1);
            return Err(SandboxError::Runtime(message));
        }
    }
    // SAFETY: the run coroutine's state outlives the run's control (both live in `running`).
    unsafe { budget::install_ticker(thread, &running.control) };
    Ok(1 + call_values)
}

/// The chunk of a call that only calls a function.
unsafe extern "C-unwind" fn nothing(_l: *mut ffi::lua_State) -> c_int {
    0
}

/// Pushes a string with the memory limit lifted, under the backstop. The lifted limit is
/// the run's `limit` (0: none) all the same: a string that would take the heap past it is
/// refused before it is built (:memory_limit), as the marshal builder refuses values.
///
/// # Safety
/// `l` must not be running, and its limit must be lifted.
unsafe fn push_string(
    l: *mut ffi::lua_State,
    bytes: &[u8],
    limit: usize,
) -> Result<(), SandboxError> {
    if limit > 0 && marshal::used_memory(l).saturating_add(bytes.len()) > limit {
        return Err(SandboxError::MemoryLimit);
    }
    // SAFETY: pushing a string can only raise on allocation failure, which the lifted limit
    // rules out; the backstop's results (the string) stay on `l`.
    unsafe {
        protect::call_backstop(l, &mut |l| {
            ffi::lua_pushlstring(l, bytes.as_ptr().cast(), bytes.len());
        })
    }
    .map_err(|_| SandboxError::MemoryLimit)
}

/// `lua_newthread` under a protected call: the new thread is the result.
unsafe extern "C-unwind" fn new_thread(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: may raise (memory) with no Rust value alive.
    unsafe {
        ffi::lua_settop(l, 0);
        ffi::lua_newthread(l);
    }
    1
}

/// `make_tools(names)`: argument 1 points at the `&[String]` of tool names.
unsafe extern "C-unwind" fn make_tools(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: the names are borrowed (no destructor runs here); the pushes may raise with
    // only the slice iterator (no Drop) alive.
    unsafe {
        let names: &[String] = *ffi::lua_touserdata(l, 1).cast::<&[String]>();
        ffi::lua_settop(l, 0);
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::MakeTools.ptr());
        ffi::lua_createtable(l, names.len().min(i32::MAX as usize) as c_int, 0);
        for (i, name) in names.iter().enumerate() {
            ffi::lua_pushlstring(l, name.as_ptr().cast(), name.len());
            ffi::lua_rawseti(l, -2, i as ffi::lua_Integer + 1);
        }
        ffi::lua_call(l, 1, 0);
    }
    0
}

/// One module for `make_require`: its name and its loaded function's chunk.
struct ModuleCode<'a> {
    name: &'a str,
    code: Code<'a>,
}

/// What `make_require` receives: the modules, and where it reports a load failure.
struct Modules<'a> {
    modules: &'a [ModuleCode<'a>],
    failed: Option<(usize, SandboxError)>,
}

/// A module's source as the NIF received it.
enum ModuleSource<'a> {
    Text(rustler::Binary<'a>),
    Chunk(ResourceArc<CompiledChunk>),
}

fn load_modules(
    l: *mut ffi::lua_State,
    modules: &[(String, Term)],
    max_source: usize,
) -> Result<(), SandboxError> {
    let mut sources = Vec::with_capacity(modules.len());
    for (name, term) in modules {
        let source = if term.get_type() == TermType::Binary {
            let bin: rustler::Binary = term.decode().map_err(|_| bad_module(name))?;
            crate::chunk::check_source(bin.as_slice(), max_source, &format!("module '{name}'"))?;
            ModuleSource::Text(bin)
        } else {
            ModuleSource::Chunk(term.decode().map_err(|_| bad_module(name))?)
        };
        sources.push((name.as_str(), source));
    }
    let modules = sources
        .iter()
        .map(|(name, source)| {
            let code = match source {
                ModuleSource::Text(bin) => Code::new(bin.as_slice(), name, false)?,
                ModuleSource::Chunk(chunk) => Code::new(&chunk.bytecode, &chunk.name, true)?,
            };
            Ok(ModuleCode { name, code })
        })
        .collect::<Result<Vec<_>, SandboxError>>()?;
    let mut req = Modules {
        modules: &modules,
        failed: None,
    };
    // SAFETY: `make_require` follows the raising discipline; `req` outlives the call.
    let r = unsafe { protect::call(l, make_require, (&mut req as *mut Modules).cast()) };
    if let Some((_, e)) = req.failed.take() {
        return Err(e);
    }
    r.map_err(|e| SandboxError::Runtime(e.message))
}

/// `make_require(loaders)` with every module loaded (argument 1 points at a `Modules`).
unsafe extern "C-unwind" fn make_require(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: the modules are borrowed; `Code::load` does not raise and the error it returns
    // is moved into `req.failed` before anything raises; the other calls may raise (memory)
    // with no Rust value with a destructor alive.
    unsafe {
        let req = &mut *ffi::lua_touserdata(l, 1).cast::<Modules>();
        ffi::lua_settop(l, 0);
        ffi::lua_rawgetp(l, ffi::LUA_REGISTRYINDEX, Key::MakeRequire.ptr());
        ffi::lua_createtable(l, 0, req.modules.len().min(i32::MAX as usize) as c_int);
        for (i, module) in req.modules.iter().enumerate() {
            ffi::lua_pushlstring(l, module.name.as_ptr().cast(), module.name.len());
            if let Err(e) = module.code.load(l) {
                req.failed = Some((i, e));
                return 0;
            }
            ffi::lua_rawset(l, -3);
        }
        ffi::lua_call(l, 1, 0);
    }
    0
}

fn bad_module(name: &str) -> SandboxError {
    SandboxError::InvalidInput(format!(
        "module '{name}' must be Lua source or a compiled chunk"
    ))
}

/// Resumes the run coroutine once with the `nargs` values on top of its stack and classifies
/// what came back.
fn resume(
    thread: *mut ffi::lua_State,
    control: &Control,
    nargs: c_int,
) -> Result<Step, SandboxError> {
    // The deadline may have passed before the script gets to a check of its own: while a
    // tool ran, or while the state was prepared.
    budget::check_now()?;
    let mut nres: c_int = 0;
    // SAFETY: `thread` is the run coroutine (fresh or suspended at a yield) with its
    // arguments on top; `lua_resume` is a protected entry into Lua.
    let status = unsafe { ffi::lua_resume(thread, ptr::null_mut(), nargs, &mut nres) };
    budget::settle_instructions(thread, control);
    if let Some(why) = control.abort() {
        return Err(why.into());
    }
    // SAFETY: after `lua_resume`, the `nres` results (or the error object) are on top of the
    // thread's stack; only reads and a `lua_rawgetp` (no allocation) with room checked.
    unsafe {
        let top = ffi::lua_gettop(thread);
        match status {
            ffi::LUA_YIELD => {
                let base = top - nres + 1;
                if ffi::lua_checkstack(thread, 2) == 0 {
                    return Err(SandboxError::Runtime("Lua stack exhausted".to_string()));
                }
                ffi::lua_rawgetp(thread, ffi::LUA_REGISTRYINDEX, Key::ToolMarker.ptr());
                let is_tool = nres >= 2 && ffi::lua_rawequal(thread, base, -1) != 0;
                ffi::lua_pop(thread, 1);
                if !is_tool {
                    return Err(SandboxError::Runtime(
                        "attempt to yield from outside a coroutine".to_string(),
                    ));
                }
                let name = protect::describe(thread, base + 1);
                Ok(Step::ToolCall {
                    name,
                    first: base + 2,
                    n: nres - 2,
                    keep: base - 1,
                })
            }
            ffi::LUA_OK => {
                let base = top - nres + 1;
                if nres >= 1 && ffi::lua_toboolean(thread, base) != 0 {
                    return Ok(Step::Done {
                        first: base + 1,
                        n: nres - 1,
                    });
                }
                if nres < 2 {
                    return Err(SandboxError::Runtime(
                        "(error object is a nil value)".to_string(),
                    ));
                }
                if is_memory_error(thread, base + 1) {
                    return Err(SandboxError::MemoryLimit);
                }
                Ok(Step::Failed { idx: base + 1 })
            }
            ffi::LUA_ERRMEM => Err(SandboxError::MemoryLimit),
            _ => {
                if top >= 1 && is_memory_error(thread, top) {
                    return Err(SandboxError::MemoryLimit);
                }
                Ok(Step::Failed { idx: top })
            }
        }
    }
}

/// Whether stack slot `idx` holds Lua's out-of-memory message.
///
/// # Safety
/// `idx` must be a valid index of `l`.
unsafe fn is_memory_error(l: *mut ffi::lua_State, idx: c_int) -> bool {
    // SAFETY: per the contract; `describe` only reads.
    unsafe {
        ffi::lua_type(l, idx) == ffi::LUA_TSTRING
            && protect::describe(l, idx) == "not enough memory"
    }
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
    let control: *const Control = &*session.control;
    // SAFETY: the control is boxed in `session`, which lives until the end of this function
    // (dropped, or parked in the resource); the activation ends before that.
    let _active = Activation::new(unsafe { &*control }, crate::caller::of(env));
    output::flush(&mut session.output, env);
    let thread = session.thread;
    let answer = settle_step(env, &mut session, step, thread, fast);
    session.control.clock_stop();
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
    ToolCall(Term<'a>, Vec<Term<'a>>),
    /// A first attempt's result is over the attempt's bounds: run it again (`run_try`).
    Retry,
}

fn settle_step<'a>(
    env: Env<'a>,
    session: &mut Running,
    mut step: Result<Step, SandboxError>,
    thread: *mut ffi::lua_State,
    fast: Option<Fast>,
) -> Answer<'a> {
    // A tool call whose arguments the host refuses (`marshal::ArgsError::Refused`) raises a
    // Lua error where the script called the tool, and the run goes on to its next stop.
    loop {
        match settle_once(env, session, step, thread, fast) {
            Settled::Answer(answer) => return answer,
            Settled::Refused(message) => {
                let t0 = Instant::now();
                step = refuse_tool_call(session, &message);
                session.elapsed += t0.elapsed();
                output::flush(&mut session.output, env);
            }
        }
    }
}

enum Settled<'a> {
    Answer(Answer<'a>),
    /// The tool call's arguments were refused: this message is raised in Lua.
    Refused(String),
}

/// Resumes the run coroutine, suspended at a tool call, with the tool's failure `message`
/// (raised where the script called the tool, like a tool's own error) and runs it to its next
/// stop.
fn refuse_tool_call(session: &mut Running, message: &str) -> Result<Step, SandboxError> {
    let name = &session.pending_tool;
    let message = format!("tool '{name}': {message}");
    let (l, thread, limit) = (session.main(), session.thread, session.max_memory);
    session.home.slot_mut().set_limit(usize::MAX);
    // SAFETY: the main state is not running (the thread is suspended at its yield) and its
    // limit is lifted; the message is built on the main stack and moved to the thread after
    // room is checked; `lua_pushboolean` does not allocate.
    let pushed = unsafe {
        if ffi::lua_checkstack(thread, 2) == 0 {
            Err(SandboxError::Runtime("Lua stack exhausted".to_string()))
        } else {
            push_string(l, message.as_bytes(), limit).map(|()| {
                ffi::lua_pushboolean(thread, 0);
                ffi::lua_xmove(l, thread, 1);
            })
        }
    };
    session.home.slot_mut().set_limit(limit);
    pushed?;
    let _out = output::Activation::new(&mut session.output);
    resume(session.thread, &session.control, 2)
}

fn settle_once<'a>(
    env: Env<'a>,
    session: &mut Running,
    step: Result<Step, SandboxError>,
    thread: *mut ffi::lua_State,
    fast: Option<Fast>,
) -> Settled<'a> {
    Settled::Answer(Answer::Final(match step {
        Err(e) => finish_error(env, session, e, None),
        Ok(Step::Failed { idx }) => {
            // SAFETY: `idx` is the error object's slot on the finished thread.
            let message = unsafe { protect::describe(thread, idx) };
            finish_error(env, session, SandboxError::Runtime(message), Some(idx))
        }
        Ok(Step::Done { first, n }) => {
            // SAFETY: the results are on the finished thread's stack at `first..first + n`.
            let terms =
                unsafe { marshal::to_terms(env, thread, first, n, session.bounds(), "result") };
            match terms {
                Ok(terms) => {
                    if let Home::Session(loan) = &mut session.home {
                        loan.succeeded();
                    }
                    session.output.release(env);
                    let output = session.output.take();
                    let stats = stats_term(env, session);
                    (atoms::ok(), terms, binary_term(env, &output), stats).encode(env)
                }
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
            session.tool_calls += 1;
            if session.tool_calls > session.max_tool_calls {
                session.control.set_abort(Abort::ToolCalls);
                return Settled::Answer(Answer::Final(finish_error(
                    env,
                    session,
                    SandboxError::ToolLimit,
                    None,
                )));
            }
            let root = format!("tools.{name}");
            session.pending_tool.clone_from(&name);
            // SAFETY: the arguments are on the suspended thread at `first..first + n`; then
            // the yielded values are popped, so the next resume finds only its arguments.
            let terms =
                unsafe { marshal::tool_args(env, thread, first, n, session.bounds(), &root) };
            // SAFETY: `keep` is below the yielded values on the suspended thread.
            unsafe { ffi::lua_settop(thread, keep) };
            match terms {
                Err(marshal::ArgsError::Refused(message)) => return Settled::Refused(message),
                Err(marshal::ArgsError::Fatal(e)) => finish_error(env, session, e, None),
                Ok(terms) => {
                    return Settled::Answer(Answer::ToolCall(
                        binary_term(env, name.as_bytes()),
                        terms,
                    ))
                }
            }
        }
    }))
}

/// Elixir's answer to a tool call, pushed onto the suspended run coroutine as the values the
/// tool function sees. Returns how many.
fn reply_to_lua(session: &mut Running, reply: Term) -> Result<c_int, SandboxError> {
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
    let l = session.main();
    let thread = session.thread;
    let max_depth = session.max_depth;
    let limit = session.max_memory;
    session.home.slot_mut().set_limit(usize::MAX);
    let built = (|| -> Result<c_int, SandboxError> {
        // SAFETY: the main state is not running (the thread is suspended at its yield) and
        // its limit is lifted; values are built on the main stack and moved to the thread
        // after room is checked. `lua_push{boolean,nil}` do not allocate.
        unsafe {
            if ffi::lua_checkstack(thread, 4) == 0 {
                return Err(SandboxError::Runtime("Lua stack exhausted".to_string()));
            }
            if tag == atoms::ok() {
                match marshal::push_values(l, &[payload], max_depth, "tool result", limit) {
                    Ok(n) => {
                        ffi::lua_pushboolean(thread, 1);
                        ffi::lua_xmove(l, thread, n);
                        Ok(1 + n)
                    }
                    // A value that has no Lua form (a struct without an Encoder, a pid, a
                    // tuple): the tool's fault, not the script's, and nothing was built
                    // (`push_values` leaves the stack as it was): a Lua error the script can
                    // catch, raised where it called the tool. Limits still end the run.
                    Err(SandboxError::InvalidInput(what)) => {
                        let name = &session.pending_tool;
                        push_string(l, format!("tool '{name}': {what}").as_bytes(), limit)?;
                        ffi::lua_pushboolean(thread, 0);
                        ffi::lua_xmove(l, thread, 1);
                        Ok(2)
                    }
                    Err(e) => Err(e),
                }
            } else {
                let msg: rustler::Binary = payload
                    .decode()
                    .map_err(|_| SandboxError::InvalidInput("bad tool error".to_string()))?;
                push_string(l, msg.as_slice(), limit)?;
                if tag == atoms::error() {
                    ffi::lua_pushboolean(thread, 1);
                    ffi::lua_pushnil(thread);
                    ffi::lua_xmove(l, thread, 1);
                    Ok(3)
                } else {
                    ffi::lua_pushboolean(thread, 0);
                    ffi::lua_xmove(l, thread, 1);
                    Ok(2)
                }
            }
        }
    })();
    session.home.slot_mut().set_limit(limit);
    built
}

fn stats_term<'a>(env: Env<'a>, session: &Running) -> Term<'a> {
    let control = &session.control;
    control.note_memory(session.home.slot().peak());
    stats_map(
        env,
        [
            control.instructions(),
            control.memory_peak() as u64,
            session.elapsed.as_micros() as u64,
            session.tool_calls,
            control.cpu_time().as_micros() as u64,
        ],
        &control.denied(),
    )
}

/// `%{instructions:, memory_peak:, duration_us:, tool_calls:, cpu_us:, denied:}` from values
/// in that order and the denied capabilities (`%{name => count}`).
fn stats_map<'a>(env: Env<'a>, values: [u64; 5], denied: &[(String, u64)]) -> Term<'a> {
    let names: Vec<Term> = denied.iter().map(|(n, _)| n.encode(env)).collect();
    let counts: Vec<Term> = denied.iter().map(|(_, c)| c.encode(env)).collect();
    let denied = Term::map_from_arrays(env, &names, &counts).unwrap_or_else(|_| Term::map_new(env));
    let keys = [
        atoms::instructions().encode(env),
        atoms::memory_peak().encode(env),
        atoms::duration_us().encode(env),
        atoms::tool_calls().encode(env),
        atoms::cpu_us().encode(env),
        atoms::denied().encode(env),
    ];
    let values = values.map(|v| v.encode(env));
    let values = [
        values[0], values[1], values[2], values[3], values[4], denied,
    ];
    Term::map_from_arrays(env, &keys, &values).unwrap_or_else(|_| atoms::nil().encode(env))
}

/// The error answer; `value_idx` is the error object's slot on the run coroutine, if any.
fn finish_error<'a>(
    env: Env<'a>,
    session: &mut Running,
    e: SandboxError,
    value_idx: Option<c_int>,
) -> Term<'a> {
    let e = session.control.abort().map(SandboxError::from).unwrap_or(e);
    let message = e.to_string();
    let line = line_of(&message, &session.chunk_name);
    let traceback = if matches!(e, SandboxError::Runtime(_)) {
        sandbox::take_traceback()
    } else {
        None
    };
    // A non-string error object travels as a value, bounded like any result.
    let value_term = match value_idx {
        Some(idx) if matches!(e, SandboxError::Runtime(_)) => {
            // SAFETY: `idx` is a valid slot of the finished thread; reading never raises.
            let t = unsafe { ffi::lua_type(session.thread, idx) };
            if t == ffi::LUA_TNIL || t == ffi::LUA_TSTRING {
                atoms::nil().encode(env)
            } else {
                let bounds = Bounds {
                    max_depth: 64,
                    max_bytes: 1 << 20,
                };
                // SAFETY: as above.
                unsafe { marshal::to_term(env, session.thread, idx, bounds, "error") }
                    .unwrap_or_else(|_| atoms::nil().encode(env))
            }
        }
        _ => atoms::nil().encode(env),
    };
    // A first attempt's held chunks go out with its (final) error.
    session.output.release(env);
    let output = session.output.take();
    let stats = stats_term(env, session);
    (
        atoms::error(),
        (e.kind(), message, line, traceback, value_term),
        binary_term(env, &output),
        stats,
    )
        .encode(env)
}

pub(crate) fn early_error(env: Env<'_>, e: SandboxError, t0: Instant) -> Term<'_> {
    let stats = stats_map(env, [0, 0, t0.elapsed().as_micros() as u64, 0, 0], &[]);
    let none: Option<String> = None;
    (
        atoms::error(),
        (e.kind(), e.to_string(), none.clone(), none, atoms::nil()),
        binary_term(env, b""),
        stats,
    )
        .encode(env)
}
