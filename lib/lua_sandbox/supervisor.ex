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
  without `timeout:` stays in the calling process and holds a slot (a small child process
  that lives as long as the run, or its caller) for its duration; a run with `timeout:` runs in
  a task under the supervisor. `LuaSandbox.run/2` beyond the bound is refused at once with
  `kind: :overloaded` — there is no queue to grow without bound; `LuaSandbox.async_stream/2`
  waits for a free slot instead. A `supervisor:` that is not running is an `ArgumentError`.
  """

  alias LuaSandbox.{Chunk, Error, Runner}
  alias LuaSandbox.Supervisor.Slots

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
  `default_max_concurrency/0`).
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    opts = Keyword.validate!(opts, [:name, max_concurrency: default_max_concurrency()])

    unless is_atom(opts[:name]) and opts[:name] not in [nil, true, false] do
      raise ArgumentError, "name must be an atom, got: #{inspect(opts[:name])}"
    end

    unless is_integer(opts[:max_concurrency]) and opts[:max_concurrency] > 0 do
      raise ArgumentError,
            "max_concurrency must be a positive integer, got: #{inspect(opts[:max_concurrency])}"
    end

    children = [
      {Slots, {opts[:name], opts[:max_concurrency]}},
      # Unbounded: the bound is the slots', which every run takes wherever it runs.
      {Task.Supervisor, name: opts[:name]}
    ]

    Supervisor.start_link(children, strategy: :one_for_all)
  end

  @doc """
  How many runs hold a slot of the supervisor `name` right now (at most its
  `max_concurrency`). Raises `ArgumentError` if it is not running.
  """
  @spec running(atom) :: non_neg_integer
  def running(name), do: Slots.count(name)

  @doc false
  # Runs `source` in the calling process while holding a slot of `opts[:supervisor]`.
  @spec run_local(LuaSandbox.source(), keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def run_local(source, opts) do
    case run_in_slot(source, opts) do
      :full -> {:error, overloaded(opts[:supervisor])}
      result -> result
    end
  end

  @doc false
  # run_local/2 in a task started for `owner` (LuaSandbox.async/2): the run stops if the owner dies.
  def run_for(owner, source, opts) do
    watch(owner, self())
    run_local(source, opts)
  end

  @doc false
  # Like run_local/2, but waits (with backoff) for a free slot instead of answering
  # :overloaded; used by LuaSandbox.async_stream/2, whose own timeout bounds the wait.
  def run_queued(source, opts, backoff \\ 1) do
    case run_in_slot(source, opts) do
      :full ->
        Process.sleep(backoff)
        run_queued(source, opts, min(backoff * 2, 20))

      result ->
        result
    end
  end

  # The run, holding one of its supervisor's slots while it runs; `:full` without running.
  defp run_in_slot(source, opts) do
    case Slots.checkout(opts[:supervisor]) do
      {:ok, slot} ->
        try do
          Runner.run(source, opts)
        after
          Slots.checkin(slot)
        end

      :full ->
        :full
    end
  end

  @doc false
  # Runs `source` in a task under `opts[:supervisor]` (on `opts[:node]` if given) and waits
  # at most `opts[:timeout]`; on expiry the task is killed, which stops the native run.
  def run(source, opts) do
    node = opts[:node] || node()

    if node != node() and is_struct(source, Chunk) do
      {:error, Error.new(:invalid_input, "a compiled chunk cannot be sent to another node")}
    else
      start_and_wait(node, source, opts)
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

      {:error, :noconnection} ->
        {:error, Error.new(:node_down, "node #{node} is not reachable")}
    end
  end

  @doc false
  def overloaded(sup) do
    Error.new(:overloaded, "supervisor #{inspect(sup)} is at max_concurrency")
  end

  defp start_child(sup, fun, args) do
    Task.Supervisor.start_child(sup, __MODULE__, fun, args, restart: :temporary)
  catch
    :exit, {{:nodedown, _}, _} ->
      {:error, :noconnection}

    :exit, {:noproc, _} ->
      raise ArgumentError, "supervisor #{inspect(sup)} is not running"

    :exit, {reason, _} when reason in [:normal, :shutdown, :killed] ->
      raise ArgumentError, "supervisor #{inspect(sup)} is not running"
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
          0 ->
            {:error, Error.crashed("run", reason, stats_since(started))}
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

  # What the caller knows of a run it had to stop: the wall time; the rest stays zero.
  defp stats_since(started) do
    %{Error.empty_stats() | duration_us: System.monotonic_time(:microsecond) - started}
  end
end
