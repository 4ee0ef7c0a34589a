defmodule LuaSandbox.Supervisor.Slots do
  @moduledoc false
  # The concurrency bound of one LuaSandbox.Supervisor, taken by every run in the process that
  # runs it. A slot is a row in a public ETS table; the number of rows is the number of runs.
  # Taking one costs an insert and a size read (~1 µs), not a call to a process: the keeper
  # (this GenServer) is only told, once per caller process, to monitor it, and deletes a dead
  # caller's rows, so a run whose caller was killed gives its slot back.
  #
  # Order matters for that: a caller asks to be watched *before* it inserts its row, so there is
  # no moment at which it holds a row nobody would clean up. Two callers racing for the last
  # slot may both be refused (each sees the other's row); neither can over-admit.

  use GenServer

  #
  # The keeper also owns what admission needs beyond the bound (Quotas, Metrics): a second
  # table with each tenant's running count (a slot row names its tenant, so the count given back
  # for a dead caller is exact), GCRA and CPU state, per-tenant run counts; and the counters.

  alias LuaSandbox.Supervisor.{Metrics, Quotas}

  def child_spec({name, _max, _quotas} = arg),
    do: %{id: {__MODULE__, name}, start: {__MODULE__, :start_link, [arg]}}

  def child_spec({name, max}), do: child_spec({name, max, nil})

  def start_link({name, max, quotas}), do: GenServer.start_link(__MODULE__, {name, max, quotas})
  def start_link({name, max}), do: start_link({name, max, nil})

  @doc "Takes a slot of supervisor `sup` for the calling process: `{:ok, slot}` or `:full`."
  def checkout(sup) do
    {tab, max, keeper, _ctx} = lookup!(sup)
    take(sup, tab, max, keeper, nil)
  end

  @doc """
  Admission of one run of `tenant` (nil: none): the tenant's quotas, then a slot.
  `{:ok, slot, cpu_cap_ms | nil}`, `:full`, or `{:error, %Error{}}` (rate or quota), each
  refusal counted in the metrics.
  """
  def admit(sup, tenant) do
    {tab, max, keeper, {qtab, quotas, metrics}} = lookup!(sup)
    limits = Quotas.limits(quotas, tenant)

    with {:ok, cap} <- Quotas.admit(qtab, limits, tenant),
         {:ok, slot} <- take(sup, tab, max, keeper, counted(limits, qtab, tenant)) do
      case limits do
        # The row names the count (see take/5) before it is raised, so a caller killed in
        # between is given back by the keeper at worst one too many, never held forever.
        %{concurrency: n} ->
          if :ets.update_counter(qtab, {:running, tenant}, 1, {nil, 0}) > n do
            checkin(slot)
            refuse(metrics, qtab, tenant, Quotas.over_concurrency(n))
          else
            {:ok, slot, cap}
          end

        _ ->
          {:ok, slot, cap}
      end
    else
      # counted by the caller that gives up (refused/3): a queued run tries again
      :full ->
        :full

      {:error, e} ->
        refuse(metrics, qtab, tenant, e)
    end
  end

  defp counted(%{concurrency: _}, qtab, tenant), do: {qtab, tenant}
  defp counted(_limits, _qtab, _tenant), do: nil

  @doc "Counts a refusal of `kind` in the metrics of `sup`."
  def refused(sup, tenant, kind) do
    {_tab, _max, _keeper, {qtab, _quotas, metrics}} = lookup!(sup)
    Metrics.refused(metrics, qtab, tenant, kind)
  end

  defp refuse(metrics, qtab, tenant, e) do
    Metrics.refused(metrics, qtab, tenant, e.kind)
    {:error, e}
  end

  @doc "Counts the result of a run admitted by admit/2 and debits its CPU time; returns it."
  def settle(sup, tenant, result) do
    {_tab, _max, _keeper, {qtab, quotas, metrics}} = lookup!(sup)

    with {_, %{stats: %{cpu_us: cpu}}} <- result,
         limits when limits != nil <- Quotas.limits(quotas, tenant) do
      Quotas.debit(qtab, limits, tenant, cpu)
    end

    Metrics.record(metrics, qtab, tenant, result)
  end

  @doc "The counters of `sup` (LuaSandbox.metrics/1)."
  def metrics(sup) do
    {tab, max, _keeper, {qtab, _quotas, metrics}} = lookup!(sup)

    Map.merge(Metrics.read(metrics, qtab), %{
      running: :ets.info(tab, :size),
      capacity: max
    })
  end

  @doc "`{running, capacity}` of `sup`, two reads (for routing across nodes)."
  def load(sup) do
    {tab, max, _keeper, _ctx} = lookup!(sup)
    {:ets.info(tab, :size) || not_running!(sup), max}
  end

  # `count`: nil, or {qtab, tenant} whose running count the slot gives back
  defp take(sup, tab, max, keeper, count) do
    watched = {__MODULE__, keeper}

    unless Process.get(watched) do
      send(keeper, {:watch, self()})
      Process.put(watched, true)
    end

    key = {self(), make_ref()}

    try do
      :ets.insert(tab, {key, count})

      if :ets.info(tab, :size) > max do
        :ets.delete(tab, key)
        :full
      else
        {:ok, {tab, key, count}}
      end
    rescue
      # the table went with its keeper: the supervisor stopped meanwhile
      ArgumentError -> not_running!(sup)
    end
  end

  @doc "Gives a slot back."
  def checkin({tab, key, count}) do
    # take, not delete: the keeper may be giving back the same row for a dead caller
    if :ets.take(tab, key) != [], do: release(count)
    :ok
  rescue
    ArgumentError -> :ok
  end

  # the tenant's running count, kept only for a tenant with a concurrency quota (admit/2)
  defp release(nil), do: :ok

  defp release({qtab, tenant}) do
    :ets.update_counter(qtab, {:running, tenant}, -1, {nil, 0})
    :ok
  end

  @doc "How many runs hold a slot now."
  def count(sup) do
    {tab, _max, _keeper, _ctx} = lookup!(sup)
    :ets.info(tab, :size) || not_running!(sup)
  end

  defp lookup!(sup) do
    case :persistent_term.get({__MODULE__, sup}, nil) do
      {_tab, _max, keeper, _ctx} = entry ->
        if Process.alive?(keeper), do: entry, else: not_running!(sup)

      nil ->
        not_running!(sup)
    end
  end

  defp not_running!(LuaSandbox.TaskSupervisor = sup) do
    started? = List.keymember?(Application.started_applications(), :lua_sandbox, 0)

    if started?,
      do: raise(ArgumentError, "supervisor #{inspect(sup)} is not running"),
      else:
        raise(
          ArgumentError,
          "supervisor #{inspect(sup)} is not running: the :lua_sandbox application is not " <>
            "started (e.g. in a release's `bin/app eval`); start it first with " <>
            "Application.ensure_all_started(:lua_sandbox)"
        )
  end

  defp not_running!(sup),
    do: raise(ArgumentError, "supervisor #{inspect(sup)} is not running")

  @impl true
  # The entry outlives a keeper that was killed; lookup!/1 checks that the keeper is alive, and
  # a new supervisor of the same name replaces it.
  def init({name, max, quotas}) do
    opts = [:set, :public, write_concurrency: true, read_concurrency: true]
    tab = :ets.new(__MODULE__, opts)
    qtab = :ets.new(Quotas, opts)
    ctx = {qtab, quotas, Metrics.new()}
    :persistent_term.put({__MODULE__, name}, {tab, max, self(), ctx})
    {:ok, %{name: name, tab: tab, ctx: ctx, watched: %{}}}
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

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    {_qtab, _quotas, metrics} = state.ctx

    for [ref, count] <- :ets.match(state.tab, {{pid, :"$1"}, :"$2"}),
        :ets.take(state.tab, {pid, ref}) != [] do
      # a run whose caller died without giving its slot back: it was killed
      Metrics.killed(metrics, 1)
      release(count)
    end

    {:noreply, %{state | watched: Map.delete(state.watched, pid)}}
  end

  def handle_info(_other, state), do: {:noreply, state}
end
