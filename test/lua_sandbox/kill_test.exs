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

  defp kill_then_run(node, source, opts, delay_ms \\ 50) do
    1 = :erpc.call(node, :erlang, :system_info, [:dirty_cpu_schedulers_online])
    :erpc.call(node, LuaSandbox.TestRemote, :kill_then_run, [source, opts, delay_ms], 30_000)
  end

  test "the probe needs the dirty scheduler: it cannot finish while a run holds it", %{node: node} do
    1 = :erpc.call(node, :erlang, :system_info, [:dirty_cpu_schedulers_online])
    # A probe that could finish on a normal scheduler (as `return 1 + 1` does, by its first
    # attempt) would make every kill -> free figure vacuous (issue 16, item 1).
    assert {false, true} =
             :erpc.call(node, LuaSandbox.TestRemote, :probe_while_held, [500], 30_000)
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

  test "a kill inside a pattern-matching builtin stops the run", %{node: node} do
    src = "return string.find(string.rep('a', 100000), '.-.-.-.-b')"
    {elapsed_us, finished?} = kill_then_run(node, src, max_instructions: 1_000_000_000_000)
    refute finished?
    assert elapsed_us < 2_000_000
  end

  test "a kill inside table.sort stops the run", %{node: node} do
    src = """
    local t = {} for i = 1, 3000000 do t[i] = (i * 7919) % 1000003 end
    table.sort(t, function(a, b) return a > b end)
    """

    opts = [max_instructions: 1_000_000_000_000, max_memory: 1_000_000_000]
    {elapsed_us, _} = kill_then_run(node, src, opts, 300)
    assert elapsed_us < 2_000_000
  end

  test "a kill during a supervised run's timeout frees the scheduler", %{node: node} do
    result =
      :erpc.call(node, LuaSandbox, :run, [
        "while true do end",
        [timeout: 100, max_instructions: 1_000_000_000_000]
      ])

    assert {:error, %LuaSandbox.Error{kind: :timeout}} = result
    assert {:ok, %{value: 2}} = :erpc.call(node, LuaSandbox, :run, ["return 1 + 1"], 5_000)
  end

  test "a kill while a tool runs ends the run", %{node: node} do
    tools = %{sleep: &LuaSandbox.TestRemote.sleep_tool/1}
    {elapsed_us, finished?} = kill_then_run(node, "tools.sleep(5000) return 1", tools: tools)
    refute finished?
    assert elapsed_us < 2_000_000
  end

  test "a kill during Lua between tool calls ends the run", %{node: node} do
    tools = %{sleep: &LuaSandbox.TestRemote.sleep_tool/1}
    src = "tools.sleep(1) while true do end"
    opts = [tools: tools, max_instructions: 1_000_000_000_000]
    {elapsed_us, finished?} = kill_then_run(node, src, opts)
    refute finished?
    assert elapsed_us < 2_000_000
  end

  @tag timeout: 300_000
  test "10_000 runs killed during tool calls leak nothing", %{node: node} do
    tools = %{sleep: &LuaSandbox.TestRemote.sleep_tool/1}
    src = "local t = {} for i = 1, 1000 do t[i] = {i} end tools.sleep(1000)"
    args = [src, [tools: tools], 10_000]
    {rss_before, rss_after} = :erpc.call(node, LuaSandbox.TestRemote, :kill_many, args, 280_000)
    growth = (rss_after - rss_before) / rss_before
    assert growth < 0.05, "RSS grew from #{rss_before} KiB to #{rss_after} KiB"
  end

  @tag timeout: 300_000
  test "10_000 killed runs in a row leave the OS process memory flat", %{node: node} do
    src = "local t = {} local i = 0 while true do i = i + 1 t[i % 1000 + 1] = {i} end"
    opts = [max_instructions: 1_000_000_000_000]

    {rss_before, rss_after} =
      :erpc.call(node, LuaSandbox.TestRemote, :kill_many, [src, opts, 10_000], 280_000)

    growth = (rss_after - rss_before) / rss_before
    assert growth < 0.05, "RSS grew from #{rss_before} KiB to #{rss_after} KiB"
  end
end
