defmodule LuaSandbox.Supervisor.Slots do
  @moduledoc false
  # The concurrency bound of one LuaSandbox.Supervisor, taken by every run in the process that
  # runs it, and the FIFO queue of runs waiting for it. A slot is a row in a public ETS table;
  # the number of rows is the number of runs. Taking one costs an insert and a size read, not
  # a call to a process: the keeper (this GenServer) is only told, once per caller process, to
  # monitor it, and deletes a dead caller's rows, so a run whose caller was killed gives its
  # slot back.
  #
  # Order matters for that: a caller asks to be watched *before* it inserts its row, so there is
  # no moment at which it holds a row nobody would clean up. Two callers racing for the last
  # slot may both be refused (each sees the other's row); neither can over-admit.
  #
  # The queue. A run that finds no slot and may wait (`queue_timeout:` > 0) sends itself to
  # the keeper, which keeps the waiting runs in arrival order and publishes how many there are
  # in an atomic. While that count is not zero, nobody takes a slot directly (a run that may
  # not wait is refused at once): a freed slot goes to the head of the queue, so a caller that
  # retries cannot overtake one that waits. The keeper grants a slot by inserting the waiter's
  # row itself (it monitors the waiter already) and telling it. No wakeup is lost: the keeper
  # publishes a new waiter *before* it looks for a free slot, and a run giving its slot back
  # deletes its row *before* it reads the count (and, if not zero, tells the keeper to serve).
  # A waiter whose time is up withdraws and waits for the keeper's answer, so a grant that
  # crossed its withdrawal is handed back rather than leaked. Only waiting runs talk to the
  # keeper: the uncontended path has no process hop.
  #
  # The keeper also owns what admission needs beyond the bound: each tenant's state (Quotas:
  # one :atomics per tenant behind one ETS row) and the counters (Metrics).

  use GenServer

  require Logger
  require Record

  alias LuaSandbox.{Error, Telemetry}
  alias LuaSandbox.Supervisor.{Metrics, Quotas}

  # What callers need of one supervisor, one persistent_term read per admission.
  Record.defrecordp(:sup, [
    :name,
    :tab,
    :max,
    :keeper,
    :waiting,
    :tenants,
    :quotas,
    :metrics,
    :audit
  ])

  def child_spec({name, _max, _extra} = arg),
    do: %{id: {__MODULE__, name}, start: {__MODULE__, :start_link, [arg]}}

  def child_spec({name, max}), do: child_spec({name, max, []})

  # extra: [quotas: validated quotas | nil, audit_log: false | Logger level]
  def start_link({name, max, extra}), do: GenServer.start_link(__MODULE__, {name, max, extra})
  def start_link({name, max}), do: start_link({name, max, []})

  @doc """
  Admission of one run of `tenant` (nil: none): the tenant's quotas, then a slot, waiting up
  to `wait` ms (or `:infinity`) in the queue for one. `{:ok, slot, cpu_cap_ms | nil, queued_us}`
  or `{:error, %Error{}}` (`:rate_limited`, `:quota_exceeded`, `:overloaded`), each refusal
  counted in the metrics and emitted as a telemetry event.
  """
  def admit(name, tenant, wait) do
    s = lookup!(name)
    t = if tenant != nil, do: Quotas.tenant(sup(s, :tenants), tenant, Metrics.tenant_size())
    limits = Quotas.limits(sup(s, :quotas), tenant)
    count = counted(limits, t)

    with {:ok, cap} <- Quotas.admit(t, limits),
         {:ok, key, queued} <- acquire(s, count, wait),
         slot = {s, key, count, t, limits},
         :ok <- enter(slot, t, limits) do
      {:ok, slot, cap, queued}
    else
      {:error, e} ->
        Metrics.refused(sup(s, :metrics), t, e.kind)
        Telemetry.rejected(name, tenant, e)
        {:error, e}
    end
  rescue
    # a table went with its keeper: the supervisor stopped meanwhile
    ArgumentError -> not_running!(name)
  end

  # the tenant whose running count the slot's row names (only with a concurrency quota)
  defp counted(%{concurrency: _}, t), do: t
  defp counted(_limits, _t), do: nil

  defp enter(slot, t, limits) do
    with {:error, _} = refused <- Quotas.enter(t, limits) do
      # the row names the count, which was not raised: give the slot back without it
      checkin(put_elem(slot, 2, nil))
      refused
    end
  end

  @doc """
  Counts the result of a run admitted by admit/3, debits its CPU time, and records what it was
  denied (metrics, telemetry, the audit log) under the chunk name `chunk`; returns the result.
  """
  def settle({s, _key, _count, t, limits}, tenant, chunk, result) do
    with {_, %{stats: %{cpu_us: cpu}}} when limits != nil <- result,
         do: Quotas.debit(t, limits, cpu)

    Metrics.record(sup(s, :metrics), t, result)

    case result do
      {_, %{stats: %{denied: denied}}} when map_size(denied) > 0 ->
        denied(sup(s, :name), tenant, chunk, denied, sup(s, :audit))

      _ ->
        :ok
    end

    result
  end

  defp denied(name, tenant, chunk, denied, audit) do
    for {capability, n} <- denied do
      Telemetry.denied(name, tenant, chunk, capability, n)

      if audit do
        Logger.log(audit, "lua_sandbox: a script was denied #{capability} (#{n}×)",
          lua_supervisor: name,
          lua_tenant: tenant,
          lua_chunk: chunk,
          lua_capability: capability,
          lua_count: n
        )
      end
    end

    :ok
  end

  @doc "The counters of `sup` (LuaSandbox.metrics/1)."
  def metrics(name) do
    s = lookup!(name)

    Map.merge(Metrics.read(sup(s, :metrics), Quotas.tenants(sup(s, :tenants))), %{
      running: :ets.info(sup(s, :tab), :size),
      capacity: sup(s, :max),
      queue: :atomics.get(sup(s, :waiting), 1)
    })
  end

  @doc "`{running, capacity, queue}` of `sup`, three reads (for routing across nodes)."
  def load(name) do
    s = lookup!(name)
    running = :ets.info(sup(s, :tab), :size) || not_running!(name)
    {running, sup(s, :max), :atomics.get(sup(s, :waiting), 1)}
  end

  @doc "How many runs hold a slot now."
  def count(name) do
    s = lookup!(name)
    :ets.info(sup(s, :tab), :size) || not_running!(name)
  end

  # A slot: {sup, row key, tenant state named by the row (or nil), tenant state, limits}; a
  # row: {key, tenant state named (or nil)}.
  defp acquire(s, count, wait) do
    watch(s)

    case :atomics.get(sup(s, :waiting), 1) == 0 and take(s, count) do
      {:ok, key} -> {:ok, key, 0}
      _full when wait == 0 -> {:error, overloaded(sup(s, :name))}
      _full -> enqueue(s, count, wait)
    end
  end

  defp watch(s) do
    watched = {__MODULE__, sup(s, :keeper)}

    unless Process.get(watched) do
      send(sup(s, :keeper), {:watch, self()})
      Process.put(watched, true)
    end
  end

  defp take(s, count) do
    tab = sup(s, :tab)
    key = {self(), make_ref()}
    :ets.insert(tab, {key, count})

    if :ets.info(tab, :size) > sup(s, :max) do
      :ets.delete(tab, key)
      false
    else
      {:ok, key}
    end
  end

  defp enqueue(s, count, wait) do
    keeper = sup(s, :keeper)
    ref = make_ref()
    mref = Process.monitor(keeper)
    t0 = System.monotonic_time(:microsecond)
    send(keeper, {:wait, self(), ref, count})

    receive do
      {^ref, :granted} ->
        Process.demonitor(mref, [:flush])
        queued = System.monotonic_time(:microsecond) - t0
        Metrics.queued(sup(s, :metrics), queued)
        {:ok, {self(), ref}, queued}

      {:DOWN, ^mref, _, _, _} ->
        not_running!(sup(s, :name))
    after
      wait ->
        send(keeper, {:cancel, self(), ref})

        receive do
          {^ref, :cancelled} ->
            Process.demonitor(mref, [:flush])

            # a grant sent before our withdrawal arrived is already here: hand it back
            receive do
              {^ref, :granted} -> checkin({s, {self(), ref}, count, nil, nil})
            after
              0 -> :ok
            end

            {:error, overloaded(sup(s, :name))}

          {:DOWN, ^mref, _, _, _} ->
            not_running!(sup(s, :name))
        end
    end
  end

  @doc false
  def overloaded(name) do
    Error.new(:overloaded, "supervisor #{inspect(name)} is at max_concurrency")
  end

  @doc "Gives a slot back."
  def checkin({s, key, count, _t, _limits}) do
    # take, not delete: the keeper may be giving back the same row for a dead caller
    if :ets.take(sup(s, :tab), key) != [] do
      release(count)
      # after the delete (see the moduledoc): a waiter published now finds the slot free
      if :atomics.get(sup(s, :waiting), 1) > 0, do: send(sup(s, :keeper), :serve)
    end

    :ok
  rescue
    ArgumentError -> :ok
  end

  defp release(nil), do: :ok
  defp release(t), do: Quotas.leave(t)

  # The entry outlives a keeper that was killed: its tables go with it, so a run that finds it
  # fails on its first ETS operation (admit/3 rescues that); a new supervisor of the same name
  # replaces it.
  defp lookup!(name) do
    case :persistent_term.get({__MODULE__, name}, nil) do
      nil -> not_running!(name)
      s -> s
    end
  end

  defp not_running!(LuaSandbox.TaskSupervisor = name) do
    started? = List.keymember?(Application.started_applications(), :lua_sandbox, 0)

    if started?,
      do: raise(ArgumentError, "supervisor #{inspect(name)} is not running"),
      else:
        raise(
          ArgumentError,
          "supervisor #{inspect(name)} is not running: the :lua_sandbox application is not " <>
            "started (e.g. in a release's `bin/app eval`); start it first with " <>
            "Application.ensure_all_started(:lua_sandbox)"
        )
  end

  defp not_running!(name),
    do: raise(ArgumentError, "supervisor #{inspect(name)} is not running")

  @impl true
  def init({name, max, extra}) do
    opts = [:set, :public, write_concurrency: true, read_concurrency: true]
    tab = :ets.new(__MODULE__, opts)

    s =
      sup(
        name: name,
        tab: tab,
        max: max,
        keeper: self(),
        waiting: :atomics.new(1, signed: false),
        tenants: :ets.new(Quotas, opts),
        quotas: extra[:quotas],
        metrics: Metrics.new(),
        audit: Keyword.get(extra, :audit_log, false)
      )

    :persistent_term.put({__MODULE__, name}, s)
    {:ok, %{sup: s, watched: %{}, queue: :queue.new(), waiting: 0}}
  end

  @impl true
  def handle_info({:watch, pid}, state) do
    if Map.has_key?(state.watched, pid) do
      {:noreply, state}
    else
      Process.monitor(pid)
      {:noreply, put_in(state.watched[pid], true)}
    end
  end

  def handle_info({:wait, pid, ref, count}, state) do
    # published before looking for a slot (see the moduledoc)
    state = waiting(state, :queue.in({pid, ref, count}, state.queue), 1)
    {:noreply, serve(state)}
  end

  def handle_info({:cancel, pid, ref}, state) do
    queue = :queue.filter(fn {_, r, _} -> r != ref end, state.queue)
    state = waiting(state, queue, :queue.len(queue) - state.waiting)
    send(pid, {ref, :cancelled})
    {:noreply, state}
  end

  def handle_info(:serve, state), do: {:noreply, serve(state)}

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    tab = sup(state.sup, :tab)

    for [ref, count] <- :ets.match(tab, {{pid, :"$1"}, :"$2"}),
        :ets.take(tab, {pid, ref}) != [] do
      # a run whose caller died without giving its slot back: it was killed
      Metrics.killed(sup(state.sup, :metrics), 1)
      release(count)
    end

    queue = :queue.filter(fn {p, _, _} -> p != pid end, state.queue)
    state = waiting(state, queue, :queue.len(queue) - state.waiting)
    {:noreply, serve(%{state | watched: Map.delete(state.watched, pid)})}
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp waiting(state, queue, delta) do
    n = state.waiting + delta
    :atomics.put(sup(state.sup, :waiting), 1, n)
    %{state | queue: queue, waiting: n}
  end

  # Grants free slots to the queue's head, in order, while there are some.
  defp serve(state) do
    case :queue.out(state.queue) do
      {:empty, _} ->
        state

      {{:value, {pid, ref, count}}, rest} ->
        cond do
          # its :DOWN is on the way; nothing to grant
          not Process.alive?(pid) -> serve(waiting(state, rest, -1))
          grant(state.sup, pid, ref, count) -> serve(waiting(state, rest, -1))
          true -> state
        end
    end
  end

  defp grant(s, pid, ref, count) do
    tab = sup(s, :tab)
    :ets.insert(tab, {{pid, ref}, count})

    if :ets.info(tab, :size) > sup(s, :max) do
      :ets.delete(tab, {pid, ref})
      false
    else
      send(pid, {ref, :granted})
      true
    end
  end
end
