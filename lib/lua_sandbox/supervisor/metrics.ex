defmodule LuaSandbox.Supervisor.Metrics do
  @moduledoc false
  # Counters since start of one LuaSandbox.Supervisor (LuaSandbox.metrics/1): one :counters
  # array (write_concurrency) for the fixed ones, per-tenant run counts in each tenant's
  # :atomics (LuaSandbox.Supervisor.Quotas), and denied capabilities by name in an ETS table
  # (touched only by a run that was denied something). Recording a run is a handful of adds.

  alias LuaSandbox.Error
  alias LuaSandbox.Supervisor.Quotas

  @kinds [:ok | Error.kinds()]
  @kind_index @kinds |> Enum.with_index(1) |> Map.new()
  @sums [:instructions, :cpu_us, :tool_calls, :kills, :duration_us, :queued, :queue_us]
  @sum_base length(@kinds)
  @sum_index @sums |> Enum.with_index(@sum_base + 1) |> Map.new()
  # memory_peak histogram: bucket i counts peaks below 2^(i + 14) bytes (16 KiB .. 1 GiB), the
  # last one everything above
  @buckets 17
  @hist_base @sum_base + length(@sums)
  @size @hist_base + @buckets

  @doc "New counters: `{counters, denied_table}`."
  def new do
    denied = :ets.new(__MODULE__, [:set, :public, write_concurrency: true])
    {:counters.new(@size, [:write_concurrency]), denied}
  end

  @doc "How many counters a tenant's state holds for its runs by kind."
  def tenant_size, do: length(@kinds)

  @doc "Counts one run's result; `t` is its tenant's state (or nil)."
  def record({ref, _} = m, t, result) do
    case result do
      {:ok, r} -> count(ref, t, :ok, r.stats)
      {:error, e} -> count(ref, t, e.kind, e.stats)
    end

    case result do
      {_, %{stats: %{denied: denied}}} when map_size(denied) > 0 -> denied(m, denied)
      _ -> :ok
    end

    result
  end

  defp count(ref, t, kind, stats) do
    index = Map.fetch!(@kind_index, kind)
    :counters.add(ref, index, 1)
    if t != nil, do: :atomics.add(t, Quotas.kind_base() + index, 1)

    case stats do
      %{instructions: i, cpu_us: c, tool_calls: n, duration_us: d, memory_peak: peak} ->
        :counters.add(ref, @sum_index.instructions, i)
        :counters.add(ref, @sum_index.cpu_us, c)
        :counters.add(ref, @sum_index.tool_calls, n)
        :counters.add(ref, @sum_index.duration_us, d)

        if peak > 0 do
          bucket = min(max(bit_length(peak) - 14, 0), @buckets - 1)
          :counters.add(ref, @hist_base + 1 + bucket, 1)
        end

      _ ->
        :ok
    end

    :ok
  end

  defp denied({_ref, tab}, denied) do
    Enum.each(denied, fn {name, n} -> :ets.update_counter(tab, name, n, {name, 0}) end)
  end

  @doc "Counts a refusal that never ran (:overloaded, :rate_limited, :quota_exceeded)."
  def refused({ref, _}, t, kind), do: count(ref, t, kind, nil)

  @doc "Counts runs whose caller died holding a slot."
  def killed({ref, _}, n), do: :counters.add(ref, @sum_index.kills, n)

  @doc "Counts a run that waited `us` in the queue for a slot."
  def queued({ref, _}, us) do
    :counters.add(ref, @sum_index.queued, 1)
    :counters.add(ref, @sum_index.queue_us, us)
  end

  defp bit_length(n), do: trunc(:math.log2(n)) + 1

  @doc "The counters as a map; `tenants` is `[{tenant, state}]`."
  def read({ref, tab}, tenants) do
    get = &:counters.get(ref, &1)
    by_kind = Map.new(@kinds, &{&1, get.(@kind_index[&1])})

    by_tenant =
      Map.new(tenants, fn {tenant, t} ->
        counts =
          for kind <- @kinds,
              n = :atomics.get(t, Quotas.kind_base() + @kind_index[kind]),
              n > 0,
              into: %{},
              do: {kind, n}

        {tenant, counts}
      end)

    histogram =
      for i <- 0..(@buckets - 1), into: %{} do
        upper = if i == @buckets - 1, do: :infinity, else: Bitwise.bsl(1, i + 14)
        {upper, get.(@hist_base + 1 + i)}
      end

    %{
      runs: Enum.sum(Map.values(by_kind)),
      by_kind: by_kind,
      by_tenant: by_tenant,
      overloads: by_kind.overloaded,
      rate_limited: by_kind.rate_limited,
      quota_exceeded: by_kind.quota_exceeded,
      kills: get.(@sum_index.kills),
      instructions: get.(@sum_index.instructions),
      cpu_us: get.(@sum_index.cpu_us),
      duration_us: get.(@sum_index.duration_us),
      tool_calls: get.(@sum_index.tool_calls),
      queued: get.(@sum_index.queued),
      queue_us: get.(@sum_index.queue_us),
      denied: Map.new(:ets.tab2list(tab)),
      memory_peak_histogram: histogram
    }
  end
end
