defmodule LuaSandbox.KillTest do
  # Needs its own VM with one dirty CPU scheduler: a run that ignored the kill would hold the
  # only one, and the next run could never start.
  use ExUnit.Case, async: false

  alias LuaSandbox.TestPeer

  @moduletag timeout: 120_000

  setup_all do
    {peer, node} = TestPeer.start(["+SDcpu", "1:1"])
    on_exit(fn -> TestPeer.stop(peer) end)
    %{node: node}
  end

  defp kill_then_run(node, source, opts) do
    1 = :erpc.call(node, :erlang, :system_info, [:dirty_cpu_schedulers_online])
    :erpc.call(node, LuaSandbox.TestRemote, :kill_then_run, [source, opts], 30_000)
  end

  test "killing the caller of an infinite loop frees the only dirty scheduler", %{node: node} do
    {elapsed_us, finished?} =
      kill_then_run(node, "while true do end", max_instructions: 1_000_000_000_000)

    refute finished?
    # The guarantee is 10 ms; assert with a wide margin for a loaded CI machine.
    assert elapsed_us < 2_000_000
  end

  test "a kill inside a tight pcall loop stops the run", %{node: node} do
    src = "while true do pcall(function() end) end"
    {elapsed_us, _} = kill_then_run(node, src, max_instructions: 1_000_000_000_000)
    assert elapsed_us < 2_000_000
  end

  test "a kill inside nested coroutines stops the run", %{node: node} do
    src = """
    local function spin() while true do coroutine.yield() end end
    local co = coroutine.wrap(function()
      local inner = coroutine.wrap(function() while true do end end)
      inner()
    end)
    co()
    """

    {elapsed_us, _} = kill_then_run(node, src, max_instructions: 1_000_000_000_000)
    assert elapsed_us < 2_000_000
  end

  test "a kill inside an xpcall handler loop stops the run", %{node: node} do
    src = "xpcall(function() while true do end end, function() while true do end end)"
    {elapsed_us, _} = kill_then_run(node, src, max_instructions: 1_000_000_000_000)
    assert elapsed_us < 2_000_000
  end
end
