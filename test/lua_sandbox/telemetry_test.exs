defmodule LuaSandbox.TelemetryTest do
  # LuaSandbox.Telemetry against the real :telemetry library (vendored for the tests only,
  # loaded by LuaSandbox.TestTelemetry): the events, their measurements and metadata.
  use ExUnit.Case, async: true
  import LuaSandbox.TestWait

  alias LuaSandbox.{Error, Session}

  # loaded at test time (LuaSandbox.TestTelemetry), not a dependency
  @compile {:no_warn_undefined, :telemetry}

  @events [
    [:lua_sandbox, :run, :start],
    [:lua_sandbox, :run, :stop],
    [:lua_sandbox, :run, :rejected],
    [:lua_sandbox, :sandbox, :denied],
    [:lua_sandbox, :session, :call, :start],
    [:lua_sandbox, :session, :call, :stop]
  ]

  setup_all do
    LuaSandbox.TestTelemetry.start!()
  end

  # Other tests run meanwhile (on other supervisors): only this test's supervisor is reported.
  def handle(event, measurements, metadata, %{pid: pid, sup: sup}) do
    if metadata.supervisor == sup, do: send(pid, {:event, event, measurements, metadata})
  end

  setup do
    sup = :"lua_telemetry_#{System.unique_integer([:positive])}"

    start_supervised!(
      {LuaSandbox.Supervisor,
       name: sup, max_concurrency: 1, quotas: %{"limited" => [rate: {1, 60_000}]}}
    )

    id = {__MODULE__, sup}
    :ok = :telemetry.attach_many(id, @events, &__MODULE__.handle/4, %{pid: self(), sup: sup})
    on_exit(fn -> :telemetry.detach(id) end)
    %{sup: sup}
  end

  test "a run emits :start and :stop with its stats and metadata", %{sup: sup} do
    opts = [supervisor: sup, tenant: "acme", chunk_name: "agent"]

    assert {:ok, result} =
             LuaSandbox.run("local s = 0 for i = 1, 100 do s = s + i end return s", opts)

    assert_received {:event, [:lua_sandbox, :run, :start], start, meta}
    assert %{supervisor: ^sup, tenant: "acme", chunk: "agent"} = meta
    assert %{monotonic_time: _, system_time: system_time, queue_time: 0} = start
    assert abs(system_time - System.system_time()) < System.convert_time_unit(5, :second, :native)

    assert_received {:event, [:lua_sandbox, :run, :stop], stop, meta}
    assert %{supervisor: ^sup, tenant: "acme", chunk: "agent", kind: :ok} = meta
    assert stop.duration > 0 and stop.queue_time == 0

    assert Map.take(stop, [:cpu_us, :instructions, :memory_peak, :tool_calls]) ==
             Map.take(result.stats, [:cpu_us, :instructions, :memory_peak, :tool_calls])

    assert {:error, %Error{kind: :runtime}} = LuaSandbox.run("error('x')", supervisor: sup)
    assert_received {:event, [:lua_sandbox, :run, :stop], _, %{kind: :runtime, tenant: nil}}
  end

  test "a compiled chunk is reported under its own name", %{sup: sup} do
    chunk = LuaSandbox.compile!("return 1", chunk_name: "compiled")
    assert {:ok, _} = LuaSandbox.run(chunk, supervisor: sup)
    assert_received {:event, [:lua_sandbox, :run, :stop], _, %{chunk: "compiled"}}
  end

  test "a refused run emits :rejected with its kind and retry hint, and no :start", %{sup: sup} do
    assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, tenant: "limited")

    assert {:error, %Error{kind: :rate_limited}} =
             LuaSandbox.run("return 1", supervisor: sup, tenant: "limited")

    assert_received {:event, [:lua_sandbox, :run, :rejected], %{count: 1}, meta}
    assert %{kind: :rate_limited, tenant: "limited", retry_after_ms: ms} = meta
    assert ms > 0

    me = self()
    tools = %{wait: fn _ -> send(me, :holding) && receive(do: (:go -> 1)) end}

    holder =
      Task.async(fn -> LuaSandbox.run("return tools.wait()", supervisor: sup, tools: tools) end)

    assert_receive :holding, 5_000

    assert {:error, %Error{kind: :overloaded}} =
             LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 0)

    assert_received {:event, [:lua_sandbox, :run, :rejected], _,
                     %{kind: :overloaded, retry_after_ms: nil}}

    # a queued run reports its wait
    waiter = Task.async(fn -> LuaSandbox.run("return 2", supervisor: sup) end)
    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 1 end)
    Process.sleep(20)
    send(holder.pid, :go)
    assert {:ok, _} = Task.await(holder, 5_000)
    assert {:ok, %{value: 2}} = Task.await(waiter, 5_000)

    queue_times = for {:event, [:lua_sandbox, :run, :stop], %{queue_time: q}, _} <- flush(), do: q

    assert Enum.any?(queue_times, &(System.convert_time_unit(&1, :native, :millisecond) >= 20))
  end

  test "a denied capability emits :denied with its name and count", %{sup: sup} do
    opts = [supervisor: sup, tenant: "acme", chunk_name: "agent"]
    assert {:ok, _} = LuaSandbox.run("pcall(os.getenv) pcall(os.getenv) pcall(io.open)", opts)

    denied =
      for {:event, [:lua_sandbox, :sandbox, :denied], %{count: n}, meta} <- flush() do
        assert %{tenant: "acme", chunk: "agent"} = meta
        {meta.capability, n}
      end

    assert Enum.sort(denied) == [{"io.open", 1}, {"os.getenv", 2}]
  end

  test "a session call emits the session events", %{sup: sup} do
    {:ok, s} = Session.start_link(supervisor: sup, chunk_name: "repl", tenant: "limited")
    assert {:ok, _} = Session.run(s, "x = 1")

    assert_received {:event, [:lua_sandbox, :session, :call, :start], _,
                     %{session: ^s, chunk: "repl", tenant: "limited"}}

    assert_received {:event, [:lua_sandbox, :session, :call, :stop], %{instructions: n},
                     %{kind: :ok, tenant: "limited"}}

    assert n > 0
    # the tenant's rate ({1, 60_000}) is used up: the next call is refused
    assert {:error, %Error{kind: :rate_limited}} = Session.run(s, "x = 2")

    assert_received {:event, [:lua_sandbox, :run, :rejected], _,
                     %{kind: :rate_limited, tenant: "limited"}}
  end

  defp flush do
    receive do
      message -> [message | flush()]
    after
      0 -> []
    end
  end
end
