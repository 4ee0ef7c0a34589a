defmodule LuaSandbox.DistributionTest do
  # Real :peer nodes on loopback, started and stopped here.
  use ExUnit.Case, async: false
  import LuaSandbox.TestWait

  alias LuaSandbox.{Error, TestPeer}

  @moduletag timeout: 120_000

  setup_all do
    {peer, node} = TestPeer.start()
    on_exit(fn -> TestPeer.stop(peer) end)
    %{node: node}
  end

  test "node: runs the script on the other node", %{node: node} do
    # an external fun: its module exists on the peer too (test/support is on its code path)
    where = %{where: &LuaSandbox.TestRemote.whereami/1}
    assert {:ok, r} = LuaSandbox.run("return tools.where()", node: node, tools: where)
    assert r.value == Atom.to_string(node)
  end

  test "errors come back from the other node as values", %{node: node} do
    assert {:error, %Error{kind: :runtime, line: 1}} = LuaSandbox.run("error('x')", node: node)
  end

  test "timeout: applies across nodes and kills the remote task", %{node: node} do
    src = "while true do end"
    opts = [node: node, timeout: 300, max_instructions: 1_000_000_000_000]
    assert {:error, %Error{kind: :timeout}} = LuaSandbox.run(src, opts)

    assert wait_until(fn ->
             :erpc.call(node, Task.Supervisor, :children, [LuaSandbox.TaskSupervisor]) == []
           end)
  end

  test "a run while the application is not started says so and how to start it" do
    {peer, node} = TestPeer.start()
    :ok = :erpc.call(node, Application, :stop, [:lua_sandbox])

    message =
      try do
        :erpc.call(node, LuaSandbox, :run, ["return 1"])
      rescue
        e in ErlangError ->
          {:exception, %ArgumentError{message: message}, _stack} = e.original
          message
      end

    assert message =~ "the :lua_sandbox application is not started"
    assert message =~ "Application.ensure_all_started(:lua_sandbox)"
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:lua_sandbox])
    assert {:ok, %{value: 1}} = :erpc.call(node, LuaSandbox, :run, ["return 1"])
    TestPeer.stop(peer)
  end

  test "a node that goes down mid-run gives :node_down" do
    {peer, node} = TestPeer.start()

    task =
      Task.async(fn ->
        LuaSandbox.run("while true do end",
          node: node,
          timeout: 20_000,
          max_instructions: 1_000_000_000_000
        )
      end)

    Process.sleep(300)
    TestPeer.stop(peer)
    assert {:error, %Error{kind: :node_down}} = Task.await(task, 20_000)
  end

  test "an unreachable node gives :node_down" do
    assert {:error, %Error{kind: :node_down}} =
             LuaSandbox.run("return 1", node: :"nobody@127.0.0.1", timeout: 1_000)
  end

  test "compiled chunks stay on their node", %{node: node} do
    {:ok, chunk} = LuaSandbox.compile("return 1")
    assert {:error, %Error{kind: :invalid_input}} = LuaSandbox.run(chunk, node: node)
  end
end
