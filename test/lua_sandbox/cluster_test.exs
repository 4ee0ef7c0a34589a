defmodule LuaSandbox.ClusterTest do
  # node: :any across real :peer nodes on loopback. Each test makes its own cluster group (a
  # supervisor name) on the shared peers, or starts peers of its own when it takes one down.
  use ExUnit.Case, async: false
  import LuaSandbox.TestWait

  alias LuaSandbox.{Cluster, Error, TestPeer, TestRemote}

  @moduletag timeout: 180_000

  @where %{where: &TestRemote.whereami/1}
  @probe %{probe: &TestRemote.probe/1}

  setup_all do
    peers = for _ <- 1..3, do: TestPeer.start()
    on_exit(fn -> Enum.each(peers, fn {pid, _} -> TestPeer.stop(pid) end) end)
    %{nodes: Enum.map(peers, &elem(&1, 1))}
  end

  setup do
    %{group: :"cluster_test_#{System.unique_integer([:positive])}"}
  end

  defp members(group), do: :pg.get_members(Cluster.scope(), group)

  # A run parked in a tool on `node`'s member of `group`, returned once it is running there.
  defp run_in_flight(group, node) do
    task =
      Task.async(fn ->
        LuaSandbox.run("return tools.sleep(3000)",
          node: :any,
          supervisor: group,
          tools: %{sleep: &TestRemote.sleep_tool/1}
        )
      end)

    assert wait_until(fn -> :erpc.call(node, LuaSandbox.Supervisor, :running, [group]) == 1 end)
    task
  end

  defp join(nodes, group, max) do
    pids = Enum.map(nodes, &TestPeer.member(&1, group, max))
    assert wait_until(fn -> pids -- members(group) == [] end)
    pids
  end

  defp where(group, opts \\ []) do
    opts = Keyword.merge([node: :any, supervisor: group, tools: @where], opts)
    {:ok, %{value: node}} = LuaSandbox.run("return tools.where()", opts)
    String.to_atom(node)
  end

  test "no member: :node_down at once", %{group: group} do
    t0 = System.monotonic_time(:millisecond)

    assert {:error, %Error{kind: :node_down, message: message}} =
             LuaSandbox.run("return 1", node: :any, supervisor: group)

    assert message =~ "no member"
    assert System.monotonic_time(:millisecond) - t0 < 1_000
  end

  test "a compiled chunk stays on its node", %{group: group} do
    {:ok, chunk} = LuaSandbox.compile("return 1")

    assert {:error, %Error{kind: :invalid_input}} =
             LuaSandbox.run(chunk, node: :any, supervisor: group)
  end

  test "cluster: must be a boolean" do
    assert_raise ArgumentError, ~r/cluster must be a boolean/, fn ->
      LuaSandbox.Supervisor.start_link(name: :cluster_test_bad, cluster: :yes)
    end
  end

  test "runs spread over the members", %{nodes: nodes, group: group} do
    join(nodes, group, 4)
    shares = Enum.frequencies(for _ <- 1..90, do: where(group))
    assert Enum.sort(Map.keys(shares)) == Enum.sort(nodes)
    # power of two choices over three members: each gets about a third
    for node <- nodes, do: assert(shares[node] >= 10, inspect(shares))
  end

  test "saturated members are skipped while another has room", %{nodes: nodes, group: group} do
    # two of three full: a draw of two finds only full ones a third of the time, and must look
    # further then
    [busy1, busy2, free] = nodes
    busy_pids = join([busy1, busy2], group, 1)
    join([free], group, 4)
    sleep = %{sleep: &TestRemote.sleep_tool/1}

    holders =
      for node <- [busy1, busy2] do
        Task.async(fn ->
          LuaSandbox.run("return tools.sleep(3000)", node: node, supervisor: group, tools: sleep)
        end)
      end

    # their load reaches this node's view
    assert wait_until(fn ->
             Enum.all?(busy_pids, &match?([{_, 1, 1, 0}], :ets.lookup(Cluster, &1)))
           end)

    picks = for _ <- 1..200, do: Cluster.pick(group)
    assert Enum.uniq(picks) -- busy_pids == Enum.uniq(picks)

    assert Enum.uniq(for _ <- 1..30, do: where(group)) == [free]
    Enum.each(holders, &assert({:ok, _} = Task.await(&1, 10_000)))
  end

  test "every member full: :overloaded after one retry", %{nodes: nodes, group: group} do
    [a, b, _] = nodes
    join([a, b], group, 1)
    sleep = %{sleep: &TestRemote.sleep_tool/1}

    holders =
      for node <- [a, b] do
        Task.async(fn ->
          LuaSandbox.run("return tools.sleep(2000)", node: node, supervisor: group, tools: sleep)
        end)
      end

    assert wait_until(fn ->
             Enum.all?([a, b], fn n ->
               :erpc.call(n, LuaSandbox.Supervisor, :running, [group]) == 1
             end)
           end)

    assert {:error, %Error{kind: :overloaded}} =
             LuaSandbox.run("return 1", node: :any, supervisor: group, queue_timeout: 0)

    # with a queue_timeout the retry waits in its member's queue until a slot frees
    assert {:ok, _} = LuaSandbox.run("return 1", node: :any, supervisor: group)
    Enum.each(holders, &assert({:ok, _} = Task.await(&1, 10_000)))
  end

  test "a stopped member: runs go to the others, none fails", %{nodes: nodes, group: group} do
    [gone | rest] = nodes
    join(nodes, group, 4)
    TestPeer.stop_member(gone, group)
    # at once, before every node has heard: a pick of the gone member never started its run
    # and is retried on another
    shares = Enum.frequencies(for _ <- 1..40, do: where(group))
    refute Map.has_key?(shares, gone)
    assert Enum.sort(Map.keys(shares)) == Enum.sort(rest)
  end

  test "a member stopped with a run in flight: :node_down", %{nodes: [a | _], group: group} do
    join([a], group, 4)

    in_flight = run_in_flight(group, a)
    TestPeer.stop_member(a, group)

    assert {:error, %Error{kind: :node_down, message: message}} = Task.await(in_flight, 10_000)
    assert message =~ "stopped during the run"
  end

  test "a member without its supervisor: the run never started and goes to another",
       %{nodes: [a, b | _], group: group} do
    join([a], group, 4)
    # a member of the group on b whose supervisor is not there: every pick of it is refused
    # before the run starts (:noproc)
    ghost = :erpc.call(b, :erlang, :spawn, [:timer, :sleep, [:infinity]])
    :ok = :erpc.call(b, :pg, :join, [Cluster.scope(), group, ghost])
    assert wait_until(fn -> length(members(group)) == 2 end)
    assert Enum.uniq(for _ <- 1..30, do: where(group)) == [a]
    Process.exit(ghost, :kill)
  end

  test "a member that answers :overloaded (a stale load): retried on another",
       %{nodes: [a, b | _], group: group} do
    [full] = join([a], group, 1)
    join([b], group, 4)

    holder =
      Task.async(fn ->
        LuaSandbox.run("return tools.sleep(3000)",
          node: a,
          supervisor: group,
          tools: %{sleep: &TestRemote.sleep_tool/1}
        )
      end)

    assert wait_until(fn -> match?([{_, 1, 1, 0}], :ets.lookup(Cluster, full)) end)

    for _ <- 1..30 do
      # this node's view believes the full member is empty
      send(Cluster, {:load, full, 0, 1, 0})
      :sys.get_state(Cluster)
      assert where(group) == b
    end

    assert {:ok, _} = Task.await(holder, 10_000)
  end

  test "a member killed with runs in flight: :node_down, never replayed", %{group: group} do
    Process.register(self(), :cluster_probe)
    {peer_a, a} = TestPeer.start()
    {peer_b, b} = TestPeer.start()
    on_exit(fn -> Enum.each([peer_a, peer_b], &TestPeer.stop/1) end)
    # the peer's control process would take this test down with its node
    Process.unlink(peer_a)
    join([a, b], group, 16)

    opts = [
      node: :any,
      supervisor: group,
      tools: @probe,
      globals: %{runner: Atom.to_string(node())}
    ]

    runs =
      for _ <- 1..12, do: Task.async(fn -> LuaSandbox.run("tools.probe(runner, 1500)", opts) end)

    started = for _ <- 1..12, do: assert_receive({:cluster_probe, _node}, 10_000)
    on_a = Enum.count(started, &(&1 == {:cluster_probe, a}))
    assert on_a > 0 and on_a < 12

    :erpc.cast(a, :erlang, :halt, [])
    results = Enum.map(runs, &Task.await(&1, 20_000))

    assert Enum.count(results, &match?({:error, %Error{kind: :node_down}}, &1)) == on_a
    assert Enum.count(results, &match?({:ok, _}, &1)) == 12 - on_a
    # no run started a second time
    refute_receive {:cluster_probe, _}, 500
    assert wait_until(fn -> members(group) |> Enum.map(&node/1) == [b] end)
    assert where(group) == b
  end

  test "a disconnect: the run in flight gives :node_down, later runs go elsewhere",
       %{nodes: [other | _], group: group} do
    {peer, lost} = TestPeer.start()
    on_exit(fn -> TestPeer.stop(peer) end)
    Process.unlink(peer)
    join([lost], group, 4)

    in_flight = run_in_flight(group, lost)
    join([other], group, 4)
    true = Node.disconnect(lost)

    assert {:error, %Error{kind: :node_down}} = Task.await(in_flight, 10_000)
    assert wait_until(fn -> Enum.map(members(group), &node/1) == [other] end)
    assert Enum.uniq(for _ <- 1..10, do: where(group)) == [other]
  end

  test "max_remote_bytes: refused before it is sent; node: :any keeps it local",
       %{nodes: [remote | _], group: group} do
    big = "return #'" <> String.duplicate("x", 2_000) <> "'"

    # an unreachable node: the refusal comes before any attempt to reach it
    assert {:error, %Error{kind: :invalid_input, message: message}} =
             LuaSandbox.run(big, node: :"nobody@127.0.0.1", max_remote_bytes: 1_000)

    assert message =~ "max_remote_bytes"

    # globals count too
    assert {:error, %Error{kind: :invalid_input}} =
             LuaSandbox.run("return 1",
               node: remote,
               globals: %{blob: :binary.copy("y", 5_000)},
               max_remote_bytes: 1_000
             )

    join([remote], group, 4)

    assert {:error, %Error{kind: :invalid_input}} =
             LuaSandbox.run(big, node: :any, supervisor: group, max_remote_bytes: 1_000)

    start_supervised!({LuaSandbox.Supervisor, name: group, max_concurrency: 4, cluster: true})
    assert wait_until(fn -> length(members(group)) == 2 end)

    local = "return tools.where(), #'" <> String.duplicate("x", 2_000) <> "'"
    opts = [node: :any, supervisor: group, tools: @where, max_remote_bytes: 1_000]

    for _ <- 1..20 do
      assert {:ok, %{values: [here, 2_000]}} = LuaSandbox.run(local, opts)
      assert here == Atom.to_string(node())
    end

    # small runs still go both ways
    shares = Enum.frequencies(for _ <- 1..40, do: where(group))
    assert Enum.sort(Map.keys(shares)) == Enum.sort([node(), remote])
  end

  test "config :lua_sandbox, cluster: true makes the application's supervisor a member" do
    {peer, node} = TestPeer.start(["-lua_sandbox", "cluster", "true"])
    on_exit(fn -> TestPeer.stop(peer) end)

    assert wait_until(fn -> node in Enum.map(members(LuaSandbox.TaskSupervisor), &node/1) end)
    assert where(LuaSandbox.TaskSupervisor) == node
  end

  test "a local member runs in the calling process", %{group: group} do
    start_supervised!({LuaSandbox.Supervisor, name: group, max_concurrency: 2, cluster: true})
    assert wait_until(fn -> length(members(group)) == 1 end)
    me = self()
    tools = %{me: fn _ -> self() == me end}

    assert {:ok, %{value: true}} =
             LuaSandbox.run("return tools.me()", node: :any, supervisor: group, tools: tools)
  end

  test "routing overhead: choosing a member, and node: :any against naming the node",
       %{nodes: [remote | _] = nodes, group: group} do
    join(nodes, group, 8)
    n = 20_000
    for _ <- 1..1_000, do: Cluster.pick(group)
    {us, _} = :timer.tc(fn -> for _ <- 1..n, do: Cluster.pick(group) end)
    # the target is 2 µs; asserted with room for a loaded machine
    assert us / n < 20, "pick took #{us / n} µs"

    solo = :"#{group}_solo"
    join([remote], solo, 8)
    named = p50(fn -> LuaSandbox.run("return 1", node: remote, supervisor: solo) end)
    any = p50(fn -> LuaSandbox.run("return 1", node: :any, supervisor: solo) end)
    # the target is 1.3x; asserted at 2x for a noisy machine
    assert any <= 2 * named, "node: :any p50 #{any} µs, naming the node #{named} µs"
  end

  defp p50(fun) do
    for _ <- 1..50, do: {:ok, _} = fun.()

    times =
      for _ <- 1..300 do
        {us, {:ok, _}} = :timer.tc(fun)
        us
      end

    times |> Enum.sort() |> Enum.at(150)
  end
end
