//! The run coroutine: one way to assemble a run (fresh or a session call), set up its state,
//! step it, suspend it at a tool call and resume it with the tool's reply, and classify how it
//! ended (memory errors included). No values cross here: the embedder converts its own values
//! into Lua through [`Push`] callbacks and reads results from the stack positions a [`Step`]
//! gives (the NIF marshals terms; a worker binary would read its own format).
//!
//! A run owns its [`Scope`] (budget, output, handle store, traceback) and its slot ([`Home`]);
//! every function here that runs Lua or converts values activates the scope for the given
//! [`Caller`], so work is charged, killed and timed out like the script's own.
//!
//! Every Lua API call here follows `crate::protect`: what can raise runs under a protected call
//! (`protect::call` of a C function, `lua_pcall`, `lua_resume`), and what runs outside one is a
//! call that cannot raise (reads, non-allocating pushes, `lua_load`, which protects itself).

use std::any::Any;
use std::ffi::c_int;
use std::ptr;
use std::time::{Duration, Instant};

use crate::budget;
use crate::chunk::Code;
use crate::control::{Abort, Caller, Control};
use crate::error::SandboxError;
use crate::output::{Output, Print};
use crate::pool::Lease;
use crate::registry::Key;
use crate::scope::Scope;
use crate::{ffi, protect, sandbox, seed, Slot};

/// A run's limits (the embedder validated and defaulted them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_instructions: u64,
    /// Heap bytes (already clamped, see `pool::clamp_memory`).
    pub max_memory: usize,
    /// Nesting of values converted either way (and of `json`).
    pub max_depth: usize,
    pub max_result_bytes: u64,
    pub max_output: usize,
    /// Bytes of source, of each module and of each chunk given to `load`.
    pub max_source: usize,
    pub max_tool_calls: u64,
    /// From the start of the run to its deadline.
    pub timeout: Option<Duration>,
}

impl Limits {
    /// The bounds of a run's results and tool arguments (Lua -> terms).
    pub fn bounds(&self) -> crate::marshal::Bounds {
        crate::marshal::Bounds {
            max_depth: self.max_depth,
            max_bytes: self.max_result_bytes,
        }
    }
}

/// Values the embedder converts into Lua: called with a state that is not running, whose memory
/// limit is lifted (so nothing it pushes raises), and the run's limit in bytes (0: none), which
/// it must check itself. It leaves its values on the stack and returns how many, or sets
/// globals and returns 0; on an error it leaves the stack as it found it.
pub type Push<'p> = &'p mut dyn FnMut(*mut ffi::lua_State, usize) -> Result<c_int, SandboxError>;

/// A module `require` can load: its name and its chunk.
pub struct Module<'a> {
    pub name: &'a str,
    pub code: Code<'a>,
}

/// What a state gets once, before the first run in it (every fresh run; a session's creation).
pub struct StateSetup<'s> {
    /// Sets the `globals:` (returns 0).
    pub globals: Option<Push<'s>>,
    pub tools: &'s [String],
    pub modules: &'s [Module<'s>],
}

/// What the run coroutine runs first: a chunk, or nothing (a session's `call`).
pub enum Entry<'c> {
    Chunk(&'c Code<'c>),
    Nothing,
}

/// The setup of one run, fresh or a session call (assembled by [`Run::prepare`]).
pub struct Setup<'s> {
    /// The state-wide setup: a fresh run's; `None` for a session call (done at creation).
    pub state: Option<StateSetup<'s>>,
    /// A session call's own `globals:` (part of the call: rolled back with it).
    pub call_globals: Option<Push<'s>>,
    pub entry: Entry<'s>,
    /// `call:`: the global function to call after the entry, and its arguments.
    pub call: Option<(&'s str, Push<'s>)>,
}

/// What a step of the run produced, as stack positions on the run coroutine ([`Run::thread`]).
#[derive(Debug)]
pub enum Step {
    /// Finished: `n` results from absolute index `first`.
    Done { first: c_int, n: c_int },
    /// Failed with the error object at `idx`.
    Failed { idx: c_int },
    /// Suspended at a tool call: `n` arguments from `first`. Read them, then call
    /// [`Run::take_tool_args`] before replying.
    ToolCall {
        name: String,
        first: c_int,
        n: c_int,
        keep: c_int,
    },
}

/// A tool's answer, given back to the suspended run ([`Run::reply`]).
pub enum Reply<'p> {
    /// The tool returned values: the call returns them. A value with no Lua form
    /// (`InvalidInput`) is the tool's fault: a Lua error the script can catch.
    Values(Push<'p>),
    /// The tool failed softly: the call returns `nil, message`.
    Error(&'p [u8]),
    /// The tool raised: the call raises `message` where the script called it.
    Raise(&'p [u8]),
    /// The embedder refused the call's arguments (a userdata that is not one of the run's
    /// handles): the call raises "tool 'NAME': MESSAGE" where the script called it, and the
    /// run goes on.
    Refused(&'p str),
}

/// What a run reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub instructions: u64,
    pub memory_peak: u64,
    pub duration_us: u64,
    pub tool_calls: u64,
    pub cpu_us: u64,
    /// The capabilities the script was denied, by name, with how often (`stats.denied`).
    pub denied: Vec<(String, u64)>,
}

/// Where a run's slot comes from, and where it goes when the run ends.
pub enum Home {
    /// A fresh run's own slot, restored from its snapshot when the run ends.
    Fresh(Lease),
    /// A session's slot, lent to one call and given back (rolled back if the call failed).
    Session(Box<dyn Lent>),
}

/// A slot lent to one run by the state that owns it (a session's `Loan`), given back when it
/// is dropped. A trait so that runs know nothing of sessions (sessions build on runs).
pub trait Lent: Send {
    fn slot(&self) -> &Slot;
    fn slot_mut(&mut self) -> &mut Slot;
    /// The run finished with a result: its changes stay.
    fn succeeded(&mut self);
    /// The instructions the run used.
    fn record(&mut self, instructions: u64);
    /// The run was a first attempt that is thrown away: roll back, count nothing.
    fn discard(&mut self);
    /// The session's handles, lent to the run, come back (before the loan is dropped).
    fn give_back_handles(&mut self, handles: Box<dyn Any + Send>);
}

impl Home {
    pub fn slot(&self) -> &Slot {
        match self {
            Home::Fresh(lease) => lease.slot(),
            Home::Session(loan) => loan.slot(),
        }
    }

    pub fn slot_mut(&mut self) -> &mut Slot {
        match self {
            Home::Fresh(lease) => lease.slot_mut(),
            Home::Session(loan) => loan.slot_mut(),
        }
    }
}

/// One run: its coroutine, scope, limits and slot.
pub struct Run {
    /// The run coroutine: a thread of the state, kept alive on its main stack (index 1).
    /// Valid as long as `home` (the slot is restored only when the run ends).
    thread: *mut ffi::lua_State,
    /// The run's budget, output, handle store and traceback (boxed: an activation points at
    /// it across moves of the run).
    pub scope: Box<Scope>,
    pub chunk_name: String,
    pub limits: Limits,
    pub tool_calls: u64,
    /// Time spent in the run's steps so far.
    pub elapsed: Duration,
    /// The tool the run is parked at (for the messages about its reply).
    pub pending_tool: String,
    // Last: `thread` points into this slot.
    pub home: Home,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Home::Session(loan) = &mut self.home {
            loan.record(self.scope.control.instructions());
            // The session's handles go back with its state (the loan, dropped next).
            if let Some(handles) = self.scope.take_handles() {
                loan.give_back_handles(handles);
            }
        }
    }
}

// SAFETY: `thread` points into the slot's arena, which the run owns exclusively (its lease, or
// its session's loan) and which moves with it (a `Slot` is `Send`); nothing else in a run is
// tied to a thread. All access goes through `&mut Run`, so never concurrent.
unsafe impl Send for Run {}

impl Run {
    /// The one way to assemble a run, fresh (`Home::Fresh`) or a session call
    /// (`Home::Session`): its budget (with the deadline counted from `t0`), its output, the
    /// handle store lent to it. Nothing runs yet: see [`Run::prepare`].
    pub fn new(
        home: Home,
        limits: Limits,
        print: Print,
        chunk_name: String,
        handles: Option<Box<dyn Any + Send>>,
        t0: Instant,
    ) -> Run {
        let control = Control::new(limits.max_instructions);
        if let Some(timeout) = limits.timeout {
            control.set_deadline(t0 + timeout);
        }
        control.clock_start();
        let scope = Box::new(Scope::new(control, Output::new(limits.max_output, print)));
        if let Some(handles) = handles {
            scope.set_handles(handles);
        }
        Run {
            thread: ptr::null_mut(),
            scope,
            chunk_name,
            limits,
            tool_calls: 0,
            elapsed: Duration::ZERO,
            pending_tool: String::new(),
            home,
        }
    }

    /// The main state of the run's slot.
    pub fn main(&self) -> *mut ffi::lua_State {
        self.home.slot().state()
    }

    /// The run coroutine (null before [`Run::prepare`] succeeded).
    pub fn thread(&self) -> *mut ffi::lua_State {
        self.thread
    }

    /// Sets the run up: the state-wide setup (a fresh run), the call's globals (a session
    /// call), then the run coroutine with its entry and `call:`. Runs under the run's budget,
    /// kill and deadline checks (compiling the chunk included). Returns how many values the
    /// first [`Run::resume`] passes.
    pub fn prepare(&mut self, caller: Caller, setup: Setup) -> Result<c_int, SandboxError> {
        let Setup {
            state,
            call_globals,
            entry,
            call,
        } = setup;
        let scope: *const Scope = &*self.scope;
        let l = self.main();
        // SAFETY: the scope is boxed in `self`, which outlives the call, and the slot's state
        // outlives the scope's later uses (both live in `self`).
        unsafe {
            under_scope(scope, caller, l, || {
                let max_memory = self.limits.max_memory;
                if let Some(state) = state {
                    prepare_state(self.home.slot_mut(), state, max_memory)?;
                }
                if let Some(globals) = call_globals {
                    with_lifted_limit(self.home.slot_mut(), max_memory, globals)?;
                }
                self.prepare_thread(entry, call)
            })
        }
    }

    /// Creates the run coroutine on a state whose main stack is empty: the prelude's runner
    /// with the entry chunk and the optional `call:` function name and arguments,
    /// `configure`d as the run's main thread, with the ticker installed. Returns how many
    /// arguments the first resume passes.
    fn prepare_thread(
        &mut self,
        entry: Entry,
        call: Option<(&str, Push)>,
    ) -> Result<c_int, SandboxError> {
        let l = self.main();
        // SAFETY: the state is not running and its main stack is empty, so the new thread
        // lands at index 1, where it stays referenced for the run's life.
        unsafe {
            ffi::lua_settop(l, 0);
            sandbox::set_json_depth(l, self.limits.max_depth);
            protect::call(l, new_thread, ptr::null_mut()).map_err(|_| SandboxError::MemoryLimit)?;
            self.thread = ffi::lua_tothread(l, 1);
        }
        let limit = self.limits.max_memory;
        let call_values = match call {
            None => 0,
            Some((name, args)) => {
                let mut push = |l: *mut ffi::lua_State, limit: usize| {
                    // SAFETY: `l` is not running; the limit is lifted (`with_lifted_limit`).
                    unsafe { push_string(l, name.as_bytes(), limit) }?;
                    match args(l, limit) {
                        Ok(n) => Ok(n + 1),
                        Err(e) => {
                            // SAFETY: pops the name pushed above.
                            unsafe { ffi::lua_pop(l, 1) };
                            Err(e)
                        }
                    }
                };
                with_lifted_limit(self.home.slot_mut(), limit, &mut push)?
            }
        };

        let thread = self.thread;
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
            ffi::lua_pushinteger(l, self.limits.max_source.min(i64::MAX as usize) as i64);
            if ffi::lua_pcall(l, 2, 0, 0) != ffi::LUA_OK {
                let message = protect::describe(l, -1);
                ffi::lua_pop(l, 1);
                return Err(SandboxError::Runtime(message));
            }
        }
        // SAFETY: the run coroutine's state outlives the run's control (both live in `self`).
        unsafe { budget::install_ticker(thread, &self.scope.control) };
        Ok(1 + call_values)
    }

    /// Resumes the run coroutine with the `nargs` values on top of its stack (the first resume,
    /// or after [`Run::reply`]) and classifies what came back. A tool call over
    /// `max_tool_calls` ends the run (`ToolLimit`, sticky).
    pub fn resume(&mut self, caller: Caller, nargs: c_int) -> Result<Step, SandboxError> {
        let step = {
            let _active = self.scope.activate(caller);
            resume_thread(self.thread, &self.scope.control, nargs)
        };
        if let Ok(Step::ToolCall { name, .. }) = &step {
            self.tool_calls += 1;
            if self.tool_calls > self.limits.max_tool_calls {
                self.scope.control.set_abort(Abort::ToolCalls);
                return Err(SandboxError::ToolLimit);
            }
            self.pending_tool.clone_from(name);
        }
        step
    }

    /// Pops a tool call's yielded values once the embedder has read them (`keep` from the
    /// [`Step::ToolCall`]), so the next resume finds only the reply.
    pub fn take_tool_args(&mut self, keep: c_int) {
        // SAFETY: `keep` is below the yielded values on the suspended thread.
        unsafe { ffi::lua_settop(self.thread, keep) };
    }

    /// Gives a tool's reply to the run parked at a tool call: the values the tool call returns
    /// (or raises) are pushed onto the run coroutine. Returns how many, for [`Run::resume`].
    pub fn reply(&mut self, caller: Caller, reply: Reply) -> Result<c_int, SandboxError> {
        let _active = self.scope.activate(caller);
        let l = self.main();
        let thread = self.thread;
        let limit = self.limits.max_memory;
        self.home.slot_mut().set_limit(usize::MAX);
        let built = (|| -> Result<c_int, SandboxError> {
            // SAFETY: the main state is not running (the thread is suspended at its yield) and
            // its limit is lifted; values are built on the main stack and moved to the thread
            // after room is checked. `lua_push{boolean,nil}` do not allocate.
            unsafe {
                if ffi::lua_checkstack(thread, 4) == 0 {
                    return Err(SandboxError::Runtime("Lua stack exhausted".to_string()));
                }
                match reply {
                    Reply::Values(push) => match push(l, limit) {
                        Ok(n) => {
                            ffi::lua_pushboolean(thread, 1);
                            ffi::lua_xmove(l, thread, n);
                            Ok(1 + n)
                        }
                        // A value that has no Lua form (a struct without an Encoder, a pid, a
                        // tuple): the tool's fault, not the script's, and nothing was built:
                        // a Lua error the script can catch, raised where it called the tool.
                        // Limits still end the run.
                        Err(SandboxError::InvalidInput(what)) => {
                            let name = &self.pending_tool;
                            push_string(l, format!("tool '{name}': {what}").as_bytes(), limit)?;
                            ffi::lua_pushboolean(thread, 0);
                            ffi::lua_xmove(l, thread, 1);
                            Ok(2)
                        }
                        Err(e) => Err(e),
                    },
                    Reply::Error(msg) => {
                        push_string(l, msg, limit)?;
                        ffi::lua_pushboolean(thread, 1);
                        ffi::lua_pushnil(thread);
                        ffi::lua_xmove(l, thread, 1);
                        Ok(3)
                    }
                    Reply::Raise(msg) => {
                        push_string(l, msg, limit)?;
                        ffi::lua_pushboolean(thread, 0);
                        ffi::lua_xmove(l, thread, 1);
                        Ok(2)
                    }
                    Reply::Refused(why) => {
                        let name = &self.pending_tool;
                        push_string(l, format!("tool '{name}': {why}").as_bytes(), limit)?;
                        ffi::lua_pushboolean(thread, 0);
                        ffi::lua_xmove(l, thread, 1);
                        Ok(2)
                    }
                }
            }
        })();
        self.home.slot_mut().set_limit(limit);
        built
    }

    /// The run's stats so far (the heap peak of the slot included).
    pub fn stats(&self) -> Stats {
        let control = &self.scope.control;
        control.note_memory(self.home.slot().peak());
        Stats {
            instructions: control.instructions(),
            memory_peak: control.memory_peak() as u64,
            duration_us: self.elapsed.as_micros() as u64,
            tool_calls: self.tool_calls,
            cpu_us: control.cpu_time().as_micros() as u64,
            denied: control.denied().clone(),
        }
    }

    /// The error a run ends with: the abort's reason when one is set (the root cause wins
    /// over whatever error Lua reported), else `e`.
    pub fn outcome(&self, e: SandboxError) -> SandboxError {
        self.scope
            .control
            .abort()
            .map(SandboxError::from)
            .unwrap_or(e)
    }

    /// The run succeeded: a session keeps what it changed.
    pub fn succeeded(&mut self) {
        if let Home::Session(loan) = &mut self.home {
            loan.succeeded();
        }
    }

    /// Throws a first attempt away unseen: a fresh run's slot is restored, a session's state
    /// rolled back to the call's checkpoint without counting the attempt as a call.
    pub fn discard(mut self) {
        if let Home::Session(loan) = &mut self.home {
            loan.discard();
        }
    }
}

/// Runs setup work with `scope` active for `caller`: under its budget, kill and deadline
/// checks, with the work ticker installed on `state`, and with its handle store.
///
/// # Safety
/// `scope` must stay valid until `f` returns, and `state` must outlive every later use of
/// the scope's control (as a run's slot outlives its budget).
pub unsafe fn under_scope<R>(
    scope: *const Scope,
    caller: Caller,
    state: *mut ffi::lua_State,
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: per the contract.
    let scope = unsafe { &*scope };
    let _active = scope.activate(caller);
    // SAFETY: per the contract.
    unsafe { budget::install_ticker(state, &scope.control) };
    f()
}

/// Calls `push` on the slot's state with its memory limit lifted (`limit`: the run's, which
/// `push` checks itself), then puts the limit back.
fn with_lifted_limit(slot: &mut Slot, limit: usize, push: Push) -> Result<c_int, SandboxError> {
    let l = slot.state();
    slot.set_limit(usize::MAX);
    let pushed = push(l, limit);
    slot.set_limit(limit);
    pushed
}

/// Gives a pristine state a fresh random seed, the globals, the tools and the modules. Runs
/// under the memory limit (lifted only while values are converted, which checks it itself)
/// and, for charging, under the caller's scope (see [`under_scope`]).
pub fn prepare_state(
    slot: &mut Slot,
    setup: StateSetup,
    max_memory: usize,
) -> Result<(), SandboxError> {
    let l = slot.state();
    // SAFETY: the state is pristine and not running, its main stack empty.
    unsafe { seed::reseed(l) }.map_err(|e| SandboxError::Runtime(e.message))?;
    if let Some(globals) = setup.globals {
        with_lifted_limit(slot, max_memory, globals)?;
    }
    slot.set_limit(max_memory);
    if !setup.tools.is_empty() {
        let mut names: &[String] = setup.tools;
        // SAFETY: `make_tools` follows the raising discipline and only borrows `names`.
        unsafe { protect::call(l, make_tools, (&mut names as *mut &[String]).cast()) }
            .map_err(|e| SandboxError::Runtime(e.message))?;
    }
    if !setup.modules.is_empty() {
        load_modules(l, setup.modules)?;
    }
    Ok(())
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
    if limit > 0 && crate::budget::used_memory(l).saturating_add(bytes.len()) > limit {
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

/// What `make_require` receives: the modules, and where it reports a load failure.
struct Modules<'a> {
    modules: &'a [Module<'a>],
    failed: Option<(usize, SandboxError)>,
}

fn load_modules(l: *mut ffi::lua_State, modules: &[Module]) -> Result<(), SandboxError> {
    let mut req = Modules {
        modules,
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

/// Resumes the run coroutine once with the `nargs` values on top of its stack and classifies
/// what came back.
fn resume_thread(
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
    crate::stretch::mark();
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
    const MESSAGE: &[u8] = b"not enough memory";
    // SAFETY: per the contract; `lua_tolstring` on a value that is a string only reads it
    // (compared in place: an error string can be as large as the heap).
    unsafe {
        if ffi::lua_type(l, idx) != ffi::LUA_TSTRING {
            return false;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, idx, &mut len);
        !p.is_null()
            && len == MESSAGE.len()
            && std::slice::from_raw_parts(p.cast::<u8>(), len) == MESSAGE
    }
}
