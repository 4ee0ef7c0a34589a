# Run with: MIX_ENV=prod mix run bench/admission_cpu.exs   (EPROF=1 adds an :eprof profile of each)
#
# Issue 20's two per-run costs, in CPU time as well as wall time (on a shared, loaded machine
# the wall time of a sub-µs operation is mostly other processes' time): admission (admit +
# checkin of LuaSandbox.Supervisor.Slots, a tenant with rate, concurrency and cpu_ms quotas,
# and without a tenant) and the telemetry path of a run (LuaSandbox.Telemetry start + stop)
# with the real :telemetry loaded and no handler, before and after :telemetry.persist/0,
# next to two bare :telemetry.execute/3 calls (the library's own share). Each row is the
# median of 9 rounds of 200 000 operations; CPU from :erlang.statistics(:runtime).

defmodule Bench.AdmissionCpu do
  @moduledoc false

  alias LuaSandbox.Supervisor.Slots

  @n 200_000
  @rounds 9

  def main do
    quotas = %{
      default: [
        rate: {1_000_000_000, 1_000},
        concurrency: 1_000_000,
        cpu_ms: {1_000_000_000, 1_000}
      ]
    }

    {:ok, _} =
      LuaSandbox.Supervisor.start_link(name: Bench.Adm.T, max_concurrency: 64, quotas: quotas)

    {:ok, _} = LuaSandbox.Supervisor.start_link(name: Bench.Adm.P, max_concurrency: 64)

    # sanity before timing: admission answers, and the slot comes back
    {:ok, slot, cap, 0} = Slots.admit(Bench.Adm.T, "acme", 0)
    true = is_integer(cap)
    :ok = Slots.checkin(slot)
    0 = LuaSandbox.Supervisor.running(Bench.Adm.T)

    admit = fn sup, tenant ->
      fn ->
        {:ok, slot, _, _} = Slots.admit(sup, tenant, 0)
        Slots.checkin(slot)
      end
    end

    row("admit + checkin, tenant + quotas", admit.(Bench.Adm.T, "acme"))
    row("admit + checkin, no tenant", admit.(Bench.Adm.P, nil))
    0 = LuaSandbox.Supervisor.running(Bench.Adm.T)

    Code.require_file("../test/support/telemetry.ex", __DIR__)
    :ok = LuaSandbox.TestTelemetry.start!()
    true = LuaSandbox.Telemetry.enabled?()
    {:ok, result} = LuaSandbox.run("return 1")
    meta = %{supervisor: Bench.Adm.P, tenant: nil, chunk: "script"}

    path = fn ->
      if LuaSandbox.Telemetry.enabled?() do
        span = LuaSandbox.Telemetry.start(:run, :erlang.monotonic_time(), 0, meta)
        LuaSandbox.Telemetry.stop(span, {:ok, result})
      end
    end

    execute2 = fn ->
      :telemetry.execute([:lua_sandbox, :run, :start], %{}, meta)
      :telemetry.execute([:lua_sandbox, :run, :stop], %{}, meta)
    end

    row("telemetry path, loaded, no handler", path)
    row("2 × :telemetry.execute/3 alone", execute2)
    :telemetry.persist()
    row("telemetry path, after :telemetry.persist/0", path)
    row("2 × :telemetry.execute/3 alone, persisted", execute2)
  end

  defp row(label, f) do
    loop(@n, f)

    samples =
      for _ <- 1..@rounds do
        {cpu0, _} = :erlang.statistics(:runtime)
        {us, :ok} = :timer.tc(fn -> loop(@n, f) end)
        {cpu1, _} = :erlang.statistics(:runtime)
        {us * 1000 / @n, (cpu1 - cpu0) * 1_000_000 / @n}
      end

    median = fn xs -> xs |> Enum.sort() |> Enum.at(div(@rounds, 2)) |> round() end
    wall = median.(Enum.map(samples, &elem(&1, 0)))
    cpu = median.(Enum.map(samples, &elem(&1, 1)))

    IO.puts(
      String.pad_trailing(label, 46) <> " wall #{wall} ns, CPU #{cpu} ns (median of #{@rounds})"
    )

    if System.get_env("EPROF") do
      :eprof.start()
      :eprof.profile([], fn -> loop(50_000, f) end)
      :eprof.analyze(:total, sort: :time)
      :eprof.stop()
    end
  end

  defp loop(0, _f), do: :ok

  defp loop(n, f) do
    f.()
    loop(n - 1, f)
  end
end

Bench.AdmissionCpu.main()
