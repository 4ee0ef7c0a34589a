defmodule LuaSandbox.Session do
  alias LuaSandbox.{Chunk, Encoding, Error, Native, Options, Runner}
  alias LuaSandbox.Session.Family
  alias LuaSandbox.Session.Worker, as: SessionWorker
  alias LuaSandbox.Supervisor.Workers

  # A state that does not come back from a dead caller's call (see when_free/3).
  @lost "session state did not come back"

  @state_keys [
    :max_memory,
    :max_depth,
    :max_source,
    :print,
    :chunk_name,
    :globals,
    :tools,
    :modules,
    :supervisor,
    :queue_timeout,
    :tenant
  ]
  @call_keys [
    :max_instructions,
    :max_output,
    :max_tool_calls,
    :max_result_bytes,
    :timeout,
    :globals
  ]

  @moduledoc """
  A sandboxed Lua state that lives across calls: load helpers once, call into them many
  times, with per-call limits, and a failed call rolled back.

      {:ok, s} = LuaSandbox.Session.start_link(max_memory: 16 * 1024 * 1024)
      {:ok, _} = LuaSandbox.Session.run(s, "count = 0 function bump(n) count = count + n return count end")
      {:ok, %{value: 5}} = LuaSandbox.Session.call(s, "bump", [5])
      {:error, %{kind: :runtime}} = LuaSandbox.Session.run(s, "count = 1000 error('halfway')")
      {:ok, %{value: 5}} = LuaSandbox.Session.run(s, "return count")

  Options: the state-wide ones in `start_link/1`, the per-call ones in `run/3`.

  Calls on one session are serialized (callers wait their turn); many sessions run in
  parallel. `fork/2` starts a session holding a copy of the state (its calls take turns with
  its origin's: they share one arena). A call runs in the calling process, with or without `timeout:` (a tool under a
  deadline runs in a process linked to it): if that process dies, the call stops within
  milliseconds and is rolled back, and no process of the call outlives it. If the session
  process stops, its state is freed.

  Rollback keeps a copy of the state from before each call and copies it back after a failed
  one. Up to 1 MiB of state the whole state is copied (a `memcpy`, about 1 µs per 40 KiB);
  beyond, only the pages the call wrote are (tracked with Linux's `userfaultfd` write
  protection and `PAGEMAP_SCAN`, 6.7+; older kernels copy everything), so a call that changes
  one field costs about the same on a 16 MiB state as on a small one (see bench/RESULTS.md). A short call on a state of
  at most 1 MiB is first tried on the caller's scheduler (as short runs are); one that needs
  more is rolled back unseen and run on a dirty scheduler.

  On a `supervisor:` started with `isolation: :process`, the state lives in a jailed worker
  OS process of the session's own (started at `start_link/1`, stopped with the session and its
  forks; its `max_memory` at most the supervisor's `worker_max_memory`), with the same API and
  answers. A process of the session's (not the caller's) holds the worker, so a caller's death
  cancels its call there (rolled back, the worker kept); a worker that dies answers the call in progress `:worker_crashed`
  and the session restarts in a new worker from its start options (its state is lost, as a
  supervised process's is); `info/1` also gives the worker's `os_pid`. A fork's state lives
  in its origin's worker (`fork/2`). Handles work there as under the NIF (their terms stay in
  the BEAM; the worker sees indices).
  """

  use GenServer

  @typedoc "A running session: its pid or registered name."
  @type t :: GenServer.server()

  @doc """
  Starts a session linked to the caller.

  ## Options

  #{Options.table(@state_keys)}
  | `name` | none | registers the session process |

  For a session, `max_memory` bounds the whole session's heap; `globals`, `tools` and
  `modules` are set once, when it starts; every call holds one of the `supervisor`'s slots
  while it runs, waiting for one in the supervisor's FIFO queue (shared with runs) up to
  `queue_timeout` (never past the call's `timeout`), and is admitted under the quotas of the
  session's `tenant` like a run (`rate`, `concurrency`, and `cpu_ms`, debited by the call's
  `cpu_us`), counted by tenant in `LuaSandbox.metrics/1` and named in telemetry metadata.

  ## Typical errors

    * `{:error, %LuaSandbox.Error{kind: :invalid_input}}` — a global that cannot become a Lua
      value; `:syntax` or `:runtime` — a module that does not load
    * `ArgumentError` — an unknown or invalid option, or a `supervisor:` that is not running
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, Error.t()}
  def start_link(opts \\ []) do
    {name, opts} = Keyword.pop(opts, :name)
    validated = state_options(opts)
    # Raises now if it is not running, not at the first call.
    _ = LuaSandbox.Supervisor.running(validated[:supervisor])
    gen_opts = if name, do: [name: name], else: []
    # Building the state charges no per-call instruction budget: memory bounds the globals.
    bound = Encoding.bound(validated[:max_memory], nil, nil)

    with {:ok, encoded} <- Runner.encode_opts(validated, bound) do
      native = Options.to_native(encoded)

      case Workers.whereis(validated[:supervisor]) do
        nil -> start_native(native, validated, gen_opts)
        pool -> start_worker(pool, native, validated, gen_opts)
      end
    end
  end

  defp start_native(native, validated, gen_opts) do
    case Native.session_new(native) do
      {:ok, res} ->
        GenServer.start_link(__MODULE__, {res, validated[:tools], validated}, gen_opts)

      {:error, _, _, _} = failed ->
        Runner.drive(failed, %{}, [])
    end
  end

  # isolation: :process: the state lives in a worker OS process of the session's own (with its
  # forks'), whose port the family's process owns (LuaSandbox.Session.Worker).
  defp start_worker(pool, native, validated, gen_opts) do
    with {:ok, worker} <- SessionWorker.boot(pool, native) do
      start_member(worker, validated[:tools], validated, gen_opts)
    end
  end

  defp start_member(worker, tools, opts, gen_opts) do
    case GenServer.start_link(__MODULE__, {{:worker, worker}, tools, opts}, gen_opts) do
      {:ok, _} = started ->
        started

      other ->
        SessionWorker.close(worker)
        other
    end
  end

  @doc """
  Runs Lua `source` (or a compiled `%LuaSandbox.Chunk{}`) in the session's state.

  ## Options (per call; also for `call/4`, `get/3`, `set/4`)

  #{Options.table(@call_keys)}
  | `rollback` | `true` | a call that ends in any error leaves the state as it was before it |

  In a session, a call runs in the calling process with or without `timeout` (no task, no
  backstop); `timeout` also bounds the wait for the session (calls are serialized); and
  `globals` are set before this call runs, as part of it (rolled back with it).

  ## Typical error kinds

    * `:syntax`, `:runtime` — as for `LuaSandbox.run/2` (the call is rolled back)
    * `:instruction_limit`, `:memory_limit`, `:output_limit`, `:tool_limit`, `:timeout`
      (a `:memory_limit` also when the copy of the state the call needs — its checkpoint, or
      the image of the family member whose state is in the arena — cannot get its memory: the
      call is refused before it runs)
    * `:overloaded` — the session's supervisor stayed at its `max_concurrency` for the
      session's whole `queue_timeout`
    * `:rate_limited`, `:quota_exceeded` — the session's `tenant` is over a quota of its
      supervisor (`retry_after_ms` set), or the call used up the tenant's CPU-time balance
    * `:invalid_input`, `:unsupported_value`, `:cycle`, `:depth_limit`, `:size_limit` — a
      global or argument that cannot go in, or a result that cannot come out

  Raises `ArgumentError` for unknown or invalid options.
  """
  @spec run(t, String.t() | Chunk.t(), keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def run(session, source, opts \\ []) when is_binary(source) or is_struct(source, Chunk) do
    native_source =
      case source do
        %Chunk{ref: ref} = chunk ->
          Chunk.check!(chunk)
          ref

        text ->
          text
      end

    exec(session, native_source, nil, opts)
  end

  @doc """
  Calls the global function `name` of the session's state with `args`.

  Takes the per-call options of `run/3` and answers the same way.
  """
  @spec call(t, String.t() | atom, list, keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def call(session, name, args, opts \\ []) when is_list(args) do
    exec(session, nil, {to_string(name), args}, opts)
  end

  # get/2 hands the name over as a global that the chunk removes at once.
  @get_name "__lua_sandbox_get"
  @get_source "local name = #{@get_name} #{@get_name} = nil return _ENV[name]"

  @doc """
  The value of the global `name` in the session's state, as a result would give it.

  Takes the per-call limits of `run/3`; errors as for `run/3` (e.g. `:unsupported_value`
  for a function).

      iex> {:ok, s} = LuaSandbox.Session.start_link()
      iex> :ok = LuaSandbox.Session.set(s, "limits", %{max: 3})
      iex> LuaSandbox.Session.get(s, "limits")
      {:ok, %{"max" => 3}}
  """
  @spec get(t, String.t() | atom, keyword) :: {:ok, term} | {:error, Error.t()}
  def get(session, name, opts \\ []) do
    opts = Keyword.put(opts, :globals, [{@get_name, to_string(name)}])

    with {:ok, %{value: value}} <- run(session, @get_source, opts), do: {:ok, value}
  end

  @doc """
  Sets the global `name` of the session's state to `term` (converted as `globals:` are).

  Takes the per-call limits of `run/3`; errors as for `run/3` (e.g. `:invalid_input` for a
  term that cannot become a Lua value); a failed set changes nothing.
  """
  @spec set(t, String.t() | atom, term, keyword) :: :ok | {:error, Error.t()}
  def set(session, name, term, opts \\ []) do
    opts = Keyword.put(opts, :globals, [{name, term}])

    with {:ok, _} <- exec(session, nil, nil, opts), do: :ok
  end

  @doc """
  Starts a new session holding a copy of `session`'s state — its globals, functions, handles —
  with the same tools, modules and limits, independent from then on: what a call does in one
  is not seen in the other. Linked to the caller, like `start_link/1`.

  Waits for `session`'s turn like a call (the copy is of the state between calls), and holds
  one of the supervisor's slots while it copies.

  A Lua state only works at the address it was built at, so a session and its forks share
  one arena: at any time one of them has its state in it and the others keep theirs as
  copies. Their calls take turns (a call waits while another member's call runs), and a call
  by a different member than the last one copies both states (out, then in).
  A call cannot reach its own session or another member of its family from the process that
  makes it (from one of its tools, say): it would wait for itself, so it raises
  `ArgumentError` instead (a tool's raise is a Lua error the script can catch).

  On an `isolation: :process` supervisor the same holds in the session's worker: a fork's
  state lives there with its origin's (an image of a state cannot move to another process), so
  a fork stays in its session's isolation (a `supervisor` of the other one raises
  `ArgumentError`); a worker that dies restarts every member of the family from the session's
  start options.

  The copies of the states are on the host's heap (in a worker, within its address-space
  bound): a fork whose copy cannot get its memory answers `{:error, %LuaSandbox.Error{kind:
  :memory_limit}}`, the session and its family as they were.

      iex> {:ok, s} = LuaSandbox.Session.start_link()
      iex> {:ok, _} = LuaSandbox.Session.run(s, "n = 1")
      iex> {:ok, f} = LuaSandbox.Session.fork(s)
      iex> {:ok, _} = LuaSandbox.Session.run(f, "n = n + 10")
      iex> {LuaSandbox.Session.get(s, "n"), LuaSandbox.Session.get(f, "n")}
      {{:ok, 1}, {:ok, 11}}

  ## Options

    * `name` — registers the fork's process
    * `supervisor` — the `LuaSandbox.Supervisor` its calls count against (default: `session`'s)
  """
  @spec fork(t, keyword) :: GenServer.on_start() | {:error, Error.t()}
  def fork(session, opts \\ []) do
    {name, opts} = Keyword.pop(opts, :name)

    case Keyword.keys(opts) -- [:supervisor] do
      [] -> :ok
      bad -> raise ArgumentError, "unknown options for a fork: #{inspect(bad)}"
    end

    own_sup = if Keyword.has_key?(opts, :supervisor), do: Options.validate!(opts)[:supervisor]

    {:ok, {res, tools, print, {meta, queue_timeout}, max_memory, family}} =
      checkout!(session, nil)

    sup = own_sup || meta.supervisor

    try do
      _ = LuaSandbox.Supervisor.running(sup)
      check_fork_isolation!(res, sup)
    rescue
      e ->
        GenServer.cast(session, {:checkin, self()})
        reraise e, __STACKTRACE__
    end

    forked =
      try do
        Family.enter(family, fn -> holding_slot(sup, fn -> fork_when_free(res) end) end)
      after
        GenServer.cast(session, {:checkin, self()})
      end

    with {:ok, copy} <- refused_fork(forked) do
      gen_opts = if name, do: [name: name], else: []
      # the fork keeps its origin's tenant, chunk name and queue timeout
      fork_opts = [
        print: print,
        supervisor: sup,
        tenant: meta.tenant,
        chunk_name: meta.chunk,
        queue_timeout: queue_timeout,
        max_memory: max_memory,
        family: family
      ]

      case copy do
        {:worker, worker} -> start_member(worker, tools, fork_opts, gen_opts)
        res -> GenServer.start_link(__MODULE__, {res, tools, fork_opts}, gen_opts)
      end
    end
  end

  # A fork whose copy of the state did not get its memory (the NIF's or the worker's error
  # answer: `:memory_limit`, the session untouched) answers the error.
  defp refused_fork({:error, {_, _, _, _, _}, _, _} = refused), do: Runner.drive(refused, %{}, [])

  defp refused_fork(answer), do: answer

  # A fork's state stays where its session's is (a Lua state works only at its address): in
  # the NIF, or in the session's worker (isolation: :process).
  defp check_fork_isolation!(res, sup) do
    in_worker = match?({:session, _, _}, res)

    if in_worker != (Workers.whereis(sup) != nil) do
      raise ArgumentError,
            "a fork runs where its session does: supervisor #{inspect(sup)} has isolation: " <>
              "#{if in_worker, do: ":nif", else: ":process"}, the session's other one"
    end
  end

  # A session in a worker forks there (its fork is a member of the family of that worker).
  defp fork_when_free({:session, _, _} = target) do
    case when_free(fn -> SessionWorker.fork(target) end, nil) do
      {:ok, worker} -> {:ok, {:worker, worker}}
      answer -> answer
    end
  end

  defp fork_when_free(res) do
    case when_free(fn -> Native.session_fork(res) end, nil) do
      {:gave_up, :lost} -> {:error, Error.new(:runtime, @lost, stats: Error.empty_stats())}
      answer -> answer
    end
  end

  @doc """
  Memory in use (bytes), calls made, instructions used and rollbacks done so far (`%{busy:
  true}` during a call); a session in a worker (`isolation: :process`) adds its `os_pid`.
  """
  @spec info(t) :: %{
          optional(:memory) => non_neg_integer,
          optional(:calls) => non_neg_integer,
          optional(:instructions) => non_neg_integer,
          optional(:rollbacks) => non_neg_integer,
          optional(:busy) => true,
          optional(:os_pid) => pos_integer
        }
  def info(session), do: GenServer.call(session, :info, :infinity)

  @doc "Stops the session; its state is freed."
  @spec stop(t) :: :ok
  def stop(session), do: GenServer.stop(session)

  ## Client side of a call

  # A call always runs in the calling process, holding the session and a slot of the
  # session's supervisor: its death stops the call (the NIF checks its caller) and a tool it
  # was running dies with it (Runner: a tool under a deadline runs linked to the caller). A
  # `timeout:` bounds the wait for the session, the Lua and the tools alike.
  defp exec(session, source, call, opts) do
    {timeout, call_opts} = call_options(opts, call)
    deadline = if timeout == :infinity, do: nil, else: now_ms() + timeout

    case checkout!(session, deadline) do
      {:ok, {res, tools, print, {meta, queue_timeout}, max_memory, family}} ->
        try do
          # a call is a run of the supervisor: admission, queue, quotas, metrics, telemetry
          Family.enter(family, fn ->
            LuaSandbox.Supervisor.admitted(:session, meta, queue_timeout, deadline, fn deadline ->
              limits = [
                print: print,
                deadline: deadline,
                timeout: timeout,
                max_memory: max_memory,
                max_instructions: call_opts.max_instructions
              ]

              with {:ok, call_opts} <- encode_call(call_opts, limits) do
                call_in(res, source, call_opts, deadline, timeout, tools, limits)
              end
            end)
          end)
        after
          GenServer.cast(session, {:checkin, self()})
        end

      :timeout ->
        {:error,
         Error.new(:timeout, Error.timeout_message("call", timeout) <> " waiting for the session",
           stats: Error.empty_stats()
         )}
    end
  end

  defp now_ms, do: System.monotonic_time(:millisecond)

  # A session in a worker (isolation: :process): the call's frames go through the session
  # process to its worker, started when no other member of its family has a call there (as
  # for the NIF's arena: wait, within the deadline); a worker that did not answer within the
  # deadline is replaced.
  defp call_in({:session, pid, gen} = target, source, call_opts, deadline, timeout, tools, limits) do
    attempt = fn ->
      opts = %{call_opts | timeout: Options.native_timeout(deadline, timeout)}
      SessionWorker.run(target, source, opts, deadline)
    end

    case when_free(attempt, deadline) do
      {:gave_up, :timeout} ->
        Runner.drive(
          {:error, {:timeout, "", nil, nil, nil}, "", Error.empty_stats()},
          tools,
          limits
        )

      step ->
        {answer, status} = Runner.drive(step, tools, limits)
        if status == :broken, do: GenServer.cast(pid, {:broken, gen})
        answer
    end
  end

  defp call_in(res, source, call_opts, deadline, timeout, tools, limits) do
    res
    |> run_when_free(source, call_opts, deadline, timeout)
    |> Runner.drive(tools, limits)
  end

  # The call's globals and arguments through LuaSandbox.Encoder, within the session's
  # max_memory and the call's limits (here, holding the session, which knows its max_memory).
  defp encode_call(call_opts, limits) do
    opts = [globals: call_opts.globals, call: call_opts.call, timeout: limits[:timeout]]

    with {:ok, encoded} <- Runner.encode_opts(opts, Encoding.bound(limits)),
         do: {:ok, %{call_opts | globals: encoded[:globals], call: encoded[:call]}}
  end

  # Waits for the session (calls are serialized) until the deadline; a caller that gives up
  # withdraws, so a grant that crosses its withdrawal is handed on, not kept. A process that
  # already holds the session (a tool of its own call calling it again) would wait for itself:
  # an ArgumentError instead.
  defp checkout!(session, deadline) do
    wait = if deadline, do: max(deadline - now_ms(), 0), else: :infinity

    callers = [self() | Process.get(:"$callers", [])]

    case GenServer.call(session, {:checkout, callers}, wait) do
      :reentrant -> raise ArgumentError, Family.reentrant("this session")
      grant -> {:ok, grant}
    end
  catch
    :exit, {:timeout, _} when deadline != nil ->
      GenServer.cast(session, {:checkin, self()})
      :timeout
  end

  # A fork holds one of the supervisor's slots while it copies the state; it is not a run
  # (no metrics, no telemetry) and does not queue.
  defp holding_slot(sup, fun) do
    case LuaSandbox.Supervisor.Slots.admit(sup, nil, 0) do
      {:ok, slot, _cap, _queued} ->
        try do
          fun.()
        after
          LuaSandbox.Supervisor.Slots.checkin(slot)
        end

      refused ->
        refused
    end
  end

  defp run_when_free(res, source, call_opts, deadline, timeout) do
    attempt = fn ->
      opts = %{call_opts | timeout: Options.native_timeout(deadline, timeout)}

      case first_attempt(res, source, opts) do
        :retry -> Native.session_run(res, source, opts)
        answer -> answer
      end
    end

    case when_free(attempt, deadline) do
      {:gave_up, :timeout} -> {:error, {:timeout, "", nil, nil, nil}, "", Error.empty_stats()}
      {:gave_up, :lost} -> {:error, {:runtime, @lost, nil, nil, nil}, "", Error.empty_stats()}
      answer -> answer
    end
  end

  # Repeats `attempt` (a native call on the session's state) while the state is not free: a
  # fork's call has the arena the family shares (`fork/2`: wait, within the deadline), or the
  # state is on its way back from a call whose caller just died (the native call notices
  # within milliseconds and rolls back: wait up to ~5 s, then give it up as lost).
  defp when_free(attempt, deadline, waited \\ 0) do
    case attempt.() do
      :arena_busy ->
        if deadline && now_ms() >= deadline do
          {:gave_up, :timeout}
        else
          Process.sleep(1)
          when_free(attempt, deadline, waited)
        end

      :busy when waited < 5_000 ->
        Process.sleep(1)
        when_free(attempt, deadline, waited + 1)

      :busy ->
        {:gave_up, :lost}

      answer ->
        answer
    end
  end

  # Most calls are short: one first attempt on this (normal) scheduler within a small slice
  # saves the switch to a dirty one; a call that needs more is rolled back unseen and run
  # again there (session.rs `session_try`). Only for short source: parsing is the one step
  # whose cost the slice does not bound.
  @short_source 4096
  defp first_attempt(res, source, opts) do
    if not is_binary(source) or byte_size(source) <= @short_source,
      do: Native.session_try(res, source, opts),
      else: :retry
  end

  defp call_options(opts, call) do
    {rollback, opts} = Keyword.pop(opts, :rollback, true)

    unless is_boolean(rollback),
      do: raise(ArgumentError, "rollback must be a boolean, got: #{inspect(rollback)}")

    case Keyword.keys(opts) -- @call_keys do
      [] -> :ok
      bad -> raise ArgumentError, "unknown options for a session call: #{inspect(bad)}"
    end

    o = Options.validate!(opts)

    {o[:timeout],
     %{
       max_instructions: o[:max_instructions],
       max_output: o[:max_output],
       max_tool_calls: o[:max_tool_calls],
       max_result_bytes: o[:max_result_bytes],
       rollback: rollback,
       call: call,
       globals: o[:globals],
       timeout: nil
     }}
  end

  # Validated and normalized (names as strings, tools as name => {fun, spec}).
  defp state_options(opts) do
    case Keyword.keys(opts) -- @state_keys do
      [] -> :ok
      bad -> raise ArgumentError, "unknown session options: #{inspect(bad)}"
    end

    Options.validate!(opts)
  end

  ## Server

  @impl true
  def init({{:worker, worker}, tools, opts}) do
    {:ok, state} = init({nil, tools, opts})
    {:ok, %{state | worker: SessionWorker.join(worker)}}
  end

  def init({res, tools, opts}) do
    {:ok,
     %{
       res: res,
       worker: nil,
       tools: tools,
       print: opts[:print] || :capture,
       # what admission and telemetry need (LuaSandbox.Supervisor.admitted/5)
       admission: {
         %{
           supervisor: opts[:supervisor],
           tenant: opts[:tenant],
           chunk: opts[:chunk_name],
           session: self()
         },
         opts[:queue_timeout]
       },
       max_memory: opts[:max_memory],
       # shared by a session and its forks (one arena; LuaSandbox.Session.Family)
       family: opts[:family] || make_ref(),
       owner: nil,
       queue: :queue.new()
     }}
  end

  @impl true
  # `callers`: the caller and the processes it acts for (`$callers`): one of them holding the
  # session means the caller would wait for itself.
  def handle_call({:checkout, callers}, {pid, _} = from, s) do
    case s.owner do
      nil when s.worker != nil and s.worker.cancelling ->
        {:noreply, %{s | queue: :queue.in(from, s.queue)}}

      nil ->
        {:reply, grant(s), %{s | owner: {pid, Process.monitor(pid)}}}

      {owner, _} ->
        if owner in callers,
          do: {:reply, :reentrant, s},
          else: {:noreply, %{s | queue: :queue.in(from, s.queue)}}
    end
  end

  # A frame of the call of the caller holding the session, to its worker.
  def handle_call({:worker_request, gen, request}, {pid, _} = from, %{owner: {pid, _}} = s),
    do: {:noreply, %{s | worker: SessionWorker.forward(s.worker, from, gen, request)}}

  def handle_call({:worker_request, _gen, _request}, _from, s),
    do: {:reply, {:error, Error.new(:worker_crashed, "the call does not hold the session")}, s}

  def handle_call(:info, _from, %{worker: worker} = s) when worker != nil,
    do: {:reply, SessionWorker.info(worker), s}

  def handle_call(:info, _from, s) do
    case Native.session_info(s.res) do
      {:ok, info} -> {:reply, info, s}
      :busy -> {:reply, %{busy: true}, s}
    end
  end

  @impl true
  def handle_cast({:checkin, pid}, %{owner: {pid, mref}} = s) do
    Process.demonitor(mref, [:flush])
    {:noreply, release(s)}
  end

  # A caller gave the worker up (no answer within its deadline): a new one.
  def handle_cast({:broken, gen}, %{worker: worker} = s) when worker != nil,
    do: {:noreply, %{s | worker: SessionWorker.broken(worker, gen)}}

  # A caller that gave up waiting (its deadline passed) leaves the queue.
  def handle_cast({:checkin, pid}, s),
    do: {:noreply, %{s | queue: :queue.filter(fn {p, _} -> p != pid end, s.queue)}}

  @impl true
  def handle_info({:DOWN, mref, :process, pid, _}, %{owner: {pid, mref}} = s),
    do: {:noreply, release(s)}

  # From the family's process (LuaSandbox.Session.Worker): a cancelled call of this session has
  # ended; a new worker holds the family; the family is gone (so is the state).
  def handle_info({:member_free, family}, %{worker: %{family: family} = w} = s),
    do: {:noreply, next(%{s | worker: SessionWorker.member_free(w)})}

  def handle_info({:worker_restarted, family, gen}, %{worker: %{family: family} = w} = s),
    do: {:noreply, next(%{s | worker: SessionWorker.restarted(w, gen)})}

  def handle_info({:DOWN, _, :process, family, reason}, %{worker: %{family: family}} = s),
    do: {:stop, reason, s}

  def handle_info(_, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, %{worker: worker}) when worker != nil, do: SessionWorker.close(worker)
  def terminate(_reason, _s), do: :ok

  defp grant(%{worker: nil} = s),
    do: {s.res, s.tools, s.print, s.admission, s.max_memory, s.family}

  defp grant(s),
    do: {{:session, self(), s.worker.gen}, s.tools, s.print, s.admission, s.max_memory, s.family}

  # The caller holding the session let go (checked in, or died): a worker's call in progress
  # is cancelled first (the session is handed on once the worker says it is rolled back).
  defp release(%{worker: nil} = s), do: next(%{s | owner: nil})

  defp release(s) do
    case SessionWorker.release(s.worker) do
      {:free, worker} -> next(%{s | owner: nil, worker: worker})
      {:cancelling, worker} -> %{s | owner: nil, worker: worker}
    end
  end

  # Hands the state to the next waiting caller that is still alive.
  defp next(%{owner: owner} = s) when owner != nil, do: s
  defp next(%{worker: %{cancelling: true}} = s), do: s

  defp next(s) do
    case :queue.out(s.queue) do
      {:empty, _} ->
        s

      {{:value, {pid, _} = from}, queue} ->
        if Process.alive?(pid) do
          GenServer.reply(from, grant(s))
          %{s | queue: queue, owner: {pid, Process.monitor(pid)}}
        else
          next(%{s | queue: queue})
        end
    end
  end
end
