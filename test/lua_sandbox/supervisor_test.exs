defmodule LuaSandbox.SupervisorTest do
  use ExUnit.Case, async: true
  import LuaSandbox.TestWait

  import ExUnit.CaptureLog

  alias LuaSandbox.Error

  @loop "while true do end"
  @forever [max_instructions: 1_000_000_000_000]

  describe "the application's supervisor" do
    test "is started with a bounded size" do
      assert Process.whereis(LuaSandbox.TaskSupervisor)
      assert LuaSandbox.Supervisor.default_max_concurrency() >= 4
    end
  end

  describe "timeout:" do
    test "a run past its timeout is killed and returns :timeout" do
      {us, result} = :timer.tc(fn -> LuaSandbox.run(@loop, [timeout: 200] ++ @forever) end)
      assert {:error, %Error{kind: :timeout}} = result
      assert us < 5_000_000
    end

    test "a run within its timeout returns normally" do
      assert {:ok, %{value: 3}} = LuaSandbox.run("return 1 + 2", timeout: 5_000)
    end

    test "the killed task's print stream stops" do
      src = "print('a') while true do end"
      opts = [timeout: 200, print: {:send, self()}] ++ @forever
      assert {:error, %Error{kind: :timeout}} = LuaSandbox.run(src, opts)
      assert_received {:lua_print, "a\n"}
    end
  end

  describe "own supervisors" do
    test "can be started in a tree and passed as supervisor:" do
      name = :"lua_sup_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: 2})
      assert {:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: name, timeout: 5_000)
    end

    test "a full supervisor answers :overloaded at once" do
      name = :"lua_sup_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: 1})

      busy =
        Task.async(fn ->
          LuaSandbox.run(@loop, [supervisor: name, timeout: 3_000] ++ @forever)
        end)

      wait_until(fn -> Task.Supervisor.children(name) != [] end)

      {us, result} =
        :timer.tc(fn ->
          LuaSandbox.run("return 1", supervisor: name, timeout: 1_000, queue_timeout: 0)
        end)

      assert {:error, %Error{kind: :overloaded}} = result
      assert us < 2_000_000
      assert {:error, %Error{kind: :timeout}} = Task.await(busy, 10_000)
      # room again once the busy run was killed
      assert {:ok, _} = LuaSandbox.run("return 1", supervisor: name, timeout: 1_000)
    end
  end

  describe "async/await" do
    test "await_many returns results in order" do
      tasks = for i <- 1..5, do: LuaSandbox.async("return i * 10", globals: %{i: i})

      assert Enum.map(LuaSandbox.await_many(tasks, 5_000), fn {:ok, r} -> r.value end) ==
               [10, 20, 30, 40, 50]
    end

    test "await kills a run past its timeout" do
      task = LuaSandbox.async(@loop, @forever)
      assert {:error, %Error{kind: :timeout}} = LuaSandbox.await(task, 100)
      refute Process.alive?(task.pid)
    end

    test "async on a full supervisor with queue_timeout: 0 gives :overloaded" do
      name = :"lua_sup_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: 1})
      busy = LuaSandbox.async(@loop, [supervisor: name] ++ @forever)
      refused = LuaSandbox.async("return 1", supervisor: name, queue_timeout: 0)
      assert {:error, %Error{kind: :overloaded}} = LuaSandbox.await(refused, 1_000)
      assert {:error, %Error{kind: :timeout}} = LuaSandbox.await(busy, 100)
    end

    test "await returns errors as values" do
      task = LuaSandbox.async("error('x')")
      assert {:error, %Error{kind: :runtime}} = LuaSandbox.await(task)
    end
  end

  describe "print streaming and logging" do
    test "{:send, pid} delivers a chunk while the script still runs" do
      parent = self()

      task =
        Task.async(fn ->
          LuaSandbox.run("print('early') while true do end",
            print: {:send, parent},
            max_instructions: 1_000_000_000_000,
            timeout: 3_000
          )
        end)

      assert_receive {:lua_print, "early\n"}, 2_000
      # the run is still going when the message is here
      assert Task.yield(task, 0) == nil
      assert {:error, %Error{kind: :timeout}} = Task.await(task, 10_000)
    end

    test ":log logs each printed line" do
      log =
        capture_log(fn ->
          assert {:ok, r} = LuaSandbox.run("print('one') print('two')", print: :log)
          assert r.output == "one\ntwo\n"
        end)

      assert log =~ "one"
      assert log =~ "two"
    end
  end
end
