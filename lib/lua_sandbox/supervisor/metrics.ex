defmodule LuaSandbox.Supervisor.Metrics do
  @moduledoc false
  # Counters since start of one LuaSandbox.Supervisor (LuaSandbox.metrics/1): one :counters
  # array (write_concurrency) for the fixed ones, and per-tenant run counts in the Slots ETS
  # table of quotas (update_counter). Recording a run is a handful of counter adds.

  alias LuaSandbox.Error

  @kinds [:ok | Error.kinds()]
  @kind_index @kinds |> Enum.with_index(1) |> Map.new()
  @sums [:instructions, :cpu_us, :tool_calls, :kills, :duration_us]
  @sum_base length(@kinds)
  @sum_index @sums |> Enum.with_index(@sum_base + 1) |> Map.new()
  # memory_peak histogram: bucket i counts peaks below 2^(i + 14) bytes (16 KiB .. 1 GiB), the
  # last one everything above
  @buckets 17
  @hist_base @sum_base + length(@sums)
  @size @hist_base + @buckets

  def new, do: :counters.new(@size, [:write_concurrency])

  @doc "Counts one run's result."
  def record(ref, qtab, tenant, result) do
    case result do
      {:ok, r} -> count(ref, qtab, tenant, :ok, r.stats)
      {:error, e} -> count(ref, qtab, tenant, e.kind, e.stats)
    end

    result
  end

  defp count(ref, qtab, tenant, kind, stats) do
    :counters.add(ref, Map.fetch!(@kind_index, kind), 1)
    :counters.add(ref, @sum_index.instructions, Map.get(stats, :instructions, 0))
    :counters.add(ref, @sum_index.cpu_us, Map.get(stats, :cpu_us, 0))
    :counters.add(ref, @sum_index.tool_calls, Map.get(stats, :tool_calls, 0))
    :counters.add(ref, @sum_index.duration_us, Map.get(stats, :duration_us, 0))

    peak = Map.get(stats, :memory_peak, 0)

    if peak > 0 do
      bucket = min(max(bit_length(peak) - 14, 0), @buckets - 1)
      :counters.add(ref, @hist_base + 1 + bucket, 1)
    end

    if tenant != nil, do: :ets.update_counter(qtab, {:runs, tenant, kind}, 1, {nil, 0})
    :ok
  end

  @doc "Counts a refusal that never ran (:overloaded, :rate_limited, :quota_exceeded)."
  def refused(ref, qtab, tenant, kind),
    do: count(ref, qtab, tenant, kind, %{})

  def killed(ref, n), do: :counters.add(ref, @sum_index.kills, n)

  defp bit_length(n), do: trunc(:math.log2(n)) + 1

  @doc "The counters as a map."
  def read(ref, qtab) do
    get = &:counters.get(ref, &1)
    by_kind = Map.new(@kinds, &{&1, get.(@kind_index[&1])})

    by_tenant =
      qtab
      |> :ets.match({{:runs, :"$1", :"$2"}, :"$3"})
      |> Enum.reduce(%{}, fn [t, k, n], acc ->
        Map.update(acc, t, %{k => n}, &Map.put(&1, k, n))
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
      memory_peak_histogram: histogram
    }
  end
end
