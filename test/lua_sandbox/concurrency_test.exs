defmodule LuaSandbox.ConcurrencyTest do
  # One bound for concurrency: every run counts against its supervisor, and async_stream queues.
  use ExUnit.Case, async: true
  import LuaSandbox.TestWait

  alias LuaSandbox.Error

  @loop "while true do end"
  @forever [max_instructions: 1_000_000_000_000]

  defp start_sup(max) do
    name = :"lua_sup_#{System.unique_integer([:positive])}"
    start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: max}, id: name)
    name
  end

  defp busy(name, opts \\ []) do
    parent = self()

    pid =
      spawn(fn ->
        send(parent, {:started, self()})
        LuaSandbox.run(@loop, [supervisor: name] ++ opts ++ @forever)
      end)

    assert_receive {:started, ^pid}
    wait_until(fn -> LuaSandbox.Supervisor.running(name) == 1 end)
    pid
  end

  describe "supervisor: without timeout:" do
    test "a run holds a slot for its duration, so a full supervisor answers :overloaded" do
      name = start_sup(1)
      pid = busy(name)

      assert {:error, %Error{kind: :overloaded, stats: %{instructions: 0}}} =
               LuaSandbox.run("return 1", supervisor: name, queue_timeout: 0)

      # with timeout: too, the same bound
      assert {:error, %Error{kind: :overloaded}} =
               LuaSandbox.run("return 1", supervisor: name, timeout: 1_000, queue_timeout: 0)

      Process.exit(pid, :kill)
      # the slot goes with its caller
      wait_until(fn -> LuaSandbox.Supervisor.running(name) == 0 end)
      assert {:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: name)
    end

    test "sequential runs from one caller never see their own previous slot" do
      name = start_sup(1)

      for i <- 1..200,
          do: assert({:ok, %{value: ^i}} = LuaSandbox.run("return #{i}", supervisor: name))

      assert LuaSandbox.Supervisor.running(name) == 0
    end

    test "a slot is released when the run raises in a tool" do
      name = start_sup(1)
      tools = %{t: fn _ -> exit(:bye) end}
      assert {:error, _} = LuaSandbox.run("tools.t()", supervisor: name, tools: tools)
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: name)
    end
  end

  describe "an unknown or dead supervisor: is an ArgumentError" do
    test "never started, with or without timeout:" do
      for opts <- [[], [timeout: 1_000]] do
        assert_raise ArgumentError, ~r/supervisor DoesNotExist is not running/, fn ->
          LuaSandbox.run("return 1", [supervisor: DoesNotExist] ++ opts)
        end
      end

      assert_raise ArgumentError, ~r/not running/, fn ->
        LuaSandbox.async("return 1", supervisor: DoesNotExist)
      end

      assert_raise ArgumentError, ~r/not running/, fn ->
        LuaSandbox.async_stream(["return 1"], supervisor: DoesNotExist)
      end
    end

    test "stopped" do
      name = :"lua_sup_#{System.unique_integer([:positive])}"
      {:ok, pid} = LuaSandbox.Supervisor.start_link(name: name, max_concurrency: 2)
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: name)
      Process.unlink(pid)
      Supervisor.stop(pid)
      wait_until(fn -> Process.whereis(name) == nil end)

      for opts <- [[], [timeout: 1_000]] do
        assert_raise ArgumentError, ~r/not running/, fn ->
          LuaSandbox.run("return 1", [supervisor: name] ++ opts)
        end
      end
    end
  end

  describe "timeout: runs" do
    test "a caller that dies stops its supervised run" do
      name = start_sup(2)
      pid = busy(name, timeout: 60_000)
      [task] = Task.Supervisor.children(name)
      assert LuaSandbox.Supervisor.running(name) == 1
      ref = Process.monitor(task)
      Process.exit(pid, :kill)
      assert_receive {:DOWN, ^ref, :process, ^task, :killed}, 2_000
    end

    test "an async/2 task stops when the process that started it dies" do
      parent = self()

      owner =
        spawn(fn ->
          task = LuaSandbox.async(@loop, @forever)
          send(parent, {:task, task.pid})
          Process.sleep(:infinity)
        end)

      assert_receive {:task, task_pid}, 2_000
      ref = Process.monitor(task_pid)
      Process.exit(owner, :kill)
      assert_receive {:DOWN, ^ref, :process, ^task_pid, :killed}, 2_000
    end

    test "a :timeout error keeps stats with every key" do
      started = System.monotonic_time(:microsecond)

      assert {:error, %Error{kind: :timeout, stats: stats}} =
               LuaSandbox.run(@loop, [timeout: 100] ++ @forever)

      elapsed = System.monotonic_time(:microsecond) - started

      assert Map.keys(stats) |> Enum.sort() == [
               :cpu_us,
               :denied,
               :duration_us,
               :instructions,
               :memory_peak,
               :tool_calls
             ]

      # The deadline counts from the caller's call: the caller waited at least the timeout
      # (less up to 1 ms: the deadline is whole milliseconds of the monotonic clock), and the
      # run (a part of that wait) took some of it, but may start later than the call.
      assert elapsed >= 99_000
      assert stats.duration_us > 0 and stats.duration_us <= elapsed
      assert is_integer(stats.instructions)
    end

    test "a caller that traps exits gets no stray messages" do
      Process.flag(:trap_exit, true)
      assert {:ok, _} = LuaSandbox.run("return 1", timeout: 1_000)
      refute_receive {:EXIT, _, _}, 50
    end
  end

  describe "async_stream/2" do
    test "20 scripts on a supervisor bounded to 2 all succeed, in order" do
      name = start_sup(2)

      sources =
        for i <- 1..20,
            do: {"local s = 0 for j = 1, 20000 do s = s + j end return i", globals: %{i: i}}

      results =
        sources |> LuaSandbox.async_stream(supervisor: name, max_concurrency: 8) |> Enum.to_list()

      assert Enum.map(results, fn {:ok, r} -> r.value end) == Enum.to_list(1..20)
    end

    test "queues behind runs of other callers instead of answering :overloaded" do
      name = start_sup(1)
      pid = busy(name)
      stream = LuaSandbox.async_stream(["return 1", "return 2"], supervisor: name)
      Task.start(fn -> Process.sleep(200) && Process.exit(pid, :kill) end)
      assert Enum.map(stream, fn {:ok, r} -> r.value end) == [1, 2]
    end

    test "timeout kills a run and gives :timeout; the others finish" do
      stream =
        LuaSandbox.async_stream(
          [@loop, "return 1"],
          [timeout: 2_000, max_concurrency: 2] ++ @forever
        )

      assert [{:error, %Error{kind: :timeout, stats: %{instructions: 0}}}, {:ok, %{value: 1}}] =
               Enum.to_list(stream)
    end

    test "ordered: false and per-element options" do
      results =
        [{"return x", globals: %{x: 1}}, {"return x", globals: %{x: 2}}]
        |> LuaSandbox.async_stream(ordered: false)
        |> Enum.map(fn {:ok, r} -> r.value end)

      assert Enum.sort(results) == [1, 2]
    end

    test "bad options are ArgumentErrors" do
      assert_raise ArgumentError, fn -> LuaSandbox.async_stream([], on_timeout: :exit) end
      assert_raise ArgumentError, fn -> LuaSandbox.async_stream([], nope: 1) end

      assert_raise ArgumentError, ~r/may not set timeout/, fn ->
        LuaSandbox.async_stream([{"return 1", timeout: 1}]) |> Enum.to_list()
      end
    end
  end
end
