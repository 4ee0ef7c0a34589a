defmodule LuaSandbox.QuotasTest do
  # tenant: and the quotas: of LuaSandbox.Supervisor (rate, concurrency, CPU balance), and the
  # metrics they leave in LuaSandbox.metrics/1.
  use ExUnit.Case, async: true
  import LuaSandbox.TestWait

  alias LuaSandbox.Error

  @forever [max_instructions: 1_000_000_000_000]

  defp start_sup(quotas, max \\ 4) do
    name = :"lua_quotas_#{System.unique_integer([:positive])}"
    start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: max, quotas: quotas})
    name
  end

  # A run of `tenant` that waits in a tool until told to go; returns {task, go}.
  defp blocked_run(sup, tenant) do
    me = self()

    task =
      Task.async(fn ->
        tools = %{wait: fn _ -> send(me, {:waiting, self()}) && receive(do: (:go -> 1)) end}
        LuaSandbox.run("return tools.wait()", supervisor: sup, tenant: tenant, tools: tools)
      end)

    assert_receive {:waiting, pid}, 5_000
    {task, pid}
  end

  describe "rate: {count, per_ms}" do
    test "a burst of count passes, the next is :rate_limited with retry_after_ms, later passes" do
      sup = start_sup(%{default: [rate: {3, 300}]})
      run = fn -> LuaSandbox.run("return 1", supervisor: sup, tenant: "t") end

      for _ <- 1..3, do: assert({:ok, _} = run.())
      assert {:error, %Error{kind: :rate_limited, retry_after_ms: wait}} = run.()
      assert wait > 0 and wait <= 100
      Process.sleep(wait + 5)
      assert {:ok, _} = run.()
      # a tenant is not another's: "u" still has its burst
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, tenant: "u")
      # no tenant, no quota
      for _ <- 1..5, do: assert({:ok, _} = LuaSandbox.run("return 1", supervisor: sup))
    end

    test "callers racing for one tenant's burst admit exactly count" do
      sup = start_sup(%{default: [rate: {10, 60_000}]}, 64)

      results =
        1..40
        |> Enum.map(fn _ ->
          Task.async(fn -> LuaSandbox.run("return 1", supervisor: sup, tenant: :race) end)
        end)
        |> Task.await_many(10_000)

      assert Enum.count(results, &match?({:ok, _}, &1)) == 10
      assert Enum.count(results, &match?({:error, %Error{kind: :rate_limited}}, &1)) == 30
    end

    test "a tenant's own entry overrides default" do
      sup = start_sup(%{:default => [rate: {1, 60_000}], "vip" => [rate: {5, 60_000}]})
      run = fn t -> LuaSandbox.run("return 1", supervisor: sup, tenant: t) end
      for _ <- 1..5, do: assert({:ok, _} = run.("vip"))
      assert {:ok, _} = run.("x")
      assert {:error, %Error{kind: :rate_limited}} = run.("x")
    end
  end

  test "one caller alternating supervisors for one tenant keeps their states apart" do
    a = start_sup(%{default: [rate: {2, 60_000}]})
    b = start_sup(%{default: [rate: {3, 60_000}]})

    results =
      for _ <- 1..4, sup <- [a, b] do
        case LuaSandbox.run("return 1", supervisor: sup, tenant: "t") do
          {:ok, _} -> :ok
          {:error, %Error{kind: kind}} -> kind
        end
      end

    assert results == [:ok, :ok, :ok, :ok, :rate_limited, :ok, :rate_limited, :rate_limited]
    assert LuaSandbox.metrics(a).by_tenant == %{"t" => %{ok: 2, rate_limited: 2}}
    assert LuaSandbox.metrics(b).by_tenant == %{"t" => %{ok: 3, rate_limited: 1}}
  end

  describe "concurrency: n" do
    test "the tenant's n+1th run at once is refused; others and later runs pass" do
      sup = start_sup(%{default: [concurrency: 1]})
      {task, pid} = blocked_run(sup, "a")

      assert {:error, %Error{kind: :rate_limited, retry_after_ms: ms}} =
               LuaSandbox.run("return 1", supervisor: sup, tenant: "a")

      assert is_integer(ms)
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, tenant: "b")
      send(pid, :go)
      assert {:ok, %{value: 1}} = Task.await(task, 5_000)
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, tenant: "a")
    end

    test "a killed caller gives its tenant's count back" do
      sup = start_sup(%{default: [concurrency: 1]})
      {task, _pid} = blocked_run(sup, "a")
      Task.shutdown(task, :brutal_kill)

      wait_until(fn ->
        match?({:ok, _}, LuaSandbox.run("return 1", supervisor: sup, tenant: "a"))
      end)

      assert LuaSandbox.metrics(sup).kills == 1
    end
  end

  describe "cpu_ms: {ms, per_ms}" do
    test "a run is stopped at the balance, debited, and the next is refused until it refills" do
      sup = start_sup(%{default: [cpu_ms: {50, 60_000}]})
      opts = [supervisor: sup, tenant: "c"] ++ @forever

      # busy runs, each stopped at what is left, until the balance is gone: no overdraft
      # beyond the deadline check's granularity (and CPU never exceeds wall time)
      {spent, refusal} =
        Enum.reduce_while(1..20, {0, nil}, fn _, {spent, nil} ->
          case LuaSandbox.run("while true do end", opts) do
            {:error, %Error{kind: :quota_exceeded, retry_after_ms: nil} = e} ->
              {:cont, {spent + e.stats.cpu_us, nil}}

            {:error, %Error{kind: :quota_exceeded} = e} ->
              {:halt, {spent, e}}
          end
        end)

      assert spent > 10_000 and spent < 50_000 + 20_000
      assert %Error{retry_after_ms: wait, stats: %{instructions: 0}} = refusal
      assert wait > 0
      # another tenant has its own balance
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, tenant: "d")
    end

    test "a run within the balance is debited its cpu_us and keeps its own timeout" do
      sup = start_sup(%{default: [cpu_ms: {60_000, 60_000}]})
      opts = [supervisor: sup, tenant: "c", timeout: 100] ++ @forever
      assert {:error, %Error{kind: :timeout}} = LuaSandbox.run("while true do end", opts)
      assert LuaSandbox.metrics(sup).cpu_us > 0
    end
  end

  describe "a session's tenant:" do
    defp session(sup, tenant),
      do: elem(LuaSandbox.Session.start_link(supervisor: sup, tenant: tenant), 1)

    test "every call is admitted under the tenant's rate and counted by tenant" do
      sup = start_sup(%{default: [rate: {2, 60_000}]})
      s = session(sup, "s")
      assert {:ok, _} = LuaSandbox.Session.run(s, "x = 1")
      assert {:ok, %{value: 1}} = LuaSandbox.Session.run(s, "return x")

      assert {:error, %Error{kind: :rate_limited, retry_after_ms: ms}} =
               LuaSandbox.Session.run(s, "x = 2")

      assert ms > 0
      # the refused call did not run
      assert LuaSandbox.Session.info(s).calls == 2
      # runs of the same tenant share the rate
      assert {:error, %Error{kind: :rate_limited}} =
               LuaSandbox.run("return 1", supervisor: sup, tenant: "s")

      assert LuaSandbox.metrics(sup).by_tenant == %{"s" => %{ok: 2, rate_limited: 2}}
    end

    test "a call counts against the tenant's concurrency" do
      sup = start_sup(%{default: [concurrency: 1]})
      s = session(sup, "a")
      {task, pid} = blocked_run(sup, "a")

      assert {:error, %Error{kind: :rate_limited}} = LuaSandbox.Session.run(s, "return 1")
      send(pid, :go)
      assert {:ok, _} = Task.await(task, 5_000)
      assert {:ok, %{value: 1}} = LuaSandbox.Session.run(s, "return 1")
    end

    test "a call is capped by the CPU balance, debited, and rolled back when stopped" do
      sup = start_sup(%{default: [cpu_ms: {50, 5_000}]})
      s = session(sup, "c")
      assert {:ok, _} = LuaSandbox.Session.run(s, "n = 0")

      refusal =
        Enum.find_value(1..20, fn _ ->
          case LuaSandbox.Session.run(
                 s,
                 "n = n + 1 while true do end",
                 [timeout: 2_000] ++ @forever
               ) do
            {:error, %Error{kind: :quota_exceeded, retry_after_ms: nil}} -> nil
            {:error, %Error{kind: :quota_exceeded} = e} -> e
          end
        end)

      assert %Error{retry_after_ms: wait, stats: %{instructions: 0}} = refusal
      assert wait > 0
      # the balance is the tenant's, shared with its runs
      assert {:error, %Error{kind: :quota_exceeded}} =
               LuaSandbox.run("return 1", supervisor: sup, tenant: "c")

      assert LuaSandbox.metrics(sup).cpu_us > 10_000
      # once it refills a little: every stopped call was rolled back
      wait_until(fn -> match?({:ok, %{value: 0}}, LuaSandbox.Session.run(s, "return n")) end)
    end
  end

  describe "LuaSandbox.metrics/1" do
    test "counts runs by kind and tenant, refusals, sums and the memory histogram" do
      sup = start_sup(%{default: [rate: {2, 60_000}]}, 4)
      run = &LuaSandbox.run(&1, supervisor: sup, tenant: "m")
      assert {:ok, _} = run.("return 1")
      assert {:error, %Error{kind: :runtime}} = run.("error('x')")
      assert {:error, %Error{kind: :rate_limited}} = run.("return 1")
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup)

      m = LuaSandbox.metrics(sup)
      assert m.by_tenant == %{"m" => %{ok: 1, runtime: 1, rate_limited: 1}}
      assert m.by_kind.ok == 2 and m.by_kind.runtime == 1 and m.rate_limited == 1
      assert m.runs == 4
      assert m.instructions > 0 and m.duration_us > 0
      assert m.memory_peak_histogram |> Map.values() |> Enum.sum() == 3
      assert %{running: 0, capacity: 4} = LuaSandbox.Supervisor.load(sup)
      assert m.running == 0 and m.capacity == 4
    end

    test "an :overloaded refusal is counted once" do
      sup = start_sup(nil, 1)
      {task, pid} = blocked_run(sup, nil)

      assert {:error, %Error{kind: :overloaded}} =
               LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 0)

      assert %{running: 1, capacity: 1, queue: 0} = LuaSandbox.Supervisor.load(sup)
      send(pid, :go)
      Task.await(task, 5_000)
      assert LuaSandbox.metrics(sup).overloads == 1
    end
  end

  test "bad quotas are an ArgumentError" do
    for bad <- [[rate: 1], %{default: [rate: {0, 10}]}, %{default: [burst: 1]}, %{x: 3}] do
      assert_raise ArgumentError, fn ->
        LuaSandbox.Supervisor.start_link(name: :bad_quotas, quotas: bad)
      end
    end
  end
end
