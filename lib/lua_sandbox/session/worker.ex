defmodule LuaSandbox.Session.Worker do
  @moduledoc false
  # A session on an `isolation: :process` supervisor: its state lives in a jailed worker OS
  # process (not one of the pool's run workers), started from the pool's binary, with the states
  # of its forks (native/lua_sandbox_worker/src/session.rs `Family`): a Lua state works only at
  # the address it was built at, and ASLR puts each worker's C functions elsewhere, so a fork's
  # state stays in its origin's worker, where the members take turns in one arena as a NIF
  # session and its forks do. This module is the three parts of that:
  #
  #   * the family's process (a GenServer, one per family, started at the session's start and
  #     stopped when its last member is gone), which owns the worker's port and is the one
  #     writer to it: it numbers the members, sends a member's call only while no other
  #     member's call is in progress or parked at a tool (else it answers `:arena_busy` and
  #     the caller tries again until its deadline, as `LuaSandbox.Session`'s `when_free` does
  #     for the NIF's arena), and sends `:cancel` only for the call in progress;
  #   * the functions a member's session process calls (its `worker` state: the family's pid,
  #     its member number, the worker generation it knows, whether a cancel is in progress);
  #   * the client functions a call runs in its caller (through LuaSandbox.Worker's request/3,
  #     which takes a `{:session, pid, gen}` target): a call's frames go caller → session
  #     process (which checks that the caller holds the session) → family process → worker,
  #     and the answer straight back to the caller.
  #
  # When the caller holding a session dies mid-call (in Lua, or parked at a tool), its session
  # process releases the call (`release/1`): the family sends `:cancel`, the worker stops the
  # call at its next budget tick (or drops it where it is parked), rolls it back and answers
  # `:cancelled`; the family then tells the session (`{:member_free, pid}`), which only then
  # hands itself on.
  #
  # A worker that dies (a signal, its jail's seccomp kill) answers the call in progress
  # `:worker_crashed` naming how it died, and every member of the family restarts in a new
  # worker from the session's start options (as a supervisor restarts a child: the states of
  # before are lost); `gen` counts the workers, so a call that spans a restart answers
  # `:worker_crashed` too.
  #
  # The members' handles (LuaSandbox.Worker.Handles) live in the family's process, a table per
  # member: every frame passes through it, so it swaps them both ways and follows each call's
  # end (its answer, the late answer of a call whose caller died: `orphan`, or `:cancelled` for
  # one dropped at a tool) to forget a rolled-back call's handles as the worker rolls it back.
  # A fork's table starts as a copy of its origin's (the state it copies holds those handles);
  # a restart keeps each member's start handles only.

  use GenServer

  alias LuaSandbox.{Error, Runner, Worker}
  alias LuaSandbox.Supervisor.Workers
  alias LuaSandbox.Worker.Handles

  require Logger

  @boot_timeout 10_000

  ## Session process side

  @doc """
  Starts a family's process and its worker for a session of pool `pool`, and builds the
  session's state in it (member 0): `{:ok, worker}` (the session's `worker` state, for the
  session process to `join/1`) or `{:error, %Error{}}` (a module that does not load, a global
  that cannot go in, no worker). Until a member joins, the family lives as long as the caller.
  """
  @spec boot(pid, map) :: {:ok, map} | {:error, Error.t()}
  def boot(pool, native_opts) do
    {path, pool_memory} = Workers.spec(pool)
    # The worker's arena is sized for the session's max_memory, within the pool's bound (a
    # session asking for more is refused by the worker, as a run is).
    memory = min(native_opts.max_memory, pool_memory)
    # the session's start handles: their terms stay in the family's process
    {{:session_new, opts}, handles} =
      Handles.wire({:session_new, Worker.run_opts(native_opts)}, Handles.new())

    spec = %{
      pool: pool,
      path: path,
      memory: memory,
      opts: opts,
      start_handles: handles,
      # the session's print: {:send, ...}: its calls' streamed output, sent on from the family
      print: Worker.forward(native_opts.print_pid, native_opts.print_tag),
      starter: self()
    }

    case GenServer.start(__MODULE__, spec) do
      {:ok, family} ->
        {:ok, member(family, 0, 0)}

      {:error, {:boot, %Error{} = error}} ->
        {:error, error}

      {:error, other} ->
        {:error, Error.new(:worker_crashed, "no session worker: #{inspect(other)}")}
    end
  end

  defp member(family, member, gen),
    do: %{family: family, member: member, gen: gen, cancelling: false}

  @doc """
  In the member's session process, as it starts: the family watches it from now on (its exit
  is the member's end) and the session watches the family (its end is the session's).
  """
  @spec join(map) :: map
  def join(worker) do
    :ok = GenServer.call(worker.family, {:join, worker.member, self()}, :infinity)
    Process.monitor(worker.family)
    worker
  end

  @doc "Forwards a caller's request to the worker; the family answers the caller."
  @spec forward(map, GenServer.from(), non_neg_integer, term) :: map
  def forward(worker, from, gen, request) do
    send(worker.family, {:request, worker.member, from, gen, request})
    worker
  end

  @doc """
  The caller holding the session let go of it (it died, or checked in mid-call): a call of
  this member in progress is cancelled. `{:free, worker}` when nothing was in progress, else
  `{:cancelling, worker}` (the session waits for `{:member_free, family}`: `member_free/1`).
  """
  @spec release(map) :: {:free | :cancelling, map}
  def release(worker) do
    case GenServer.call(worker.family, {:release, worker.member}, :infinity) do
      :free -> {:free, worker}
      :cancelling -> {:cancelling, %{worker | cancelling: true}}
    end
  end

  @doc "The family's message that a cancelled call of this member has ended."
  @spec member_free(map) :: map
  def member_free(worker), do: %{worker | cancelling: false}

  @doc "The family's message that a new worker (generation `gen`) holds the members."
  @spec restarted(map, non_neg_integer) :: map
  def restarted(worker, gen), do: %{worker | gen: gen, cancelling: false}

  @doc "A caller gave the worker up as broken (no answer within its deadline): a new one."
  @spec broken(map, non_neg_integer) :: map
  def broken(worker, gen) do
    GenServer.cast(worker.family, {:broken, gen})
    worker
  end

  @doc "The member's `info` from the worker (with its `os_pid`), or `%{busy: true}` during a call."
  @spec info(map) :: map
  def info(worker), do: GenServer.call(worker.family, {:info, worker.member}, :infinity)

  @doc """
  What `LuaSandbox.Supervisor.info/1` lists of family process `family`: `[%{os_pid:, runs:,
  rss:, sessions:}]`, or `[]` when it is gone or does not answer within a second.
  """
  @spec describe(pid) :: [map]
  def describe(family) do
    [GenServer.call(family, :describe, 1_000)]
  catch
    :exit, _ -> []
  end

  @doc "The member leaves the family (its session stops); the last one closes the worker."
  @spec close(map) :: :ok
  def close(worker), do: GenServer.cast(worker.family, {:leave, worker.member, self()})

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

  @doc """
  Runs a session call in the worker; answers like `LuaSandbox.Worker.run/4`, or `:arena_busy`
  while a call of another member of the family has the arena (try again).
  """
  @spec run({:session, pid, non_neg_integer}, binary | reference | nil, map, integer | nil) ::
          tuple | :arena_busy
  def run(target, source, call_opts, deadline) do
    case Worker.step(target, {:session_run, source, call_opts}, {deadline, nil, nil}) do
      {:worker, _, _, :arena_busy} -> :arena_busy
      step -> step
    end
  end

  @doc """
  Forks the session the caller holds: `{:ok, worker}` (the fork's `worker` state, for its
  session process to `join/1`), `:arena_busy` (try again), the worker's error answer (a
  `:memory_limit` when the copy does not fit its address space: no fork, the worker and the
  family as they were), or `{:error, %Error{}}`.
  """
  @spec fork({:session, pid, non_neg_integer}) ::
          {:ok, map} | :arena_busy | {:error, tuple, binary, map} | {:error, Error.t()}
  def fork({:session, pid, gen}) do
    case request(pid, gen, :session_fork, :infinity) do
      {:ok, {:forked, family, member, gen}} -> {:ok, member(family, member, gen)}
      {:ok, :arena_busy} -> :arena_busy
      {:ok, {:error, {_, _, _, _, _}, _, _} = refused} -> refused
      {:ok, other} -> {:error, Error.new(:worker_crashed, "the fork failed: #{inspect(other)}")}
      {:error, %Error{}} = error -> error
    end
  end

  ## The family's process

  @impl true
  def init(spec) do
    # its port's abnormal close (:epipe on a write to a dead worker) is a message, not its end
    Process.flag(:trap_exit, true)

    case start_worker(spec) do
      {:ok, port, os_pid} ->
        :ok = Workers.enroll(spec.pool, self())

        {:ok,
         Map.merge(spec, %{
           port: port,
           os_pid: os_pid,
           gen: 0,
           # member => {pid, monitor}: the session processes, or a fork's caller until its
           # session joins
           members: %{0 => watch(spec.starter)},
           # the members whose session process has joined (the others' watched pid is the
           # caller starting it, to whom the family sends nothing)
           joined: MapSet.new(),
           next: 1,
           # the call in progress or parked: %{member, from, id, parked}
           active: nil,
           # {member, id} of a `:cancel` sent
           cancelling: nil,
           # {member, id} of the call that `:cancel` stopped: its late answer says whether it
           # was rolled back (its handles with it)
           orphan: nil,
           # member => LuaSandbox.Worker.Handles
           handles: %{0 => spec.start_handles},
           # members gone whose state is still to be dropped (when the worker is free)
           leaving: [],
           served: 0
         })}

      {:error, %Error{} = error} ->
        {:stop, {:boot, error}}
    end
  end

  # A worker with the session's start state (member 0).
  defp start_worker(spec) do
    case Worker.start(spec.path, spec.memory) do
      {:ok, port, os_pid, _layers} ->
        case Worker.request(port, {:session_new, spec.opts}, @boot_timeout) do
          {:ok, :ok} ->
            {:ok, port, os_pid}

          {:ok, {:error, {_, _, _, _, _}, _, _} = failed} ->
            Worker.close(port)
            Runner.finish(failed, [])

          other ->
            Worker.close(port)

            {:error, Error.new(:worker_crashed, "the session's worker failed: #{inspect(other)}")}
        end

      {:error, reason} ->
        {:error, Error.new(:overloaded, "no worker process: " <> reason)}
    end
  end

  defp watch(pid), do: {pid, Process.monitor(pid)}

  @impl true
  def handle_call({:join, member, pid}, _from, s) do
    case s.members do
      %{^member => {_, mref}} ->
        Process.demonitor(mref, [:flush])
        members = Map.put(s.members, member, watch(pid))
        {:reply, :ok, %{s | members: members, joined: MapSet.put(s.joined, member)}}

      _ ->
        {:reply, {:error, :gone}, s}
    end
  end

  def handle_call({:release, member}, _from, %{active: %{member: member} = active} = s) do
    id = System.unique_integer([:positive])
    command(s.port, {id, :cancel})
    orphan = {member, active[:id]}
    {:reply, :cancelling, %{s | active: nil, cancelling: {member, id}, orphan: orphan}}
  end

  def handle_call({:release, _member}, _from, s), do: {:reply, :free, s}

  # while the worker waits for a request (as for a fork); a member whose call is parked
  # answers `:busy`
  def handle_call({:info, member}, _from, %{active: active, cancelling: nil} = s)
      when active == nil or active.parked do
    case Worker.request(s.port, {:session_info, member}, @boot_timeout) do
      {:ok, {:ok, info}} when is_map(info) ->
        {:reply, Map.put(info, :os_pid, s.os_pid), s}

      {:ok, :busy} ->
        {:reply, %{busy: true, os_pid: s.os_pid}, s}

      # it died (this took its exit status) or hangs: a new one
      _ ->
        {:reply, %{busy: true, os_pid: s.os_pid}, restart(s, "did not answer info")}
    end
  end

  def handle_call({:info, _member}, _from, s), do: {:reply, %{busy: true, os_pid: s.os_pid}, s}

  # for LuaSandbox.Supervisor.info/1 (through the pool)
  def handle_call(:describe, _from, s) do
    {:reply,
     %{
       os_pid: s.os_pid,
       runs: s.served,
       rss: Worker.rss(s.os_pid),
       sessions: for({_, {pid, _}} <- s.members, do: pid)
     }, s}
  end

  @impl true
  def handle_cast({:broken, gen}, %{gen: gen} = s) do
    Worker.close(s.port)
    {:noreply, restart(%{s | active: nil}, "was given up (no answer within a call's deadline)")}
  end

  def handle_cast({:broken, _gen}, s), do: {:noreply, s}

  def handle_cast({:leave, member, pid}, s) do
    case s.members do
      %{^member => {^pid, mref}} ->
        Process.demonitor(mref, [:flush])
        leave(s, member)

      _ ->
        {:noreply, s}
    end
  end

  @impl true
  # A call's first request (`:session_run`, `:session_fork`) runs in the worker there is now,
  # whatever the generation the caller was granted (the session may not have heard of a
  # restart yet: nothing of the call ran before it); a tool's reply only continues the call it
  # answers, parked in the same worker.
  def handle_info({:request, member, from, gen, request}, s) do
    cond do
      not Map.has_key?(s.members, member) ->
        GenServer.reply(from, {:error, restarted_error()})
        {:noreply, s}

      match?({:reply, _}, request) and gen != s.gen ->
        GenServer.reply(from, {:error, restarted_error()})
        {:noreply, s}

      true ->
        {:noreply, take_request(s, member, from, request)}
    end
  end

  def handle_info({port, {:data, frame}}, %{port: port} = s), do: {:noreply, frame(s, frame)}

  def handle_info({port, {:exit_status, status}}, %{port: port} = s),
    do: {:noreply, died(s, Worker.describe_exit(status))}

  def handle_info({:EXIT, port, reason}, %{port: port} = s),
    do: {:noreply, died(s, "its port closed (#{inspect(reason)})")}

  def handle_info({:DOWN, mref, :process, pid, _}, s) do
    case Enum.find(s.members, fn {_, watched} -> watched == {pid, mref} end) do
      {member, _} -> leave(s, member)
      nil -> {:noreply, s}
    end
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s), do: Worker.close(s.port)

  # A member's request: a call when the arena is free; a tool's reply to its own parked call;
  # a fork while the worker waits for a request (no call running: one may be parked at a tool,
  # as the NIF forks a member whose state is not in the arena); else `:arena_busy` (another
  # member's call has the arena).
  defp take_request(s, member, from, request) do
    case {s.active, s.cancelling, request} do
      {%{member: ^member, parked: true} = active, _, {:reply, _}} ->
        {request, s} = wire_handles(s, member, request)
        send_request(s, %{active | from: from, parked: false}, request)

      {active, nil, :session_fork} when active == nil or active.parked ->
        fork(s, member, from)

      {nil, nil, {:session_run, _, _}} ->
        active = %{member: member, from: from, parked: false}
        {{:session_run, source, call_opts}, s} = wire_handles(s, member, request)

        send_request(
          s,
          active,
          {:session_run, member, wire(source), with_state_opts(s, call_opts)}
        )

      {_, _, {:session_run, _, _}} ->
        GenServer.reply(from, {:ok, :arena_busy})
        s

      {_, _, :session_fork} ->
        GenServer.reply(from, {:ok, :arena_busy})
        s

      # a reply to a call the worker no longer has (it died meanwhile)
      _ ->
        GenServer.reply(from, {:error, restarted_error()})
        s
    end
  end

  # `request` with the member's handles swapped for their wire form (LuaSandbox.Worker.Handles).
  defp wire_handles(s, member, request) do
    {request, handles} = Handles.wire(request, handles_of(s, member))
    {request, put_handles(s, member, handles)}
  end

  defp send_request(s, active, request) do
    id = System.unique_integer([:positive])
    # a closed port: its exit status is on the way (died/2 answers the call then)
    command(s.port, {id, request})
    %{s | active: Map.put(active, :id, id)}
  end

  defp command(port, term) do
    Port.command(port, :erlang.term_to_binary(term))
  rescue
    ArgumentError -> :closed
  end

  # A compiled chunk crosses as its bytecode (LuaSandbox.Worker.wire/1), as a run's does.
  defp wire(nil), do: nil
  defp wire(source), do: Worker.wire(source)

  # A call's options are the per-call ones; the worker reads a run's whole map, whose
  # state-wide part (limits, chunk name, print) is the session's.
  defp with_state_opts(s, call_opts),
    do: Map.merge(%{s.opts | tools: [], modules: []}, call_opts)

  defp frame(s, frame) do
    active = s.active

    case Worker.decode(frame) do
      # the call's streamed output, ahead of its answer (print: {:send, ...})
      {id, {:print, bytes}} when active != nil and active.id == id and is_binary(bytes) ->
        if s.print, do: s.print.(bytes)
        s

      {id, answer} when active != nil and active.id == id ->
        answered(s, active, answer)

      {id, :cancelled} when is_tuple(s.cancelling) and elem(s.cancelling, 1) == id ->
        {member, _} = s.cancelling
        notify(s, member, :member_free)
        # a call dropped where it was parked has no answer of its own: rolled back
        s = put_handles(s, member, Handles.dropped(handles_of(s, member)))
        idle(%{s | cancelling: nil, orphan: nil})

      # the answer of a call whose caller died (cancelled meanwhile): whether it was rolled
      # back decides whether its handles stay
      {id, answer} when is_tuple(s.orphan) and elem(s.orphan, 1) == id ->
        {member, _} = s.orphan

        case Handles.unwire(answer, handles_of(s, member)) do
          {:ok, _answer, handles} -> put_handles(%{s | orphan: nil}, member, handles)
          {:error, _why} -> %{s | orphan: nil}
        end

      _ ->
        s
    end
  end

  defp answered(s, active, answer) do
    case Handles.unwire(answer, handles_of(s, active.member)) do
      {:ok, answer, handles} ->
        GenServer.reply(active.from, {:ok, answer})
        s = put_handles(s, active.member, handles)

        case answer do
          {:tool_call, _, _} -> %{s | active: %{active | parked: true, from: nil}}
          _ -> idle(%{s | active: nil, served: s.served + 1})
        end

      # a broken worker (it named a handle it was not given): closed and replaced, as a dead one
      {:error, why} ->
        died(s, "closed, as #{why}")
    end
  end

  # A member's table (every member has one from its start or fork until it leaves).
  defp handles_of(s, member), do: Map.get(s.handles, member, Handles.new())

  # (a member that left has no table to update)
  defp put_handles(s, member, handles) do
    if Map.has_key?(s.handles, member),
      do: %{s | handles: Map.put(s.handles, member, handles)},
      else: s
  end

  # The worker is free: the states of members that left are dropped.
  defp idle(%{active: nil, cancelling: nil, leaving: [_ | _]} = s) do
    closed = Enum.map(s.leaving, &Worker.request(s.port, {:session_close, &1}, @boot_timeout))

    s = %{s | leaving: []}

    # a request that did not answer took the worker's exit status, if it died
    if Enum.all?(closed, &(&1 == {:ok, :ok})), do: s, else: died(s, "did not close a fork")
  end

  defp idle(s), do: s

  # A member is gone (its session stopped, or a fork's caller died before starting it): its
  # call in progress is cancelled, its state dropped; the family ends with its last member.
  defp leave(s, member) do
    s = %{
      s
      | members: Map.delete(s.members, member),
        joined: MapSet.delete(s.joined, member),
        handles: Map.delete(s.handles, member)
    }

    cond do
      map_size(s.members) == 0 ->
        {:stop, :normal, s}

      match?(%{member: ^member}, s.active) ->
        id = System.unique_integer([:positive])
        command(s.port, {id, :cancel})
        {:noreply, %{s | active: nil, cancelling: {member, id}, leaving: [member | s.leaving]}}

      true ->
        {:noreply, idle(%{s | leaving: [member | s.leaving]})}
    end
  end

  # A new member holding a copy of `member`'s state, its caller watched until the fork's
  # session joins (the worker answers at once: no call is running).
  defp fork(s, member, {pid, _} = from) do
    new = s.next
    s = %{s | next: new + 1}

    case Worker.request(s.port, {:session_fork, member, new}, @boot_timeout) do
      {:ok, :ok} ->
        GenServer.reply(from, {:ok, {:forked, self(), new, s.gen}})
        # the copied state holds the origin's handles
        copied = %{handles_of(s, member) | pending: nil}

        %{
          s
          | members: Map.put(s.members, new, watch(pid)),
            handles: Map.put(s.handles, new, copied)
        }

      {:ok, other} ->
        GenServer.reply(from, {:ok, other})
        s

      # it died (this took its exit status) or hangs: a new one, without the fork
      _ ->
        GenServer.reply(from, {:error, restarted_error()})
        died(s, "did not answer a fork")
    end
  end

  defp notify(s, member, what) do
    case s.members do
      %{^member => {pid, _}} -> if member in s.joined, do: send(pid, {what, self()})
      _ -> :ok
    end

    :ok
  end

  # The worker is gone (`how` says how): the call in progress answers :worker_crashed, and a
  # new worker holds every member's start state.
  defp died(s, how) do
    case s.active do
      %{from: from} when from != nil ->
        GenServer.reply(from, {:error, Error.worker_crashed(s.os_pid, how)})

      _ ->
        :ok
    end

    case s.cancelling do
      {member, _} -> notify(s, member, :member_free)
      nil -> :ok
    end

    restart(%{s | active: nil, cancelling: nil}, how)
  end

  # A new worker with the session's start state for every member; stops the family (and so its
  # sessions) if it cannot.
  defp restart(s, how) do
    Logger.warning(
      "LuaSandbox.Session: worker os pid #{s.os_pid} #{how}; " <>
        "the session and its forks restart from its start options"
    )

    Worker.close(s.port)
    forks = for {m, _} <- s.members, m != 0, do: m

    with {:ok, port, os_pid} <- start_worker(s),
         :ok <- refork(port, forks, Map.has_key?(s.members, 0)) do
      s = %{s | port: port, os_pid: os_pid, gen: s.gen + 1, active: nil, leaving: []}
      # every member holds the start state again: the start's handles only
      s = %{
        s
        | orphan: nil,
          handles: Map.new(s.handles, fn {m, h} -> {m, Handles.restarted(h)} end)
      }

      Enum.each(Map.keys(s.members), &notify_gen(s, &1))
      s
    else
      other -> exit({:session_worker_restart_failed, other})
    end
  end

  defp notify_gen(s, member) do
    %{^member => {pid, _}} = s.members
    if member in s.joined, do: send(pid, {:worker_restarted, self(), s.gen})
  end

  # Each fork restarts from the session's start state too: a copy of member 0's, which is
  # dropped when the session itself is gone.
  defp refork(port, forks, keep_origin) do
    answers = for m <- forks, do: Worker.request(port, {:session_fork, 0, m}, @boot_timeout)

    unless keep_origin, do: Worker.request(port, {:session_close, 0}, @boot_timeout)

    if Enum.all?(answers, &(&1 == {:ok, :ok})), do: :ok, else: {:error, answers}
  end

  defp restarted_error,
    do:
      Error.new(:worker_crashed, "the session's worker died during this call (restarted)",
        stats: Error.empty_stats()
      )
end
