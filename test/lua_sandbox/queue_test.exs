defmodule LuaSandbox.QueueTest do
  # The FIFO queue of a full LuaSandbox.Supervisor (Supervisor.Slots): queue_timeout:, the
  # order, fairness against callers that retry, waiters that die, and the queue length that
  # Supervisor.load/1 and the cluster member publish.
  use ExUnit.Case, async: true
  import LuaSandbox.TestWait

  alias LuaSandbox.Error

  defp start_sup(max \\ 1) do
    name = :"lua_queue_#{System.unique_integer([:positive])}"
    start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: max})
    name
  end

  # A run holding a slot of `sup` until told to go; returns {task, pid to send :go}.
  defp blocker(sup) do
    me = self()

    task =
      Task.async(fn ->
        tools = %{wait: fn _ -> send(me, {:holding, self()}) && receive(do: (:go -> 1)) end}
        LuaSandbox.run("return tools.wait()", supervisor: sup, tools: tools)
      end)

    assert_receive {:holding, pid}, 5_000
    {task, pid}
  end

  # A run started in its own process that reports {:ran, tag} while it runs (a slot at a time:
  # the order of the runs) and {:done, tag, result}; returns once it waits in the queue (the
  # queue's length reached `position`).
  defp queued_run(sup, tag, position) do
    me = self()

    {:ok, pid} =
      Task.start(fn ->
        send(me, {:done, tag, LuaSandbox.run(source(tag), [supervisor: sup] ++ marking(me))})
      end)

    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == position end)
    pid
  end

  defp source(tag), do: "return tools.mark('#{tag}')"
  defp marking(me), do: [tools: %{mark: fn [t] -> send(me, {:ran, t}) && t end}]

  describe "run/2 on a full supervisor" do
    test "waits for a free slot, then runs; the wait is counted" do
      sup = start_sup()
      {task, holder} = blocker(sup)
      queued_run(sup, :a, 1)
      refute_received {:done, :a, _}
      send(holder, :go)
      assert {:ok, _} = Task.await(task, 5_000)
      assert_receive {:done, :a, {:ok, %{value: "a"}}}, 5_000
      assert %{queue: 0, running: 0} = LuaSandbox.Supervisor.load(sup)
      assert %{queued: 1, queue_us: us, overloads: 0} = LuaSandbox.metrics(sup)
      assert us > 0
    end

    test "queue_timeout: ms answers :overloaded after ms; 0 answers at once" do
      sup = start_sup()
      {_task, _holder} = blocker(sup)

      {us, result} =
        :timer.tc(fn -> LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 150) end)

      assert {:error, %Error{kind: :overloaded}} = result
      assert us >= 150_000 and us < 5_000_000

      {us, result} =
        :timer.tc(fn -> LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 0) end)

      assert {:error, %Error{kind: :overloaded}} = result
      assert us < 100_000
      assert %{queue: 0} = LuaSandbox.Supervisor.load(sup)
      assert LuaSandbox.metrics(sup).overloads == 2
    end

    test "a run with timeout: waits no longer than its deadline" do
      sup = start_sup()
      {_task, _holder} = blocker(sup)

      {us, result} =
        :timer.tc(fn ->
          LuaSandbox.run("return 1", supervisor: sup, timeout: 200, queue_timeout: 60_000)
        end)

      assert {:error, %Error{kind: :overloaded}} = result
      assert us >= 150_000 and us < 5_000_000
    end
  end

  test "waiters are served in arrival order, whichever function queued them" do
    sup = start_sup()
    {task, holder} = blocker(sup)
    me = self()
    queued_run(sup, :first, 1)

    {:ok, _} =
      Task.start(fn ->
        t = LuaSandbox.async(source(:second), [supervisor: sup] ++ marking(me))
        send(me, {:done, :second, LuaSandbox.await(t, 10_000)})
      end)

    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 2 end)

    {:ok, _} =
      Task.start(fn ->
        [r] =
          [source(:third)]
          |> LuaSandbox.async_stream([supervisor: sup] ++ marking(me))
          |> Enum.to_list()

        send(me, {:done, :third, r})
      end)

    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 3 end)
    queued_run(sup, :fourth, 4)
    send(holder, :go)
    Task.await(task, 5_000)

    order = for _ <- 1..4, do: assert_receive({:ran, tag}, 5_000) && tag
    assert order == ~w(first second third fourth)

    for tag <- ~w(first second third fourth)a do
      assert_receive {:done, ^tag, {:ok, %{value: value}}}, 5_000
      assert value == Atom.to_string(tag)
    end
  end

  describe "session calls on a full supervisor" do
    test "wait in the same FIFO queue as runs, in arrival order" do
      sup = start_sup()
      me = self()
      {:ok, s} = LuaSandbox.Session.start_link([supervisor: sup] ++ marking(me))
      {task, holder} = blocker(sup)
      queued_run(sup, :first, 1)

      {:ok, _} =
        Task.start(fn ->
          send(me, {:done, :second, LuaSandbox.Session.run(s, source(:second))})
        end)

      wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 2 end)
      queued_run(sup, :third, 3)
      send(holder, :go)
      Task.await(task, 5_000)

      order = for _ <- 1..3, do: assert_receive({:ran, tag}, 5_000) && tag
      assert order == ~w(first second third)
      assert_receive {:done, :second, {:ok, %{value: "second"}}}, 5_000
      assert LuaSandbox.metrics(sup).queued == 3
    end

    test "the session's queue_timeout: answers :overloaded after it; 0 at once" do
      sup = start_sup()
      {:ok, waits} = LuaSandbox.Session.start_link(supervisor: sup, queue_timeout: 150)
      {:ok, never} = LuaSandbox.Session.start_link(supervisor: sup, queue_timeout: 0)
      {_task, _holder} = blocker(sup)

      {us, result} = :timer.tc(fn -> LuaSandbox.Session.run(waits, "return 1") end)
      assert {:error, %Error{kind: :overloaded}} = result
      assert us >= 150_000 and us < 5_000_000

      {us, result} = :timer.tc(fn -> LuaSandbox.Session.run(never, "return 1") end)
      assert {:error, %Error{kind: :overloaded}} = result
      assert us < 100_000

      # the call's own timeout bounds the wait too (the default queue_timeout is 5 s)
      {:ok, default} = LuaSandbox.Session.start_link(supervisor: sup)
      {us, result} = :timer.tc(fn -> LuaSandbox.Session.run(default, "return 1", timeout: 60) end)
      assert {:error, %Error{kind: :overloaded}} = result
      assert us >= 50_000 and us < 2_000_000
      assert LuaSandbox.metrics(sup).overloads == 3
    end
  end

  test "callers that retry at once cannot take a slot from a run that waits" do
    sup = start_sup()
    {task, holder} = blocker(sup)
    me = self()
    # runs the retriers got in, as the waiter sees it when it runs
    got_in = :atomics.new(1, [])
    seen = fn _ -> send(me, {:waiter_saw, :atomics.get(got_in, 1)}) && 1 end

    waiter =
      Task.async(fn ->
        LuaSandbox.run("return tools.seen()", supervisor: sup, tools: %{seen: seen})
      end)

    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 1 end)

    # two callers retrying without waiting, as fast as they can, from before the slot frees
    retriers = for _ <- 1..2, do: spawn_link(fn -> retry(sup, got_in) end)
    Process.sleep(50)
    send(holder, :go)
    Task.await(task, 5_000)
    assert {:ok, %{value: 1}} = Task.await(waiter, 5_000)
    assert_received {:waiter_saw, 0}
    # and they do get in once nobody waits
    wait_until(fn -> :atomics.get(got_in, 1) > 0 end)
    Enum.each(retriers, &stop/1)
  end

  defp retry(sup, got_in) do
    case LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 0) do
      {:ok, _} -> :atomics.add(got_in, 1, 1)
      {:error, %Error{kind: :overloaded}} -> :ok
    end

    retry(sup, got_in)
  end

  test "a waiter that dies leaves the queue and takes no slot" do
    sup = start_sup()
    {task, holder} = blocker(sup)
    pid = queued_run(sup, :dead, 1)
    Process.exit(pid, :kill)
    wait_until(fn -> LuaSandbox.Supervisor.load(sup).queue == 0 end)
    send(holder, :go)
    Task.await(task, 5_000)
    wait_until(fn -> LuaSandbox.Supervisor.load(sup).running == 0 end)
    assert {:ok, _} = LuaSandbox.run("return 1", supervisor: sup, queue_timeout: 0)
    refute_received {:done, :dead, _}
  end

  test "a cluster member publishes the real queue length" do
    sup = start_sup(2)
    {_t1, _h1} = blocker(sup)
    {_t2, _h2} = blocker(sup)
    x = queued_run(sup, :x, 1)
    y = queued_run(sup, :y, 2)
    assert LuaSandbox.Cluster.Member.load(sup, 2) == {2, 2, 2}
    Enum.each([x, y], &stop/1)
  end

  # Kills `pid` and waits until it is gone (before the test's supervisor stops under it).
  defp stop(pid) do
    ref = Process.monitor(pid)
    Process.unlink(pid)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}, 5_000
  end
end
