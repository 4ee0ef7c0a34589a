defmodule LuaSandbox.Session.Worker do
  @moduledoc false
  # A session on an `isolation: :process` supervisor: its state lives in a jailed worker OS
  # process of its own (not one of the pool's run workers), started from the pool's binary,
  # for the session's life (native/lua_sandbox_worker/src/session.rs). This module is both
  # halves of that: the client functions a call runs in its caller (through
  # LuaSandbox.Worker's request/3, which takes a `{:session, pid, gen}` target), and the
  # server functions LuaSandbox.Session's process calls on its `worker` state.
  #
  # The session process owns the port, not the caller: a caller's death does not close it.
  # A call's frames go through the session process (one hop each way). When the caller that
  # holds the session dies mid-call (in Lua, or parked at a tool), the session process sends
  # `:cancel`: the worker stops the call at its next budget tick (or drops it where it is
  # parked), rolls it back, and answers `:cancelled`; only then is the session handed on.
  #
  # A worker that dies (a signal, its jail's seccomp kill) answers the call in progress
  # `:worker_crashed` naming how it died, and the session restarts in a new worker from its
  # start options (as a supervisor restarts a child: the state of before is lost);
  # `gen` counts the workers, so a call that spans a restart answers `:worker_crashed` too.

  alias LuaSandbox.{Error, Runner, Worker}
  alias LuaSandbox.Supervisor.Workers

  require Logger

  @boot_timeout 10_000

  @doc """
  Starts a worker for a session of pool `pool` and builds the session's state in it:
  `{:ok, worker}` (its port owned by the calling process until `hand_over/2`) or
  `{:error, %Error{}}` (a module that does not load, a global that cannot go in, no worker).
  """
  @spec boot(pid, map) :: {:ok, map} | {:error, Error.t()}
  def boot(pool, native_opts) do
    {path, pool_memory} = Workers.spec(pool)
    # The worker's arena is sized for the session's max_memory, within the pool's bound (a
    # session asking for more is refused by the worker, as a run is).
    memory = min(native_opts.max_memory, pool_memory)
    opts = Worker.run_opts(native_opts)

    with {:ok, port, os_pid, _layers} <- Worker.start(path, memory) do
      worker = %{
        port: port,
        os_pid: os_pid,
        path: path,
        memory: memory,
        opts: opts,
        gen: 0,
        # the session's print: {:send, ...}: its calls' streamed output, sent on from here
        print: Worker.forward(native_opts.print_pid, native_opts.print_tag)
      }

      case Worker.request(port, {:session_new, opts}, @boot_timeout) do
        {:ok, :ok} ->
          {:ok, worker}

        {:ok, {:error, {_, _, _, _, _}, _, _} = failed} ->
          Worker.close(port)
          Runner.drive(failed, %{}, [])

        other ->
          Worker.close(port)
          {:error, Error.new(:worker_crashed, "the session's worker failed: #{inspect(other)}")}
      end
    else
      {:error, reason} -> {:error, Error.new(:overloaded, "no worker process: " <> reason)}
    end
  end

  @doc "Makes session process `pid` the owner of the worker's port (see `await_hand_over/1`)."
  @spec hand_over(map, pid) :: :ok
  def hand_over(worker, pid) do
    Port.connect(worker.port, pid)
    Process.unlink(worker.port)
    send(pid, {:port_handed, worker.port})
    :ok
  end

  @doc """
  In the session process, before it serves anything: waits for `hand_over/2`.

  The port is linked to its owner (so the worker goes with the session), and a port that
  closes abnormally (`:epipe` when written to after its worker died) would kill the session
  with it. So the session traps exits (it is started unlinked and links to its starter in
  `init/1`, so that the starter's exit reaches it as a message too): its port's exit restarts
  the worker, and any other linked process's abnormal exit ends the session as it would
  without trapping, silently (`exit_signal/2`).
  """
  @spec await_hand_over(map) :: map
  def await_hand_over(%{port: port} = worker) do
    receive do
      {:port_handed, ^port} -> Map.merge(worker, %{call: nil, parked: false, cancelling: nil})
    end
  end

  ## Client (in the caller holding the session)

  @doc """
  Sends `request` through session process `pid` to its worker of generation `gen` and waits
  for the answer, as `LuaSandbox.Worker.request/3` does for a port.
  """
  @spec request(pid, non_neg_integer, term, timeout) ::
          {:ok, term} | {:error, Error.t()} | :timeout
  def request(pid, gen, request, timeout) do
    GenServer.call(pid, {:worker_request, gen, request}, timeout)
  catch
    :exit, {:timeout, _} -> :timeout
    :exit, _ -> {:error, Error.new(:worker_crashed, "the session stopped during the call")}
  end

  @doc "Runs a session call in the worker; answers like `LuaSandbox.Worker.run/4`."
  @spec run({:session, pid, non_neg_integer}, binary | nil, map, integer | nil) :: tuple
  def run(target, source, call_opts, deadline),
    do: Worker.step(target, {:session_run, source, call_opts}, {deadline, nil})

  ## Server (in the session process)

  @doc "Forwards a caller's request to the worker; the answer comes back in `port_message/2`."
  def forward(worker, from, gen, request) do
    cond do
      gen != worker.gen ->
        GenServer.reply(from, {:error, restarted()})
        worker

      true ->
        id = System.unique_integer([:positive])

        try do
          Port.command(
            worker.port,
            :erlang.term_to_binary({id, with_state_opts(worker, request)})
          )

          %{worker | call: {from, id}}
        rescue
          # the port closed: its exit status is on the way (port_message/2 answers then)
          ArgumentError -> %{worker | call: {from, id}}
        end
    end
  end

  # A call's options are the per-call ones; the worker reads a run's whole map, whose
  # state-wide part (limits, chunk name, print) is the session's.
  # A compiled chunk crosses as its bytecode (LuaSandbox.Worker.wire/1), as a run's does.
  defp with_state_opts(worker, {:session_run, source, call_opts}) do
    opts = Map.merge(%{worker.opts | tools: [], modules: []}, call_opts)
    {:session_run, if(source, do: Worker.wire(source)), opts}
  end

  defp with_state_opts(_worker, request), do: request

  @doc """
  A message from the worker's port: `{:answered | :free | :restarted | :ignored, worker}`;
  `:free` when a cancelled call has ended (the session can be handed on), `:restarted` when
  the worker died and a new one holds the session's start state.
  """
  def port_message(worker, {:data, frame}) do
    case Worker.decode(frame) do
      # the call's streamed output, ahead of its answer (print: {:send, ...})
      {id, {:print, bytes}}
      when is_tuple(worker.call) and elem(worker.call, 1) == id and is_binary(bytes) and
             worker.print != nil ->
        worker.print.(bytes)
        {:ignored, worker}

      {id, answer} when is_tuple(worker.call) and elem(worker.call, 1) == id ->
        GenServer.reply(elem(worker.call, 0), {:ok, answer})
        {:answered, %{worker | call: nil, parked: match?({:tool_call, _, _}, answer)}}

      {id, :cancelled} when id == worker.cancelling ->
        {:free, %{worker | cancelling: nil, call: nil, parked: false}}

      # the answer of a call whose caller died (cancelled meanwhile)
      _ ->
        {:ignored, worker}
    end
  end

  def port_message(worker, {:exit_status, status}),
    do: died(worker, Worker.describe_exit(status))

  # The worker is gone (`how` says how): the call in progress answers :worker_crashed, and a
  # new worker holds the session's start state.
  defp died(worker, how) do
    case worker.call do
      {from, _id} -> GenServer.reply(from, {:error, Error.worker_crashed(worker.os_pid, how)})
      nil -> :ok
    end

    Logger.warning(
      "LuaSandbox.Session: worker os pid #{worker.os_pid} #{how}; " <>
        "the session restarts from its start options"
    )

    {:restarted, restart(worker)}
  end

  @doc """
  The caller holding the session let go of it (it died, or checked in mid-call): a call in
  progress is cancelled. `{:free, worker}` when nothing was in progress, else
  `{:cancelling, worker}` (the session waits for `:free` from `port_message/2`).
  """
  def release(%{call: nil, parked: false} = worker), do: {:free, worker}

  def release(worker) do
    id = System.unique_integer([:positive])

    try do
      Port.command(worker.port, :erlang.term_to_binary({id, :cancel}))
      {:cancelling, %{worker | cancelling: id, call: nil}}
    rescue
      ArgumentError -> {:free, restart(worker)}
    end
  end

  @doc """
  An exit signal the session process trapped: `{:restarted, worker}` when its port closed
  abnormally (its worker is gone; no exit status follows then), `:ignore` for a normal exit or
  an old port's; any other kills the session with its reason, as it would untrapped.
  """
  def exit_signal(_worker, {:EXIT, _from, :normal}), do: :ignore

  def exit_signal(%{port: port} = worker, {:EXIT, port, reason}),
    do: died(worker, "its port closed (#{inspect(reason)})")

  def exit_signal(_worker, {:EXIT, from, _reason}) when is_port(from), do: :ignore

  def exit_signal(worker, {:EXIT, _from, reason}) do
    # as an untrapped exit signal would: no terminate/2, no error report
    Worker.close(worker.port)
    Process.flag(:trap_exit, false)
    Process.exit(self(), reason)
    :ignore
  end

  @doc "A caller gave the worker up as broken (no answer within its deadline): a new one."
  def broken(worker, gen) when gen == worker.gen do
    Worker.close(worker.port)
    restart(worker)
  end

  def broken(worker, _gen), do: worker

  @doc "The session's `info` from the worker, or `%{busy: true}` during a call."
  def info(%{call: nil, parked: false, cancelling: nil} = worker) do
    case Worker.request(worker.port, :session_info, @boot_timeout) do
      {:ok, {:ok, info}} when is_map(info) -> {Map.put(info, :os_pid, worker.os_pid), worker}
      {:ok, :busy} -> {%{busy: true, os_pid: worker.os_pid}, worker}
      # it died (this took its exit status) or hangs: a new one, as port_message/2 does
      _ -> {%{busy: true, os_pid: worker.os_pid}, restart(worker)}
    end
  end

  def info(worker), do: {%{busy: true, os_pid: worker.os_pid}, worker}

  @doc "Closes the worker (the session stops)."
  def close(worker), do: Worker.close(worker.port)

  # A new worker with the session's start state; raises (stopping the session) if it cannot.
  defp restart(worker) do
    Worker.close(worker.port)

    with {:ok, port, os_pid, _} <- Worker.start(worker.path, worker.memory),
         {:ok, :ok} <- Worker.request(port, {:session_new, worker.opts}, @boot_timeout) do
      %{worker | port: port, os_pid: os_pid, gen: worker.gen + 1, call: nil, parked: false}
      |> Map.put(:cancelling, nil)
    else
      other -> exit({:session_worker_restart_failed, other})
    end
  end

  defp restarted,
    do:
      Error.new(:worker_crashed, "the session's worker died during this call (restarted)",
        stats: Error.empty_stats()
      )
end
