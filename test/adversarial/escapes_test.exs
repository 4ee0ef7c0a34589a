defmodule LuaSandbox.Adversarial.EscapesTest do
  # Reaching outside the sandbox: bytecode, the host's libraries, the shared string
  # metatable, the collector, the prelude's originals, tools.
  use LuaSandbox.Adversarial.Case, async: true

  @allowed_globals ~w(assert error getmetatable ipairs next pairs pcall rawequal rawget rawlen
    rawset select setmetatable tonumber tostring type xpcall _G _VERSION load collectgarbage
    print string table math utf8 coroutine os io require json)

  describe "bytecode" do
    test "a source starting with the binary signature is refused before Lua sees it" do
      assert_error("\x1bLua\x54\x00\x19\x93\r\n\x1a\n", :invalid_input)
      assert_error("\x1b", :invalid_input)
      assert_error("\x1bLuaT" <> :binary.copy(<<0>>, 64), :invalid_input)
    end

    test "a signature after leading text is a syntax error" do
      assert_error(" \x1bLua", :syntax)
    end

    test "string.dump is gone, so load(string.dump(f)) fails" do
      assert_error("return load(string.dump(function() end))", :runtime)
      assert_values("return string.dump, rawget(string, 'dump')", [nil, nil])
    end

    test "load refuses binary chunks whatever the mode says" do
      for mode <- ["'b'", "'bt'", "'tb'", "nil", "'t'", "1", "{}"] do
        src = "return load('\\27LuaT\\0\\25\\147\\r\\n\\26\\n', 'x', #{mode})"
        assert_values(src, fn [nil, msg] -> is_binary(msg) end)
      end
    end

    test "load with a reader that produces a binary chunk piece by piece" do
      src = """
      local parts = {'\\27', 'Lua', 'T\\0', '\\25\\147\\r\\n\\26\\n'}
      local i = 0
      return load(function() i = i + 1 return parts[i] end, 'x', 'b')
      """

      assert_values(src, fn [nil, msg] -> is_binary(msg) end)
    end
  end

  describe "the string metatable" do
    test "getmetatable('') is false and cannot be used to tamper" do
      assert_values("return getmetatable('')", [false])
      assert_error("getmetatable('').__index = {}", :runtime)
      assert_error("setmetatable('', {})", :runtime)
      assert_error("rawset(getmetatable('abc'), '__index', {})", :runtime)
    end

    test "changes to the string table stay in the run" do
      assert_values("string.upper = function() return 'pwned' end return ('a'):upper()", [
        "pwned"
      ])

      assert_values("return ('a'):upper()", ["A"])
    end
  end

  describe "collectgarbage" do
    test "only 'count' is allowed" do
      for opt <- ~w(stop restart collect step incremental generational setpause setstepmul) do
        assert_error("collectgarbage('#{opt}')", :runtime, message: ~r/count/)
      end

      assert_error("collectgarbage()", :runtime)
      assert_values("return type(collectgarbage('count'))", ["number"])
    end
  end

  describe "absent libraries" do
    test "os, io, package, debug, dofile, loadfile, require of system modules" do
      src = """
      return type(os.execute), type(os.exit), type(os.getenv), type(os.remove),
        type(os.rename), type(os.tmpname), type(os.setlocale), type(io.open),
        type(io.popen), type(io.read), type(io.lines), type(io.stdout), type(package),
        type(debug), type(dofile), type(loadfile), type(loadstring), type(module),
        type(newproxy), type(gcinfo), type(unpack), type(jit), type(ffi), type(bit32)
      """

      assert_values(src, List.duplicate("nil", 24))
    end

    test "only os.time, os.clock and os.date remain in os" do
      assert_values(
        "local k = {} for name in pairs(os) do k[#k + 1] = name end table.sort(k) return k",
        [["clock", "date", "time"]]
      )
    end

    test "require of system modules fails" do
      for mod <- ~w(os io debug package ffi jit string _G) do
        assert_error("return require('#{mod}')", :runtime, message: ~r/not found/)
      end
    end

    test "rawget(_G, ...) finds nothing the allowlist dropped" do
      assert_values(
        "return rawget(_G, 'debug'), rawget(_G, 'package'), rawget(_G, 'dofile'), _G._G.debug",
        [nil, nil, nil, nil]
      )
    end

    test "the global table holds the allowlist and nothing else" do
      {:ok, %{value: names}} =
        LuaSandbox.run(
          "local k = {} for name in pairs(_G) do k[#k + 1] = name end table.sort(k) return k"
        )

      assert names -- @allowed_globals == []
      assert_alive()
    end

    test "string holds no dump and no unknown functions" do
      {:ok, %{value: names}} =
        LuaSandbox.run(
          "local k = {} for name in pairs(string) do k[#k + 1] = name end table.sort(k) return k"
        )

      refute "dump" in names
      assert names -- ~w(byte char find format gmatch gsub len lower match pack packsize rep
               reverse sub unpack upper) == []

      assert_alive()
    end
  end

  describe "the prelude's originals" do
    test "getmetatable(tools) is false and tools is read-only" do
      tools = [tools: %{echo: fn [x] -> x end}]
      assert_values("return getmetatable(tools)", [false], tools)
      assert_error("tools.echo = print", :runtime, Keyword.put(tools, :message, ~r/read-only/))
      assert_values("return next(tools), rawget(tools, 'echo')", [nil, nil], tools)
      assert_error("setmetatable(tools, {})", :runtime, tools)
    end

    test "rawset on tools only shadows a tool inside the run" do
      assert_values(
        "rawset(tools, 'echo', function() return 'mine' end) return tools.echo(1)",
        ["mine"],
        tools: %{echo: fn [x] -> x end}
      )
    end

    test "a tool called where the caller cannot yield gives a clean error" do
      src = "return string.gsub('a', '.', function(c) return tools.echo(c) end)"
      assert_error(src, :runtime, tools: %{echo: fn [x] -> x end}, message: ~r/cannot be called/)

      src = "return table.sort({2, 1}, function(a, b) return tools.echo(a) end)"
      assert_error(src, :runtime, tools: %{echo: fn [x] -> x end})
    end

    test "tool calls in a loop hit :tool_limit" do
      assert_error("while true do tools.echo(1) end", :tool_limit,
        tools: %{echo: fn [x] -> x end},
        max_tool_calls: 50
      )
    end

    test "yielding from the main chunk is refused, even through pcall" do
      assert_error("coroutine.yield(1)", :runtime, message: ~r/outside a coroutine/)
      assert_values("return pcall(coroutine.yield, 1)", fn [false, _] -> true end)
      assert_values("return coroutine.isyieldable()", [false])
    end

    test "the run's own coroutine cannot be resumed, closed or wrapped" do
      src = """
      local main = coroutine.running()
      return select('#', coroutine.resume(main)), pcall(coroutine.close, main),
        coroutine.status(main)
      """

      assert_values(src, [2, false, "running"])

      src = """
      local main = coroutine.running()
      return coroutine.wrap(function()
        return coroutine.resume(main), pcall(coroutine.close, main)
      end)()
      """

      assert_values(src, fn [false, false, msg] -> msg =~ "cannot close" end)
    end

    test "a yielded table that looks like a tool call is just a value" do
      src = """
      local co = coroutine.wrap(function() coroutine.yield({}, 'echo', 1) return 'end' end)
      local a, b, c = co()
      return type(a), b, c, co()
      """

      assert_values(src, ["table", "echo", 1, "end"], tools: %{echo: fn [x] -> x end})
    end
  end

  describe "isolation between runs" do
    test "globals, library tables and metatables do not leak into the next run" do
      assert_values(
        """
        secret = 'run 1'
        string.rep = nil
        table.insert = function() end
        setmetatable(_G, {__index = function() return 'leaked' end})
        math.pi = 3
        return 1
        """,
        [1]
      )

      for _ <- 1..20 do
        assert_values(
          "return rawget(_G, 'secret'), type(string.rep), getmetatable(_G), math.pi > 3, undefined",
          [nil, "function", nil, true, nil]
        )
      end
    end
  end

  describe "_G and _ENV" do
    test "setmetatable(_G, ...) only changes the script's view" do
      assert_values(
        "setmetatable(_G, {__index = function(_, k) return k end}) return debug, io.open",
        ["debug", nil]
      )
    end

    test "setmetatable(_G, {__gc = ...}) is refused" do
      assert_error("setmetatable(_G, {__gc = function() while true do end end})", :runtime)
    end

    test "_ENV replaced by a table, by nil, by a number" do
      assert_values("local _ENV = {} return print, os", [nil, nil])

      assert_values(
        "local _ENV = setmetatable({}, {__index = _G}) return os.execute, type(print)",
        [nil, "function"]
      )

      assert_error("_ENV = nil return x", :runtime)
      assert_error("local _ENV = 42 return x", :runtime)
    end

    test "load with an explicit environment" do
      assert_values("return load('return os', 'x', 't', {})()", [nil])
      assert_values("return load('return x', 'x', 't', {x = 7})()", [7])
      assert_error("return load('return x.y', 'x', 't', nil)()", :runtime)
    end

    test "replacing _G wholesale" do
      assert_values("_G = nil return type(print)", ["function"])
      assert_values("local g = _G g.print = nil return print", [nil])
      assert_values("return type(print)", ["function"])
    end
  end
end
