//! Sessions: a sandboxed state that lives across calls, with per-call limits and rollback.
//!
//! A session owns a slot (`slots.rs`) for its whole life — shared with its forks, which take
//! turns in it (`family.rs`) — : its state-wide setup (globals,
//! tools, modules) is done once, and each call runs a new coroutine in that same state. A
//! call borrows the session's state (a [`Loan`]): before it starts, the slot takes a
//! checkpoint (`Slot::checkpoint`: a copy of the used prefix, kept up to date from the pages
//! written once the state passes 1 MiB); when the call ends in any error — a script error, a
//! limit, the caller's death, also while parked at a tool call — the slot rolls back to it, so
//! the session is exactly as it was before the call. With `rollback: false` a failed call
//! keeps what it changed, as Lua would.
//!
//! The resource belongs to the `LuaSandbox.Session` process, which serializes calls; the
//! call itself runs in the calling process (so its death stops the call, as for `run/2`).

use std::sync::{Arc, Mutex};

use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifMap, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::budget::Control;
use crate::chunk::Code;
use crate::error::SandboxError;
use crate::family::Family;
use crate::handles::Handles;
use crate::output::Output;
use crate::run::{self, Entry, Home, Running, Source, StateSetup};
use crate::sandbox;
use crate::slots::{self, Lease};
use lua_sandbox_core::Slot;

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

/// What a session keeps between calls.
pub struct SessionState {
    /// The slot this session shares with its forks (`family.rs`), and its place in it.
    family: Arc<Family>,
    id: u64,
    max_memory: usize,
    max_depth: usize,
    max_source: u64,
    chunk_name: String,
    print: Atom,
    print_pid: Option<LocalPid>,
    print_tag: Option<Vec<u8>>,
    calls: u64,
    instructions: u64,
    rollbacks: u64,
    /// The terms behind the session's handles: they stay valid for the session's life. Lent
    /// to each call's `Running` and given back when it ends.
    handles: Box<Handles>,
}

impl SessionState {
    /// Bytes the session's state holds; `None` while a call of the family has it.
    fn used(&self) -> Option<usize> {
        self.family.used(self.id)
    }
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.family.leave(self.id);
    }
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

/// A session's state lent to one call; given back when the call ends (in `Drop`), rolled
/// back first unless the call succeeded or rollback is off.
pub struct Loan {
    state: Option<SessionState>,
    /// The family's slot with this session's state in it, for the call.
    lease: Option<Lease>,
    owner: ResourceArc<SessionRes>,
    rollback: bool,
    ok: bool,
    instructions: u64,
    /// The session's handle count before the call (rolled back with the state).
    handles_mark: usize,
    /// A first attempt thrown away (`session_try`): rolled back, not counted.
    discarded: bool,
}

impl run::Lent for Loan {
    fn slot(&self) -> &Slot {
        self.lease
            .as_ref()
            .expect("a loan holds the slot until dropped")
            .slot()
    }

    fn slot_mut(&mut self) -> &mut Slot {
        self.lease
            .as_mut()
            .expect("a loan holds the slot until dropped")
            .slot_mut()
    }

    /// The call finished with a result: its changes stay.
    fn succeeded(&mut self) {
        self.ok = true;
    }

    /// The instructions the call used (for `info/1`).
    fn record(&mut self, instructions: u64) {
        self.instructions = instructions;
    }

    /// The call was a first attempt that is thrown away: roll back, count nothing.
    fn discard(&mut self) {
        self.discarded = true;
        self.ok = false;
    }

    /// The session's handles, lent to the call, come back (before the loan is dropped).
    fn give_back_handles(&mut self, handles: Box<Handles>) {
        if let Some(state) = self.state.as_mut() {
            state.handles = handles;
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let (Some(mut state), Some(mut lease)) = (self.state.take(), self.lease.take()) else {
            return;
        };
        let slot = lease.slot_mut();
        if self.discarded {
            // An attempt always took a checkpoint (`call`), `rollback: false` or not.
            slot.rollback();
            state.handles.truncate(self.handles_mark);
        } else {
            if self.rollback && !self.ok {
                slot.rollback();
                state.handles.truncate(self.handles_mark);
                state.rollbacks += 1;
            } else {
                // SAFETY: the call is over (finished, or abandoned while suspended): nothing
                // runs on the state; dropping the main stack's values (the run coroutine)
                // never raises.
                unsafe { lua_sandbox_core::ffi::lua_settop(slot.state(), 0) };
            }
            state.calls += 1;
            state.instructions += self.instructions;
        }
        state.family.give_back(lease);
        *self.owner.lock() = Some(state);
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn session_new<'a>(env: Env<'a>, opts: SessionOpts<'a>) -> Term<'a> {
    let t0 = std::time::Instant::now();
    crate::stack::with_big_stack(|| {
        let max_memory = slots::clamp_memory(opts.max_memory);
        let mut lease = match slots::lease(max_memory) {
            Ok(lease) => lease,
            Err(e) => return run::early_error(env, e, t0),
        };
        let setup = StateSetup {
            globals: &opts.globals,
            tools: &opts.tools,
            modules: &opts.modules,
            max_depth: opts.max_depth as usize,
            max_memory,
            max_source: opts.max_source as usize,
        };
        // The setup runs no script code; the activation only makes a kill stop a huge
        // conversion of globals.
        let control = Control::new(u64::MAX);
        let state = lease.slot().state();
        // Handles in the state-wide globals are the session's, for its life.
        let mut handles = Box::<Handles>::default();
        let handles_ptr: *mut Handles = &mut *handles;
        // SAFETY: the box outlives the activation (both end in this block, the activation
        // first: it is declared after).
        let _handles = unsafe { crate::handles::Activation::new_raw(handles_ptr) };
        // SAFETY: `control` lives until the end of this function; the leased state outlives
        // it (the lease moves into the session, `control` is dropped here).
        let prepared = unsafe {
            run::under_budget(env, &control, state, || {
                run::prepare_state(lease.slot_mut(), &setup)
            })
        };
        drop(_handles);
        if let Err(e) = prepared {
            return run::early_error(env, e, t0);
        }
        let (family, id) = Family::new(lease);
        let state = SessionState {
            family,
            id,
            max_memory,
            max_depth: opts.max_depth as usize,
            max_source: opts.max_source,
            chunk_name: opts.chunk_name,
            print: opts.print,
            print_pid: opts.print_pid,
            print_tag: opts.print_tag.map(|t| t.as_slice().to_vec()),
            calls: 0,
            instructions: 0,
            rollbacks: 0,
            handles,
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
        .and_then(|state| state.used())
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
    let Some(mut state) = res.lock().take() else {
        return Ok(atoms::busy().encode(env));
    };
    Ok(crate::stack::with_big_stack(|| {
        let t0 = std::time::Instant::now();
        let code = match &source {
            None => Ok(None),
            Some(Source::Text(bin)) => {
                crate::chunk::check_source(bin.as_slice(), state.max_source as usize, "source")
                    .and_then(|()| Code::new(bin.as_slice(), &state.chunk_name, false))
                    .map(Some)
            }
            Some(Source::Chunk(chunk)) => Code::new(&chunk.bytecode, &chunk.name, true).map(Some),
        };
        let code = match code {
            Ok(code) => code,
            Err(e) => {
                *res.lock() = Some(state);
                return run::early_error(env, e, t0);
            }
        };
        let Some(mut lease) = state.family.take(state.id) else {
            *res.lock() = Some(state);
            return atoms::arena_busy().encode(env);
        };
        lease.slot_mut().reset_peak();
        // A first attempt may be thrown away (`session_try`): it takes a checkpoint even
        // with `rollback: false`, which then only means a failure that ends the call keeps
        // what it changed.
        if opts.rollback || fast.is_some() {
            lease.slot_mut().checkpoint();
        }
        let chunk_name = match &source {
            Some(Source::Chunk(chunk)) => chunk.name.clone(),
            _ => state.chunk_name.clone(),
        };
        let print = run::print_mode_of(state.print, state.print_pid, state.print_tag.clone());
        let max_source = state.max_source;
        let handles = std::mem::take(&mut state.handles);
        let handles_mark = handles.mark();
        let control = Box::new(Control::new(opts.max_instructions));
        if let Some(ms) = opts.timeout {
            control.set_deadline(t0 + std::time::Duration::from_millis(ms));
        }
        control.clock_start();
        let mut running = Running {
            thread: std::ptr::null_mut(),
            control,
            output: Output::new(opts.max_output as usize, print),
            chunk_name,
            max_depth: state.max_depth,
            max_result_bytes: opts.max_result_bytes,
            max_tool_calls: opts.max_tool_calls,
            max_memory: state.max_memory,
            tool_calls: 0,
            elapsed: std::time::Duration::ZERO,
            pending_tool: String::new(),
            handles,
            home: Home::Session(Box::new(Loan {
                state: Some(state),
                lease: Some(lease),
                owner: res.clone(),
                rollback: opts.rollback,
                ok: false,
                instructions: 0,
                handles_mark,
                discarded: false,
            })),
        };
        if fast.is_some() {
            // An attempt streams nothing until it has succeeded.
            running.output.hold();
        }
        let handles_ptr: *mut crate::handles::Handles = &mut *running.handles;
        // SAFETY: as in `run::start`: the box outlives every marshaling call of this call.
        let _handles = unsafe { crate::handles::Activation::new_raw(handles_ptr) };
        sandbox::clear_traceback();
        let entry = match &code {
            Some(code) => Entry::Chunk(code),
            None => Entry::Nothing,
        };
        let call = opts.call.as_ref().map(|(n, a)| (n.as_str(), a.as_slice()));
        let control: *const Control = &*running.control;
        let state = running.main();
        // SAFETY: the control is boxed in `running`, which outlives the call, and the
        // session's state outlives the call's control (both live in `running`).
        let prepared = unsafe {
            run::under_budget(env, control, state, || {
                set_globals(&mut running, &opts.globals)?;
                run::prepare_thread(&mut running, entry, call, max_source)
            })
        };
        run::begin(env, prepared, running, t0, fast)
    }))
}

/// Sets a call's `globals:` in the session's state (the main stack is empty, nothing runs),
/// under the call's budget and handles like the rest of its setup.
fn set_globals(running: &mut Running, globals: &[(String, Term)]) -> Result<(), SandboxError> {
    if globals.is_empty() {
        return Ok(());
    }
    let l = running.main();
    let (max_depth, limit) = (running.max_depth, running.max_memory);
    running.home.slot_mut().set_limit(usize::MAX);
    // SAFETY: `l` is not running and its limit is lifted (marshal's contract).
    let pushed = unsafe { crate::marshal::push_globals(l, globals, max_depth, limit) };
    running.home.slot_mut().set_limit(limit);
    pushed
}

/// `{:ok, %{memory:, calls:, instructions:, rollbacks:}}`, or `:busy` during a call.
#[rustler::nif]
fn session_info(env: Env<'_>, res: ResourceArc<SessionRes>) -> Term<'_> {
    let guard = res.lock();
    let Some(state) = guard.as_ref() else {
        return atoms::busy().encode(env);
    };
    let keys = [
        atoms::memory().encode(env),
        atoms::calls().encode(env),
        atoms::instructions().encode(env),
        atoms::rollbacks().encode(env),
    ];
    let values = [
        (state.used().unwrap_or(0) as u64).encode(env),
        state.calls.encode(env),
        state.instructions.encode(env),
        state.rollbacks.encode(env),
    ];
    match Term::map_from_arrays(env, &keys, &values) {
        Ok(map) => (atoms::ok(), map).encode(env),
        Err(_) => atoms::error().encode(env),
    }
}

/// `{:ok, session}`: a new session holding a copy of this one's state (its globals, functions
/// and handles), independent from then on; `:busy` while a call has this session, or
/// `:arena_busy` while a call of its family has the slot (`family.rs`).
#[rustler::nif(schedule = "DirtyCpu")]
fn session_fork(env: Env<'_>, res: ResourceArc<SessionRes>) -> Term<'_> {
    let Some(state) = res.lock().take() else {
        return atoms::busy().encode(env);
    };
    let answer = match state.family.fork(state.id) {
        None => atoms::arena_busy().encode(env),
        Some(id) => {
            let fork = SessionState {
                family: state.family.clone(),
                id,
                max_memory: state.max_memory,
                max_depth: state.max_depth,
                max_source: state.max_source,
                chunk_name: state.chunk_name.clone(),
                print: state.print,
                print_pid: state.print_pid,
                print_tag: state.print_tag.clone(),
                calls: 0,
                instructions: 0,
                rollbacks: 0,
                handles: Box::new(state.handles.fork()),
            };
            let fork = ResourceArc::new(SessionRes {
                state: Mutex::new(Some(fork)),
            });
            (atoms::ok(), fork).encode(env)
        }
    };
    *res.lock() = Some(state);
    answer
}
