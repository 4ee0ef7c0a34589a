defmodule LuaSandbox.Supervisor.Quotas do
  @moduledoc false
  # Per-tenant admission of one LuaSandbox.Supervisor (its `quotas:` option): a GCRA rate with
  # a burst, a CPU-millisecond balance, and the tenant's concurrency (counted by Slots, which
  # gives a dead caller's slot back). All of it is a persistent_term read and a few ETS
  # operations in the caller's process: no message to any process.
  #
  # Rate `{count, per_ms}`: GCRA (as in redis-cell) with emission interval per_ms/count and a
  # burst of `count`; the state is one "theoretical arrival time" per tenant, advanced with a
  # compare-and-swap (:ets.select_replace), so concurrent callers cannot over-admit.
  #
  # CPU `{ms, per_ms}`: a balance of at most `ms` that refills at ms/per_ms, kept as the time at
  # which the tenant's CPU debt is paid back (the same shape as GCRA's TAT, in µs). A run is
  # admitted while the balance is positive; its deadline is capped at the balance (a run's CPU
  # time never exceeds its wall time, so it cannot overdraw by more than the deadline check's
  # granularity), and its measured `cpu_us` is debited when it ends. A run stopped by that cap
  # answers `:quota_exceeded` instead of `:timeout`.

  alias LuaSandbox.Error

  @doc "Validates the `quotas:` option of LuaSandbox.Supervisor.start_link/1."
  def validate!(nil), do: nil

  def validate!(quotas) when is_map(quotas) do
    Map.new(quotas, fn {tenant, limits} -> {tenant, limits!(tenant, limits)} end)
  end

  def validate!(other),
    do: raise(ArgumentError, "quotas must be a map of tenant => limits, got: #{inspect(other)}")

  defp limits!(tenant, limits) when is_list(limits) or is_map(limits) do
    Map.new(limits, fn
      {:rate, {n, per}} = l when is_integer(n) and n > 0 and is_integer(per) and per > 0 -> l
      {:cpu_ms, {n, per}} = l when is_integer(n) and n > 0 and is_integer(per) and per > 0 -> l
      {:concurrency, n} = l when is_integer(n) and n > 0 -> l
      other -> raise ArgumentError, "quotas #{inspect(tenant)}: bad limit #{inspect(other)}"
    end)
  end

  defp limits!(tenant, other),
    do:
      raise(
        ArgumentError,
        "quotas #{inspect(tenant)}: limits must be a keyword list or map, got: #{inspect(other)}"
      )

  @doc "The limits of `tenant` under `quotas` (nil: no quotas or no tenant)."
  def limits(nil, _tenant), do: nil
  def limits(_quotas, nil), do: nil

  def limits(quotas, tenant) do
    case quotas do
      %{^tenant => limits} -> limits
      %{default: limits} -> limits
      _ -> nil
    end
  end

  @doc """
  Admits one run of `tenant` (rate and CPU; concurrency is Slots'): `{:ok, cpu_cap_ms | nil}`
  or `{:error, %Error{}}` with `retry_after_ms`.
  """
  def admit(_tab, nil, _tenant), do: {:ok, nil}

  def admit(tab, limits, tenant) do
    now = System.monotonic_time(:microsecond)

    with :ok <- rate(tab, limits, tenant, now) do
      cpu(tab, limits, tenant, now)
    end
  end

  defp rate(tab, %{rate: {count, per_ms}}, tenant, now) do
    interval = div(per_ms * 1000, count)
    limit = per_ms * 1000
    key = {:rate, tenant}
    :ets.insert_new(tab, {key, now})
    gcra(tab, key, interval, limit, now)
  end

  defp rate(_tab, _limits, _tenant, _now), do: :ok

  defp gcra(tab, key, interval, limit, now) do
    [{^key, tat}] = :ets.lookup(tab, key)
    new_tat = max(tat, now) + interval

    cond do
      new_tat - now > limit ->
        {:error, refusal(:rate_limited, "rate", new_tat - now - limit)}

      :ets.select_replace(tab, [{{key, tat}, [], [{{{:const, key}, new_tat}}]}]) == 1 ->
        :ok

      true ->
        # another caller moved the TAT between our read and our swap: read again
        gcra(tab, key, interval, limit, now)
    end
  end

  defp cpu(tab, %{cpu_ms: {ms, per_ms}}, tenant, now) do
    # paid_at: when the tenant's debt is back to zero; balance = ms - debt
    key = {:cpu, tenant}
    :ets.insert_new(tab, {key, now})
    [{^key, paid_at}] = :ets.lookup(tab, key)
    debt_us = max(paid_at - now, 0) * ms / per_ms
    left_ms = ms - debt_us / 1000

    if left_ms > 0 do
      {:ok, max(trunc(left_ms), 1)}
    else
      wait_us = trunc(-left_ms * 1000 * per_ms / ms) + 1
      {:error, refusal(:quota_exceeded, "CPU-time", wait_us)}
    end
  end

  defp cpu(_tab, _limits, _tenant, _now), do: {:ok, nil}

  @doc "Debits `cpu_us` of CPU time from `tenant`'s balance (when it has a `cpu_ms` quota)."
  def debit(tab, %{cpu_ms: {ms, per_ms}}, tenant, cpu_us) when cpu_us > 0 do
    now = System.monotonic_time(:microsecond)
    key = {:cpu, tenant}
    # the debt is kept as wall time to refill: cpu_us of CPU takes cpu_us * per_ms / ms
    add = div(cpu_us * per_ms, ms)
    [{^key, paid_at}] = :ets.lookup(tab, key)
    new = max(paid_at, now) + add

    if :ets.select_replace(tab, [{{key, paid_at}, [], [{{{:const, key}, new}}]}]) == 1,
      do: :ok,
      else: debit(tab, %{cpu_ms: {ms, per_ms}}, tenant, cpu_us)
  end

  def debit(_tab, _limits, _tenant, _cpu_us), do: :ok

  @doc "The refusal for a tenant over its concurrency."
  def over_concurrency(n),
    do: refusal(:rate_limited, "concurrency (#{n})", 1000)

  defp refusal(kind, what, wait_us) do
    Error.new(kind, "the tenant is over its #{what} quota",
      retry_after_ms: max(div(wait_us + 999, 1000), 1),
      stats: Error.empty_stats()
    )
  end
end
