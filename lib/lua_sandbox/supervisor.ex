defmodule LuaSandbox.Supervisor do
  @moduledoc """
  A bounded supervisor for Lua runs, to put in your own tree.

      children = [
        {LuaSandbox.Supervisor, name: MyApp.Lua, max_concurrency: 8}
      ]

  then `LuaSandbox.run(source, supervisor: MyApp.Lua, timeout: 1_000)`. The application
  starts one named `LuaSandbox.TaskSupervisor` (size from `config :lua_sandbox,
  max_concurrency:`, default: dirty CPU schedulers × 4).

  Runs beyond `max_concurrency` are refused at once with `kind: :overloaded`: there is no
  queue to grow without bound.
  """

  alias LuaSandbox.{Chunk, Error, Runner}

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
  def child_spec(opts) do
    name = Keyword.fetch!(opts, :name)

    %{
      id: name,
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc """
  Starts a `Task.Supervisor` named `name` that runs at most `max_concurrency` scripts at once.
  """
  def start_link(opts) do
    opts = Keyword.validate!(opts, [:name, max_concurrency: default_max_concurrency()])
    Task.Supervisor.start_link(name: opts[:name], max_children: opts[:max_concurrency])
  end

  @doc false
  # Runs `source` in a task under `opts[:supervisor]` (on `opts[:node]` if given) and waits
  # at most `opts[:timeout]`; on expiry the task is killed, which stops the native run.
  def run(source, opts) do
    node = opts[:node] || node()

    if node != node() and is_struct(source, Chunk) do
      {:error,
       %Error{kind: :invalid_input, message: "a compiled chunk cannot be sent to another node"}}
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
    args = [caller, ref, source, task_opts]
    sup = if node == node(), do: opts[:supervisor], else: {opts[:supervisor], node}

    case start_child(sup, args) do
      {:ok, pid} ->
        mref = Process.monitor(pid)
        wait(pid, mref, ref, opts[:timeout], node, backstop(opts[:timeout]))

      {:error, :max_children} ->
        {:error,
         %Error{
           kind: :overloaded,
           message: "supervisor #{inspect(opts[:supervisor])} is at max_concurrency"
         }}

      {:error, :noconnection} ->
        {:error, %Error{kind: :node_down, message: "node #{node} is not reachable"}}

      {:error, reason} ->
        {:error,
         %Error{kind: :overloaded, message: "could not start the run: #{inspect(reason)}"}}
    end
  end

  defp start_child(sup, args) do
    Task.Supervisor.start_child(sup, __MODULE__, :task, args, restart: :temporary)
  catch
    :exit, {{:nodedown, _}, _} -> {:error, :noconnection}
    :exit, {:noproc, _} -> {:error, :noproc}
    :exit, reason -> {:error, reason}
  end

  @doc false
  def task(caller, ref, source, opts) do
    send(caller, {ref, Runner.run(source, opts)})
  end

  defp deadline(node, timeout) when node == node() and is_integer(timeout),
    do: System.monotonic_time(:millisecond) + timeout

  defp deadline(_node, _timeout), do: nil

  # How long after `timeout` the task is killed: time for the NIF's own :timeout to arrive.
  defp backstop(:infinity), do: :infinity
  defp backstop(timeout), do: timeout + 500

  defp wait(pid, mref, ref, timeout, node, backstop) do
    receive do
      {^ref, result} ->
        Process.demonitor(mref, [:flush])
        result

      {:DOWN, ^mref, :process, ^pid, :noconnection} ->
        {:error, %Error{kind: :node_down, message: "node #{node} went down during the run"}}

      {:DOWN, ^mref, :process, ^pid, reason} ->
        # The result may already be in the mailbox if the task exited right after sending it.
        receive do
          {^ref, result} -> result
        after
          0 -> {:error, %Error{kind: :runtime, message: "run crashed: #{inspect(reason)}"}}
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

        {:error, %Error{kind: :timeout, message: Runner.timeout_message(timeout)}}
    end
  end
end
