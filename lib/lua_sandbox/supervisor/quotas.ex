defmodule LuaSandbox.Supervisor.Quotas do
  @moduledoc false
  # Per-tenant admission of one LuaSandbox.Supervisor (its `quotas:` option): a GCRA rate with
  # a burst, a CPU-millisecond balance, and the tenant's concurrency (a slot row names it, so
  # Slots gives a dead caller's count back). All of it is a few atomics operations in the
  # caller's process (and one ETS lookup when the process changes tenant): no message to any
  # process.
  #
  # Rate `{count, per_ms}`: GCRA (as in redis-cell) with emission interval per_ms/count and a
  # burst of `count`; the state is one "theoretical arrival time" per tenant, advanced with a
  # compare-and-swap, so concurrent callers cannot over-admit.
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

  # A tenant's state is one :atomics array, found by one ETS lookup (made on first sight):
  # the GCRA arrival time, the CPU debt's payback time, the running count, then its runs by
  # kind (LuaSandbox.Supervisor.Metrics). Compare-and-swap on atomics, not select_replace on
  # ETS rows: select_replace compiled a match spec per admission (profiled: 15% of it).
  @tat 1
  @paid 2
  @running 3
  @doc "The first index of a tenant's per-kind run counts."
  def kind_base, do: @running

  @doc """
  The state of `tenant` in `tab` (created on first sight), `size` counters long. The calling
  process remembers the last one it asked for (one entry in its dictionary, whatever the
  number of tenants): a caller that runs for one tenant again and again skips the ETS lookup,
  the largest part of admission (profiled: 150 of ~1200 ns). A state is never deleted while
  its table lives, and a new supervisor has a new table, so the entry cannot go stale.
  """
  def tenant(tab, tenant, size) do
    case Process.get(__MODULE__) do
      {^tab, ^tenant, ref} ->
        ref

      _ ->
        ref = find(tab, tenant, size)
        Process.put(__MODULE__, {tab, tenant, ref})
        ref
    end
  end

  defp find(tab, tenant, size) do
    case :ets.lookup(tab, tenant) do
      [{_, ref}] ->
        ref

      [] ->
        ref = :atomics.new(@running + size, signed: true)
        now = :erlang.monotonic_time(:microsecond)
        :atomics.put(ref, @tat, now)
        :atomics.put(ref, @paid, now)
        # another caller may have made it meanwhile: theirs wins
        if :ets.insert_new(tab, {tenant, ref}), do: ref, else: find(tab, tenant, size)
    end
  end

  @doc "Every tenant's state: `[{tenant, ref}]`."
  def tenants(tab), do: :ets.tab2list(tab)

  @doc """
  Admits one run of a tenant with state `t` under `limits` (rate and CPU; concurrency is
  `enter/2`'s, once the run holds a slot): `{:ok, cpu_cap_ms | nil}` or `{:error, %Error{}}`
  with `retry_after_ms`.
  """
  def admit(_t, nil), do: {:ok, nil}

  def admit(t, limits) do
    now = :erlang.monotonic_time(:microsecond)

    with :ok <- rate(t, limits, now) do
      cpu(t, limits, now)
    end
  end

  defp rate(t, %{rate: {count, per_ms}}, now) do
    gcra(t, div(per_ms * 1000, count), per_ms * 1000, now)
  end

  defp rate(_t, _limits, _now), do: :ok

  defp gcra(t, interval, limit, now) do
    tat = :atomics.get(t, @tat)
    new_tat = max(tat, now) + interval

    cond do
      new_tat - now > limit ->
        {:error, refusal(:rate_limited, "rate", new_tat - now - limit)}

      :atomics.compare_exchange(t, @tat, tat, new_tat) == :ok ->
        :ok

      true ->
        # another caller moved the TAT between our read and our swap: read again
        gcra(t, interval, limit, now)
    end
  end

  defp cpu(t, %{cpu_ms: {ms, per_ms}}, now) do
    # paid_at: when the tenant's debt is back to zero; balance = ms - debt (integers: the float
    # version cost 70 ns)
    left_us = ms * 1000 - div(max(:atomics.get(t, @paid) - now, 0) * ms, per_ms)

    if left_us > 0 do
      {:ok, max(div(left_us, 1000), 1)}
    else
      {:error, refusal(:quota_exceeded, "CPU-time", div(-left_us * per_ms, ms) + 1)}
    end
  end

  defp cpu(_t, _limits, _now), do: {:ok, nil}

  @doc "Debits `cpu_us` of CPU time from the tenant's balance (when it has a `cpu_ms` quota)."
  def debit(t, %{cpu_ms: {ms, per_ms}} = limits, cpu_us) when cpu_us > 0 do
    now = :erlang.monotonic_time(:microsecond)
    # the debt is kept as wall time to refill: cpu_us of CPU takes cpu_us * per_ms / ms
    paid_at = :atomics.get(t, @paid)
    new = max(paid_at, now) + div(cpu_us * per_ms, ms)

    if :atomics.compare_exchange(t, @paid, paid_at, new) == :ok,
      do: :ok,
      else: debit(t, limits, cpu_us)
  end

  def debit(_t, _limits, _cpu_us), do: :ok

  @doc """
  Counts one more running run of the tenant (a slot row names `t` before this, so a caller
  killed in between is given back at worst once too often, never held forever): `:ok`, or
  the refusal once over its `concurrency`.
  """
  def enter(t, %{concurrency: n}) do
    if :atomics.add_get(t, @running, 1) > n do
      :atomics.sub(t, @running, 1)
      {:error, over_concurrency(n)}
    else
      :ok
    end
  end

  def enter(_t, _limits), do: :ok

  @doc "One running run of the tenant fewer (its slot went back)."
  def leave(t), do: :atomics.sub(t, @running, 1)

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
