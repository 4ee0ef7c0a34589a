defmodule LuaSandbox.Supervisor.Workers do
  @moduledoc false
  # The pool of jailed worker OS processes of a supervisor started with `isolation: :process`:
  # `capacity` workers (its max_concurrency, so a run admitted by Slots finds one) and one
  # spare, each an Erlang port owned by this process (LuaSandbox.Worker). The spare is why a
  # worker that dies or is given up (its caller was killed) costs no run a boot: while its
  # replacement boots in the background (~1.7 ms, most of it the kernel's process creation,
  # exec and namespaces: bench/ANALYSIS.md), `capacity` workers are still booted.
  #
  # A caller checks a worker out (its port is connected to the caller for the time, so answers
  # reach it without a hop through here; this process stays linked to the port, the caller is
  # not: checkout/1), talks to it, and checks it in. A worker whose caller died while holding
  # it (this process monitors the caller), or that the caller gives back as broken (a request
  # that timed out), is closed (it exits when it sees the hangup) and replaced: it is in an
  # unknown state. A worker that dies (a crash, its jail's seccomp kill, a signal from
  # outside) is replaced in the background; its caller, if it had one, answers
  # `:worker_crashed` itself from the port's exit status.
  #
  # The first workers are started in init/1, so start_link fails (with the reason) when the
  # binary is missing or its jail cannot be applied, and warns once per layer not in force.

  use GenServer
  require Logger

  alias LuaSandbox.Worker

  @retry_ms 1_000
  @spares 1
  @checkout_timeout 10_000

  def child_spec({name, _capacity, _path, _memory} = arg),
    do: %{id: {__MODULE__, name}, start: {__MODULE__, :start_link, [arg]}, shutdown: 5_000}

  def start_link(arg), do: GenServer.start_link(__MODULE__, arg)

  @doc "The pool of supervisor `sup`, or nil when `sup` runs scripts in the NIF."
  @spec whereis(atom) :: pid | nil
  def whereis(sup), do: :persistent_term.get({__MODULE__, sup}, nil)

  @doc """
  Takes an idle worker of the pool `pool` for the calling process, waiting for one that is
  booting if none is idle: `{:ok, port}` (connected to the caller) or `{:error, reason}`.
  """
  @spec checkout(pid) :: {:ok, port} | {:error, String.t()}
  def checkout(pool) do
    case GenServer.call(pool, :checkout, @checkout_timeout) do
      {:ok, port} = ok ->
        # `Port.connect/2` links the new owner to the port. Unlinked, the caller is never
        # killed by the port's exit (the pool stopping mid-run), and its own exit never closes
        # a worker it gave back long ago (before: any past caller's :shutdown or crash took the
        # worker down mid-run of the next one). Its death mid-use is the pool's monitor's to
        # handle (the worker is closed and replaced).
        Process.unlink(port)
        ok

      error ->
        error
    end
  catch
    :exit, {:timeout, _} -> {:error, "no worker became free within #{@checkout_timeout} ms"}
    :exit, _ -> {:error, "the worker pool stopped"}
  end

  @doc """
  Gives `port` back: `:ok` to reuse it, `:broken` to have it killed and replaced.
  A worker that died meanwhile is the pool's to replace either way.
  """
  @spec checkin(pid, port, :ok | :broken) :: :ok
  def checkin(pool, port, status) do
    status =
      try do
        if status == :ok, do: Port.connect(port, pool)
        status
      rescue
        # the port closed meanwhile: the worker died
        ArgumentError -> :broken
      end

    # The caller unlinked at checkout; connecting back leaves it linked as the old owner.
    Process.unlink(port)

    GenServer.cast(pool, {:checkin, port, status})
  end

  @doc "The binary path and `worker_max_memory` of pool `pool` (a session starts its own worker)."
  @spec spec(pid) :: {Path.t(), pos_integer}
  def spec(pool), do: GenServer.call(pool, :spec)

  @doc """
  The pool's workers (`os_pid`, `runs`, `rss`), the layers they reported at boot, and the
  workers of its sessions (`os_pid`, `runs`: calls answered, `rss`, `sessions`: the pids of the
  session and its forks whose states it holds; `LuaSandbox.Session.Worker`).
  """
  @spec info(pid) :: %{
          workers: [map],
          session_workers: [map],
          layers: [{atom, Worker.layer_state()}]
        }
  def info(pool) do
    %{workers: workers, families: families, layers: layers} = GenServer.call(pool, :info)

    %{
      layers: layers,
      workers: for(w <- workers, do: Map.put(w, :rss, Worker.rss(w.os_pid))),
      session_workers:
        families
        |> Enum.flat_map(&LuaSandbox.Session.Worker.describe/1)
        |> Enum.sort_by(& &1.os_pid)
    }
  end

  @doc "Counts the process of a session's worker (a family) among the pool's, while it lives."
  @spec enroll(pid, pid) :: :ok
  def enroll(pool, family), do: GenServer.cast(pool, {:enroll, family})

  @impl true
  def init({name, capacity, path, memory}) do
    Process.flag(:trap_exit, true)

    state = %{
      name: name,
      path: path,
      memory: memory,
      workers: %{},
      idle: [],
      waiting: :queue.new(),
      # the processes of its sessions' workers (enroll/2), each monitored
      families: %{},
      layers: []
    }

    case boot_all(state, capacity + @spares) do
      {:ok, state} ->
        for {layer, why} <- Worker.missing(state.layers) do
          Logger.warning(
            "LuaSandbox.Supervisor #{inspect(name)}: worker jail layer #{layer} not in force: #{why}"
          )
        end

        :persistent_term.put({__MODULE__, name}, self())
        {:ok, state}

      {:error, reason, state} ->
        Enum.each(Map.keys(state.workers), &Worker.close/1)
        {:stop, {:worker_boot_failed, reason}}
    end
  end

  defp boot_all(state, 0), do: {:ok, state}

  defp boot_all(state, n) do
    case Worker.start(state.path, state.memory) do
      {:ok, port, os_pid, layers} ->
        state = %{state | layers: layers}
        boot_all(add_idle(state, port, os_pid), n - 1)

      {:error, reason} ->
        {:error, reason, state}
    end
  end

  defp add_idle(state, port, os_pid) do
    entry = %{os_pid: os_pid, runs: 0, use: :idle}
    %{state | workers: Map.put(state.workers, port, entry)} |> idle(port)
  end

  # `port` is free: to the first caller waiting, else to the idle list.
  defp idle(state, port) do
    case :queue.out(state.waiting) do
      {{:value, {pid, _tag} = from}, waiting} ->
        state = %{state | waiting: waiting}

        if Process.alive?(pid) do
          {reply, state} = lend(state, port, pid)
          GenServer.reply(from, reply)
          state
        else
          idle(state, port)
        end

      {:empty, _} ->
        state = put_in(state.workers[port].use, :idle)
        %{state | idle: [port | state.idle]}
    end
  end

  defp lend(state, port, pid) do
    Port.connect(port, pid)
    mref = Process.monitor(pid)
    state = update_in(state.workers[port], &%{&1 | use: {:busy, pid, mref}, runs: &1.runs + 1})
    {{:ok, port}, state}
  rescue
    # the port closed just now: its exit is on the way; try the next one
    ArgumentError -> lend_next(drop(state, port), pid)
  end

  defp lend_next(%{idle: [port | rest]} = state, pid), do: lend(%{state | idle: rest}, port, pid)
  defp lend_next(state, _pid), do: {{:error, "no worker is alive"}, state}

  @impl true
  def handle_call(:checkout, {pid, _} = from, state) do
    case state.idle do
      [port | rest] ->
        {reply, state} = lend(%{state | idle: rest}, port, pid)
        {:reply, reply, state}

      [] ->
        {:noreply, %{state | waiting: :queue.in(from, state.waiting)}}
    end
  end

  def handle_call(:spec, _from, state), do: {:reply, {state.path, state.memory}, state}

  def handle_call(:info, _from, state) do
    workers =
      for {_port, w} <- state.workers, w.use != :booting, do: Map.take(w, [:os_pid, :runs])

    {:reply,
     %{
       workers: Enum.sort_by(workers, & &1.os_pid),
       families: Map.keys(state.families),
       layers: state.layers
     }, state}
  end

  @impl true
  def handle_cast({:enroll, family}, state),
    do: {:noreply, put_in(state.families[family], Process.monitor(family))}

  def handle_cast({:checkin, port, status}, state) do
    case state.workers[port] do
      %{use: {:busy, _pid, mref}} ->
        Process.demonitor(mref, [:flush])

        if status == :ok,
          do: {:noreply, idle(state, port)},
          else: {:noreply, replace(state, port)}

      _gone ->
        {:noreply, state}
    end
  end

  @impl true
  # A caller died holding a worker: it may be mid-request, so it is not reused.
  def handle_info({:DOWN, mref, :process, pid, _reason}, state) do
    case Enum.find(state.workers, fn {_p, w} -> match?({:busy, _, ^mref}, w.use) end) do
      {port, _} -> {:noreply, replace(state, port)}
      # a session's worker gone
      nil -> {:noreply, %{state | families: Map.delete(state.families, pid)}}
    end
  end

  def handle_info({port, {:data, frame}}, state) when is_port(port) do
    case state.workers[port] do
      %{use: :booting} ->
        case Worker.boot(port, {:data, frame}) do
          {:ok, _layers} -> {:noreply, idle(state, port)}
          {:error, reason} -> {:noreply, failed(state, port, reason)}
        end

      _ ->
        # an idle worker speaks only when asked: it is not to be trusted any more
        {:noreply, replace(state, port)}
    end
  end

  # An idle or booting worker died (the pool is its connected process).
  def handle_info({port, {:exit_status, status}}, state) when is_port(port) do
    case state.workers[port] do
      nil ->
        {:noreply, state}

      %{use: :booting} ->
        {:noreply, retry(drop(state, port), "exited at boot: " <> Worker.describe_exit(status))}

      w ->
        Logger.warning(
          "LuaSandbox.Supervisor #{inspect(state.name)}: worker os pid #{w.os_pid} " <>
            Worker.describe_exit(status)
        )

        {:noreply, state |> drop(port) |> respawn()}
    end
  end

  # A worker's port closed (it died while lent: its caller had the exit status).
  def handle_info({:EXIT, port, _reason}, state) when is_port(port) do
    if Map.has_key?(state.workers, port),
      do: {:noreply, state |> drop(port) |> respawn()},
      else: {:noreply, state}
  end

  def handle_info(:respawn, state), do: {:noreply, respawn(state)}

  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Enum.each(Map.keys(state.workers), &Worker.close/1)
  end

  defp replace(state, port) do
    Worker.close(port)
    state |> drop(port) |> respawn()
  end

  defp drop(state, port) do
    case Map.pop(state.workers, port) do
      {%{use: {:busy, _pid, mref}}, workers} ->
        Process.demonitor(mref, [:flush])
        %{state | workers: workers}

      {_, workers} ->
        %{state | workers: workers, idle: List.delete(state.idle, port)}
    end
  end

  # One new worker, booting in the background: its boot frame arrives as a port message.
  defp respawn(state) do
    case Worker.open(state.path, state.memory) do
      {:ok, port} ->
        entry = %{os_pid: Worker.os_pid(port), runs: 0, use: :booting}
        %{state | workers: Map.put(state.workers, port, entry)}

      {:error, reason} ->
        retry(state, reason)
    end
  end

  defp failed(state, port, reason) do
    Worker.close(port)
    retry(drop(state, port), reason)
  end

  defp retry(state, reason) do
    Logger.error(
      "LuaSandbox.Supervisor #{inspect(state.name)}: a worker could not start (#{reason}); " <>
        "trying again in #{@retry_ms} ms"
    )

    Process.send_after(self(), :respawn, @retry_ms)
    state
  end
end
