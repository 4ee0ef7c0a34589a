defmodule LuaSandbox.Stock.ReproducersTest do
  # Issue 11's reproducers B1-B8: each program behaves in the sandbox exactly as in an
  # unpatched Lua 5.4.9 (same output, same returned values, same error messages).
  use ExUnit.Case, async: true

  alias LuaSandbox.StockLua

  setup_all do
    # Build once per test module (cached under _build/ across runs).
    StockLua.binary!()
    :ok
  end

  setup do
    {:ok, port: StockLua.open()}
  end

  defp same!(port, src) do
    {stock, sandbox} = StockLua.compare(port, src)
    assert sandbox == stock, "stock:   #{inspect(stock)}\nsandbox: #{inspect(sandbox)}"
    stock
  end

  test "B1: an error raised by __close inside coroutine.wrap replaces the original", %{port: p} do
    out =
      same!(p, ~S"""
      local co = coroutine.wrap(function()
        local x <close> = setmetatable({}, {__close = function() error("from __close", 0) end})
        error("original", 0)
      end)
      print(pcall(co))
      """)

    assert out.output =~ "from __close"
  end

  test "B2: error levels count from the caller of pcall", %{port: p} do
    same!(p, ~S"""
    print(pcall(error, "msg", 2))
    print(pcall(function() error("lvl3", 3) end))
    print(pcall(function() error("lvl2", 2) end))
    print(xpcall(error, function(m) return "h: " .. m end, "x", 2))
    local function deep(n) if n == 0 then error("deep", 4) end deep(n - 1) end
    print(pcall(deep, 5))
    """)
  end

  test "B3: argument errors name the builtin and carry the position", %{port: p} do
    same!(p, ~S"""
    print(pcall(function() local f = load("return 1", {}) end))
    print(pcall(function() setmetatable(setmetatable({}, {__metatable = 1}), {}) end))
    print(pcall(function() coroutine.close(coroutine.running()) end))
    print(pcall(function() print(setmetatable({}, {__tostring = function() return 1 end})) end))
    print(pcall(function() load(function() return {} end) end))
    print(load(function() return {} end))
    """)
  end

  test "B4: the traceback of a runtime error holds only the script's frames" do
    src = ~S"""
    local function inner() error("boom") end
    local function outer() inner() end
    outer()
    """

    {:error, e} = LuaSandbox.run(src)
    port = StockLua.open()
    stock = StockLua.stock_traceback(port, src)
    # stock lua.c ends in its own C frame, "[C]: in ?"; the sandbox has no frame of its own.
    expected =
      stock
      |> String.split("\n")
      |> Enum.drop(1)
      |> Enum.reject(&(&1 == "\t[C]: in ?"))
      |> Enum.join("\n")

    assert e.traceback == expected
    refute e.traceback =~ "?:"
    refute e.traceback =~ "tail calls"
  end

  test "B5: builtins are named and worded as in stock Lua", %{port: p} do
    same!(p, ~S"""
    print(pcall(coroutine.resume, 1))
    print(pcall(coroutine.close, 1))
    print(pcall(coroutine.status, 1))
    print(pcall(coroutine.wrap, 1))
    print(pcall(coroutine.isyieldable, 1))
    print(pcall(io.write, {}))
    print(pcall(xpcall, print))
    print(pcall(xpcall))
    print(pcall(pcall))
    print(pcall(load))
    print(pcall(select, 0))
    print(pcall(setmetatable, 1))
    print(pcall(print, setmetatable({}, {__tostring = function() return {} end})))
    """)
  end

  test "B6: an error in a tail-called builtin names the line of the call", %{port: p} do
    same!(p, ~S"""
    local function f()
      return load(
        1, {})
    end
    print(pcall(f))
    local function g()
      return coroutine.resume(
        1)
    end
    print(pcall(g))
    local function h()
      return io.write(
        {})
    end
    print(pcall(h))
    """)
  end

  test "B7: yield outside a coroutine and argument coercions", %{port: p} do
    same!(p, ~S"""
    print(pcall(coroutine.yield, 1))
    print(pcall(function() coroutine.yield(1) end))
    print(load("return 1", "n", 5))
    print(load("return 1", "n", "b"))
    print(load("\27Lua", "n", "t"))
    print(load("return 1", "n", "t")())
    """)

    # require coerces a number like stock (the message then only names the module)
    assert {:ok, %{values: [true, true]}} =
             LuaSandbox.run(~S"""
             local ok1, e1 = pcall(require, 1)
             local ok2, e2 = pcall(require, "1")
             return e1 == e2, not ok1
             """)
  end

  test "B8: io.write formats numbers like stock and returns the file", %{port: p} do
    same!(p, ~S"""
    io.write(1.0, " ", -0.0, " ", 1e100, " ", 2^63, " ", 3, " ", 0.1, "\n")
    io.write("a"):write("b"):write(1.5, "\n")
    print(io.write() == io.stdout, type(io.stdout), io.stdout:flush() == io.stdout)
    print(tostring(io.stdout):match("^file %(0x%x+%)$") ~= nil)
    print(pcall(io.write, 1, nil))
    """)
  end
end
