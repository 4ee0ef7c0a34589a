defmodule LuaSandbox.Supervisor do
  @moduledoc """
  A bounded supervisor for Lua runs, to put in your own tree.

      children = [
        {LuaSandbox.Supervisor, name: MyApp.Lua, max_concurrency: 8}
      ]

  then `LuaSandbox.run(source, supervisor: MyApp.Lua)`. The application starts one named
  `LuaSandbox.TaskSupervisor` (size from `config :lua_sandbox, max_concurrency:`, default:
  dirty CPU schedulers × 4).

  Every run counts against its supervisor's `max_concurrency`, whatever its options: a run
  without `timeout:` stays in the calling process and holds a slot (a row the supervisor
  gives back if the caller dies) for its duration; a run with `timeout:` runs in a task under
  the supervisor. A run that finds the supervisor full waits in a FIFO queue shared by
  `LuaSandbox.run/2`, `LuaSandbox.async/2`, `LuaSandbox.async_stream/2` and session calls, up to its
  `queue_timeout:` (default 5 000 ms, like Finch's `pool_timeout`; `async_stream/2`:
  `:infinity`, bounded by its own `timeout`), then answers `kind: :overloaded`;
  `queue_timeout: 0` answers at once. While runs wait, a freed slot goes to the oldest of them
  and no newcomer takes one directly, so a caller that retries cannot starve one that waits.
  Only a run that waits sends a message (to the supervisor's keeper); taking a free slot does
  not. A `supervisor:` that is not running is an `ArgumentError`.
  """

  alias LuaSandbox.{Chunk, Cluster, Error, Runner, Telemetry}
  alias LuaSandbox.Supervisor.{Quotas, Slots, Workers}

  @doc "The default size: dirty CPU schedulers × 4, unless configured."
  @spec default_max_concurrency() :: pos_integer
  def default_max_concurrency do
    Application.get_env(
      :lua_sandbox,
      :max_concurrency,
      :erlang.system_info(:dirty_cpu_schedulers) * 4
    )
  end

  @doc false
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(opts) do
    name = Keyword.fetch!(opts, :name)

    %{
      id: name,
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc """
  Starts a supervisor for Lua runs registered as `name`, running at most `max_concurrency`
  scripts at once.

  Options: `name` (required, an atom: pass it as `supervisor:`), `max_concurrency` (default
  `default_max_concurrency/0`), `cluster` (default `false`): `true` makes it a member of the
  cluster group named `name`, which `node: :any` picks from on every connected node, and
  `quotas` (default none): `%{default: limits, tenant => limits}`
  applied to runs given `tenant:` and to the calls of a `LuaSandbox.Session` started with
  `tenant:`, where limits are any of

    * `rate: {count, per_ms}` — at most `count` runs per `per_ms` (GCRA, bursts of up to
      `count`); over it: `:rate_limited`
    * `concurrency: n` — at most `n` of the tenant's runs at once; over it: `:rate_limited`
    * `cpu_ms: {ms, per_ms}` — a balance of `ms` CPU milliseconds refilled over `per_ms`; a
      run's deadline is capped at what is left (the run stops with `:quota_exceeded` when it
      reaches the cap) and its `stats.cpu_us` is debited when it ends; with nothing left:
      `:quota_exceeded`

  A tenant without an entry gets `default` (none if there is no `default`). Refusals carry
  `retry_after_ms`. Admission takes no message to any process (ETS and atomics). A run of a
  tenant with a `concurrency` quota counts against it once it holds a slot (not while queued).

  `audit_log` (default `false`): a Logger level (`true` is `:warning`) at which every
  capability a script was denied ("os.getenv is not available in this sandbox") is logged
  once per run and capability, with metadata `lua_supervisor`, `lua_tenant`, `lua_chunk`,
  `lua_capability` and `lua_count`. Denials are counted in `LuaSandbox.metrics/1` and emitted
  as telemetry (`LuaSandbox.Telemetry`) whether or not they are logged.

  `isolation` (default `:nif`): `:process` starts a pool of `max_concurrency` worker OS
  processes, each a jailed `lua_sandbox_worker` (built by `mix compile` and installed in
  `priv/native/` next to the NIF; `worker:` names another path) that reports at boot which
  layers of its jail are in force, with a warning logged for each one that is not (see
  `info/1`). A worker that dies is replaced in the background. Runs on such a supervisor
  execute in a worker; `worker_max_memory` (default 64 MiB) is the largest `max_memory` its
  workers serve (their arena and the jail's address-space bound are sized for it; a run asking
  more is `:invalid_input`). Compiled chunks run there too (their bytecode goes to the worker),
  and `print: {:send, ...}` streams as under the NIF, and handles (`LuaSandbox.handle/1`) work
  as under the NIF (their terms stay in the BEAM; a worker sees indices). A session started on
  it (`supervisor:`) holds its state, and its forks', in a worker of its own
  (`LuaSandbox.Session`).
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    opts =
      Keyword.validate!(opts, [
        :name,
        quotas: nil,
        max_concurrency: default_max_concurrency(),
        cluster: false,
        isolation: :nif,
        worker: nil,
        worker_max_memory: 64 * 1024 * 1024,
        audit_log: false
      ])

    quotas = Quotas.validate!(opts[:quotas])

    unless is_atom(opts[:name]) and opts[:name] not in [nil, true, false] do
      raise ArgumentError, "name must be an atom, got: #{inspect(opts[:name])}"
    end

    unless is_integer(opts[:max_concurrency]) and opts[:max_concurrency] > 0 do
      raise ArgumentError,
            "max_concurrency must be a positive integer, got: #{inspect(opts[:max_concurrency])}"
    end

    unless is_boolean(opts[:cluster]) do
      raise ArgumentError, "cluster must be a boolean, got: #{inspect(opts[:cluster])}"
    end

    unless opts[:isolation] in [:nif, :process] do
      raise ArgumentError,
            "isolation must be :nif or :process, got: #{inspect(opts[:isolation])}"
    end

    unless opts[:worker] == nil or is_binary(opts[:worker]) do
      raise ArgumentError, "worker must be a path, got: #{inspect(opts[:worker])}"
    end

    # A run's max_memory floor, and the core's ceiling (pool::MAX_MEMORY): the worker's arena
    # is sized for it.
    unless is_integer(opts[:worker_max_memory]) and
             opts[:worker_max_memory] >= LuaSandbox.Options.min_memory() and
             opts[:worker_max_memory] <= 128 * 1024 * 1024 * 1024 do
      raise ArgumentError,
            "worker_max_memory must be a number of bytes from #{LuaSandbox.Options.min_memory()} " <>
              "to 128 GiB, got: #{inspect(opts[:worker_max_memory])}"
    end

    audit =
      case opts[:audit_log] do
        true ->
          :warning

        level when level == false or level in [:debug, :info, :notice, :warning, :error] ->
          level

        other ->
          raise ArgumentError,
                "audit_log must be a boolean or a Logger level, got: #{inspect(other)}"
      end

    children =
      [
        {Slots, {opts[:name], opts[:max_concurrency], quotas: quotas, audit_log: audit}},
        # Unbounded: the bound is the slots', which every run takes wherever it runs.
        {Task.Supervisor, name: opts[:name]}
      ] ++
        workers(opts) ++
        if(opts[:cluster], do: [{Cluster.Member, {opts[:name], opts[:max_concurrency]}}], else: [])

    Supervisor.start_link(children, strategy: :one_for_all)
  end

  defp workers(opts) do
    case opts[:isolation] do
      :nif ->
        # A supervisor of the same name started before with :process leaves its entry.
        :persistent_term.erase({Workers, opts[:name]})
        []

      :process ->
        path = opts[:worker] || LuaSandbox.Worker.default_path()
        [{Workers, {opts[:name], opts[:max_concurrency], path, opts[:worker_max_memory]}}]
    end
  end

  @doc """
  What supervisor `name` is: its `isolation` and `capacity` (its `max_concurrency`), and for
  `isolation: :process` its `workers` (each `%{os_pid, runs, rss}`: runs served, resident set
  in bytes, nil where the OS does not say), its `session_workers` (the worker of each session
  started on it, holding the session's state and its forks': each `%{os_pid, runs, rss,
  sessions}`, `runs` the calls it answered, `sessions` the pids of the session and its forks)
  and the `layers` of the jail as the workers
  reported them at boot, each `{name, state}` with `state` one of `:on`, `{:on, detail}`,
  `{:off, reason}` or, for `:address_space`, the bound in bytes; `missing_layers` lists the
  ones not in force with the reason (each was logged as a warning at start). Raises
  `ArgumentError` if it is not running.

      iex> LuaSandbox.Supervisor.info(LuaSandbox.TaskSupervisor).isolation
      :nif
  """
  @spec info(atom) :: map
  def info(name) do
    {_running, capacity, _queue} = Slots.load(name)

    case Workers.whereis(name) do
      nil ->
        %{isolation: :nif, capacity: capacity}

      pool ->
        %{workers: workers, session_workers: session_workers, layers: layers} = Workers.info(pool)

        %{
          isolation: :process,
          capacity: capacity,
          workers: workers,
          session_workers: session_workers,
          layers: layers,
          missing_layers: LuaSandbox.Worker.missing(layers)
        }
    end
  end

  @doc """
  How many runs hold a slot of the supervisor `name` right now (at most its
  `max_concurrency`). Raises `ArgumentError` if it is not running.
  """
  @spec running(atom) :: non_neg_integer
  def running(name), do: Slots.count(name)

  @doc """
  The load of supervisor `name`: `%{running: n, capacity: max_concurrency, queue: waiting}`,
  from three reads (cheap enough to ask before every run, e.g. to pick a node).
  """
  @spec load(atom) :: %{
          running: non_neg_integer,
          capacity: pos_integer,
          queue: non_neg_integer
        }
  def load(name) do
    {running, capacity, queue} = Slots.load(name)
    %{running: running, capacity: capacity, queue: queue}
  end

  @doc false
  # Runs `source` in the calling process while holding a slot of `opts[:supervisor]` (admitted/5).
  @spec run_local(LuaSandbox.source(), keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def run_local(source, opts) do
    own =
      opts[:deadline] ||
        if is_integer(opts[:timeout]),
          do: System.monotonic_time(:millisecond) + opts[:timeout]

    meta = %{
      supervisor: opts[:supervisor],
      tenant: opts[:tenant],
      chunk: chunk_name(source, opts)
    }

    admitted(:run, meta, opts[:queue_timeout], own, fn
      ^own -> Runner.run(source, opts)
      capped -> Runner.run(source, Keyword.put(opts, :deadline, capped))
    end)
  end

  defp chunk_name(%Chunk{name: name}, _opts), do: name
  defp chunk_name(_source, opts), do: opts[:chunk_name]

  @doc false
  # The one path of a run and of a session call (`what`: `:run` or `:session`) through its
  # supervisor: admission (the tenant's quotas, then a slot, waiting in the FIFO queue up to
  # `queue_timeout` but never past `deadline`), then `fun.(deadline)` with the deadline capped
  # by the tenant's CPU balance (stopped by that cap: `:quota_exceeded`), the slot given back
  # whatever happens, and the result settled (metrics, CPU debit, denials) and reported
  # (telemetry). `meta` (`supervisor`, `tenant`, `chunk`, and for a session `session`) is the
  # telemetry metadata; `deadline` is monotonic ms or nil. Refusals come back as they are.
  @spec admitted(:run | :session, map, timeout, integer | nil, (integer | nil -> result)) ::
          result
        when result: {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def admitted(what, %{supervisor: sup, tenant: tenant} = meta, queue_timeout, deadline, fun) do
    telemetry? = Telemetry.enabled?()
    t0 = if telemetry?, do: :erlang.monotonic_time()

    case Slots.admit(sup, tenant, queue_wait(queue_timeout, deadline)) do
      {:ok, slot, cap_ms, queued_us} ->
        span = if telemetry?, do: Telemetry.start(what, t0, queued_us, meta)

        result =
          try do
            capped(fun, deadline, cap_ms)
          after
            Slots.checkin(slot)
          end

        Slots.settle(slot, tenant, meta.chunk, result)
        if span, do: Telemetry.stop(span, result)
        result

      refused ->
        refused
    end
  end

  # The queue wait: `queue_timeout`, but never past the deadline (:infinity sorts above integers).
  defp queue_wait(wait, nil), do: wait

  defp queue_wait(wait, deadline),
    do: min(wait, max(deadline - System.monotonic_time(:millisecond), 0))

  # The CPU balance left caps the deadline (CPU time never exceeds wall time on one thread); a
  # run stopped by that cap rather than its own deadline is :quota_exceeded.
  defp capped(fun, deadline, nil), do: fun.(deadline)

  defp capped(fun, deadline, cap_ms) do
    cap = System.monotonic_time(:millisecond) + cap_ms

    if deadline != nil and deadline <= cap do
      fun.(deadline)
    else
      case fun.(cap) do
        {:error, %Error{kind: :timeout} = e} ->
          {:error,
           %{
             e
             | kind: :quota_exceeded,
               message: "the run used up its tenant's CPU-time balance (#{cap_ms} ms)"
           }}

        other ->
          other
      end
    end
  end

  @doc false
  # A task's answer known before it starts (LuaSandbox.async/2 with input it refused).
  def answer(result), do: result

  @doc false
  # run_local/2 in a task started for `owner` (LuaSandbox.async/2): the run stops if the owner dies.
  def run_for(owner, source, opts) do
    watch(owner, self())
    run_local(source, opts)
  end

  @doc false
  # Runs `source` in a task under `opts[:supervisor]` (on `opts[:node]` if given) and waits
  # at most `opts[:timeout]`; on expiry the task is killed, which stops the native run.
  # `node: :any` picks the node (LuaSandbox.Cluster).
  def run(source, opts) do
    node = opts[:node] || node()

    cond do
      node != node() and is_struct(source, Chunk) ->
        {:error, Error.new(:invalid_input, "a compiled chunk cannot be sent to another node")}

      node == :any ->
        Cluster.run(source, opts)

      true ->
        case run_on(node, source, opts) do
          {:not_started, :noconnection} ->
            {:error, unreachable(node)}

          {:not_started, :noproc} ->
            raise ArgumentError, "supervisor #{inspect(opts[:supervisor])} is not running"

          result ->
            result
        end
    end
  end

  @doc false
  # run/2 on `node`, or `{:not_started, :noconnection | :noproc}` when the node or its
  # supervisor was not there to accept the run. Input over `max_remote_bytes` is not sent.
  def run_on(node, source, opts) do
    case node != node() and Cluster.too_large(source, opts) do
      %Error{} = error -> {:error, error}
      _fits -> start_and_wait(node, source, opts)
    end
  end

  defp start_and_wait(node, source, opts) do
    caller = self()
    ref = make_ref()
    # The run keeps its timeout: the NIF stops at the deadline itself and answers :timeout
    # with the output and stats; the kill below is the backstop for time spent in tools. On
    # this node the deadline counts from now, so time queued for a scheduler counts too.
    task_opts = Keyword.merge(opts, node: nil, deadline: deadline(node, opts[:timeout]))
    sup = if node == node(), do: opts[:supervisor], else: {opts[:supervisor], node}
    started = System.monotonic_time(:microsecond)

    case start_child(sup, :task, [caller, ref, source, task_opts]) do
      {:ok, pid} ->
        mref = Process.monitor(pid)
        wait(pid, mref, ref, opts[:timeout], node, started, backstop(opts[:timeout]))

      {:error, reason} ->
        {:not_started, reason}
    end
  end

  @doc false
  def unreachable(node) do
    Error.new(:node_down, "node #{node} is not reachable", stats: Error.empty_stats())
  end

  defp start_child(sup, fun, args) do
    Task.Supervisor.start_child(sup, __MODULE__, fun, args, restart: :temporary)
  catch
    :exit, {{:nodedown, _}, _} ->
      {:error, :noconnection}

    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown, :killed] ->
      {:error, :noproc}
  end

  defp watch(caller, task) do
    spawn(fn ->
      caller_ref = Process.monitor(caller)
      task_ref = Process.monitor(task)

      receive do
        {:DOWN, ^caller_ref, _, _, _} -> Process.exit(task, :kill)
        {:DOWN, ^task_ref, _, _, _} -> :ok
      end
    end)
  end

  @doc false
  def task(caller, ref, source, opts) do
    # A caller that dies must stop the run (the NIF checks that its own process is alive):
    # a watcher kills this task then. Not a link, which would also take the caller down with a
    # remote task's node (:noconnection) or with our kill on a timeout.
    watch(caller, self())

    result =
      try do
        run_local(source, opts)
      rescue
        e -> {:error, Error.crashed("run", e)}
      end

    send(caller, {ref, result})
  end

  defp deadline(node, timeout) when node == node() and is_integer(timeout),
    do: System.monotonic_time(:millisecond) + timeout

  defp deadline(_node, _timeout), do: nil

  # How long after `timeout` the task is killed: time for the NIF's own :timeout to arrive.
  # The deadline inside the NIF and the tool kill (Runner) end every run that is executing,
  # but not a run that has not started executing: a task queued for a dirty scheduler while
  # all of them run other scripts, a run on another node that stopped answering (still
  # connected), or a step between two deadline checks that takes long (one big allocation or
  # collection). The caller's wait stays bounded only with this kill.
  defp backstop(:infinity), do: :infinity
  defp backstop(timeout), do: timeout + 500

  defp wait(pid, mref, ref, timeout, node, started, backstop) do
    receive do
      {^ref, result} ->
        Process.demonitor(mref, [:flush])
        result

      {:DOWN, ^mref, :process, ^pid, :noconnection} ->
        {:error,
         Error.new(:node_down, "node #{node} went down during the run",
           stats: stats_since(started)
         )}

      {:DOWN, ^mref, :process, ^pid, reason} ->
        # The result may already be in the mailbox if the task exited right after sending it.
        receive do
          {^ref, result} -> result
        after
          0 -> {:error, crashed(reason, node, stats_since(started))}
        end
    after
      backstop ->
        Process.exit(pid, :kill)

        receive do
          {:DOWN, ^mref, :process, ^pid, _} -> :ok
        end

        receive do
          {^ref, _late} -> :ok
        after
          0 -> :ok
        end

        {:error, Error.timeout("run", timeout, stats_since(started))}
    end
  end

  # A remote task shut down with its supervisor: the member went away mid-run, like its node.
  defp crashed(:shutdown, node, stats) when node != node() do
    Error.new(:node_down, "the supervisor on node #{node} stopped during the run", stats: stats)
  end

  defp crashed(reason, _node, stats),
    do: Error.crashed("run", reason, stats)

  # What the caller knows of a run it had to stop: the wall time; the rest stays zero.
  defp stats_since(started) do
    %{Error.empty_stats() | duration_us: System.monotonic_time(:microsecond) - started}
  end
end
