defmodule LuaSandbox.Stock.RestrictionsTest do
  # The deliberate differences from stock Lua (README, "What differs from stock Lua"): each
  # keeps common code working and gives an error a model can act on.
  use ExUnit.Case, async: true

  defp run(src, opts), do: LuaSandbox.run(src, opts)

  test "a collection is charged to the budget" do
    src = """
    local t = {}
    for i = 1, 1e5 do t[i] = {} end
    for i = 1, 1000 do collectgarbage() end
    return 'done'
    """

    # ~0.5 M instructions for the setup; 1000 full collections of a ~8 MB heap cost far more
    assert {:error, %{kind: :instruction_limit}} = run(src, max_instructions: 3_000_000)
    assert {:ok, %{value: "done"}} = run(src, max_instructions: 1_000_000_000)
  end

  test "collectgarbage('step') is charged too" do
    src = """
    local t = {}
    for i = 1, 1e5 do t[i] = {} end
    for i = 1, 1000 do collectgarbage('step', 1000) end
    """

    assert {:error, %{kind: :instruction_limit}} = run(src, max_instructions: 3_000_000)
  end

  test "load through a reader is bounded by max_source, also for pieces that are numbers" do
    src = """
    local n = 0
    return load(function() n = n + 1 if n < 100 then return 1234567890 end end)
    """

    assert {:ok, %{values: [nil, "chunk is larger than max_source"]}} = run(src, max_source: 500)

    assert {:ok, %{values: [nil, "chunk is larger than max_source"]}} =
             run("return load(string.rep(' ', 600))", max_source: 500)
  end

  test "parsing in load is charged one step per byte" do
    src = """
    local s = 'return ' .. string.rep('1 + ', 20000) .. '1'
    for i = 1, 100 do load(s) end
    """

    assert {:error, %{kind: :instruction_limit}} = run(src, max_instructions: 1_000_000)
  end

  test "an abort is not caught by pcall, xpcall or a coroutine" do
    for wrap <- [
          "pcall(function() while true do end end)",
          "xpcall(function() while true do end end, function(m) return m end)",
          "coroutine.resume(coroutine.create(function() while true do end end))",
          "pcall(coroutine.wrap(function() while true do end end))"
        ] do
      assert {:error, %{kind: :instruction_limit}} =
               run(wrap <> " return 'escaped'", max_instructions: 100_000)
    end

    assert {:error, %{kind: :output_limit}} =
             run("for i = 1, 100 do pcall(print, string.rep('x', 100)) end return 1",
               max_output: 1000
             )
  end

  test "the memory abort is sticky through pcall and coroutines" do
    for src <- [
          "for i = 1, 100 do pcall(string.rep, 'x', 1e8) end return 'escaped'",
          "for i = 1, 100 do coroutine.resume(coroutine.create(string.rep), 'x', 1e8) end return 1"
        ] do
      assert {:error, %{kind: :memory_limit}} = run(src, max_memory: 4_000_000)
    end
  end

  test "Error.traceback holds only the script's frames, also for call:" do
    src = """
    function handler(x)
      local function inner() error('bad ' .. x) end
      inner()
    end
    """

    {:error, e} = run(src, call: {"handler", ["y"]})
    assert e.message == "script:2: bad y"

    assert e.traceback ==
             "stack traceback:\n\t[C]: in function 'error'\n\tscript:2: in local 'inner'" <>
               "\n\tscript:3: in function 'handler'"
  end

  test "debug.traceback formats only the script's frames, as stock Lua's driver shows them" do
    src = """
    local function f() return debug.traceback('m') end
    local function g() local t = f() return t end
    return g(), debug.traceback('top'), coroutine.wrap(function() return debug.traceback() end)()
    """

    port = LuaSandbox.StockLua.open()
    {stock, sandbox} = LuaSandbox.StockLua.compare(port, src)
    assert sandbox == stock
    {:ok, [first, top, _]} = sandbox.result
    assert first =~ "script:2: in local 'g'\n\tscript:3: in main chunk"
    refute top =~ "[C]: in ?"
  end

  test "tool calls pass through nested coroutines, wraps and pcall" do
    src = """
    local w = coroutine.wrap(function()
      local co = coroutine.create(function()
        return select(2, pcall(tools.add, 1, 2)) + tools.add(10, 20)
      end)
      return coroutine.resume(co)
    end)
    return w()
    """

    assert {:ok, %{values: [true, 33], stats: %{tool_calls: 2}}} =
             run(src, tools: %{"add" => fn [a, b] -> {:ok, a + b} end})
  end
end
