# Under both isolations (LuaSandbox.Isolation): LuaSandbox.Adversarial.EscapesTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.Adversarial.EscapesTest, Macro.camelize("#{isolation}")) do
    # Reaching outside the sandbox: bytecode, the host's libraries, the shared string
    # metatable, the collector, the prelude's originals, tools.
    use LuaSandbox.Adversarial.Case, async: true, isolation: isolation

    @allowed_globals ~w(assert error getmetatable ipairs next pairs pcall rawequal rawget rawlen
      rawset select setmetatable tonumber tostring type xpcall _G _VERSION load collectgarbage
      print string table math utf8 coroutine os io require dofile loadfile debug package json)

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
        assert_error("return load(string.dump(function() end))", :runtime,
          message: ~r/string.dump is not available/
        )

        assert_values("return pcall(rawget(string, 'dump'), print)", [
          false,
          "string.dump is not available in this sandbox (bytecode is not available)"
        ])
      end

      test "load refuses binary chunks whatever the mode says" do
        for mode <- ["'b'", "'bt'", "'tb'", "nil", "'t'", "1"] do
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
      test "no option stops the collector or changes its mode" do
        src = """
        local r = {}
        for _, opt in ipairs({'stop', 'generational', 'setpause', 'setstepmul'}) do
          collectgarbage(opt, 1000)
        end
        r[1] = collectgarbage('isrunning')
        r[2] = collectgarbage('incremental')
        r[3] = collectgarbage('setpause')
        r[4] = collectgarbage('setstepmul')
        return r
        """

        assert_values(src, [[true, "incremental", 200, 100]])
        assert_values("return type(collectgarbage('count')), collectgarbage()", ["number", 0])
      end
    end

    describe "absent libraries" do
      test "os, io, package, debug, dofile, loadfile: stubs that raise, or nothing" do
        for f <- ~w(os.execute os.exit os.getenv os.remove os.rename os.tmpname os.setlocale
                    io.open io.popen io.read io.lines dofile loadfile debug.getinfo
                    debug.sethook debug.getregistry debug.setmetatable debug.getupvalue) do
          assert_error("#{f}()", :runtime, message: ~r/#{Regex.escape(f)} is not available/)
        end

        assert_error("return package.loadlib", :runtime, message: ~r/not available/)
        assert_error("return package.searchers", :runtime, message: ~r/not available/)

        src = """
        return type(loadstring), type(module), type(newproxy), type(gcinfo), type(unpack),
          type(jit), type(ffi), type(bit32), type(io.stdout), type(package.loaded)
        """

        assert_values(src, List.duplicate("nil", 8) ++ ["userdata", "table"])
      end

      test "only os.time, os.clock, os.date and os.difftime do something" do
        src = """
        local k = {}
        for name, f in pairs(os) do
          if pcall(f) or pcall(f, 0, 0) then k[#k + 1] = name end
        end
        table.sort(k)
        return k
        """

        assert_values(src, [["clock", "date", "difftime", "time"]])
      end

      test "require of system modules gives the sandbox's own tables or fails" do
        for mod <- ~w(os io debug package string _G) do
          assert_values("return require('#{mod}') == #{mod}", [true])
        end

        for mod <- ~w(ffi jit lfs socket) do
          assert_error("return require('#{mod}')", :runtime, message: ~r/not found \(available:/)
        end
      end

      test "debug holds only traceback that works" do
        src = """
        local k = {}
        for name, f in pairs(debug) do
          if pcall(f) then k[#k + 1] = name end
        end
        return k
        """

        assert_values(src, [["traceback"]])
      end

      test "the global table holds the allowlist and nothing else" do
        {:ok, %{value: names}} =
          lua_run(
            "local k = {} for name in pairs(_G) do k[#k + 1] = name end table.sort(k) return k"
          )

        assert names -- @allowed_globals == []
        assert_alive()
      end

      test "string holds no dump and no unknown functions" do
        {:ok, %{value: names}} =
          lua_run(
            "local k = {} for name in pairs(string) do k[#k + 1] = name end table.sort(k) return k"
          )

        assert names -- ~w(byte char dump find format gmatch gsub len lower match pack packsize
                 rep reverse sub unpack upper) == []

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
          "setmetatable(_G, {__index = function(_, k) return k end}) return foo, type(io.open)",
          ["foo", "function"]
        )
      end

      test "setmetatable(_G, {__gc = ...}) is inert" do
        assert_values("setmetatable(_G, {__gc = function() while true do end end}) return 1", [1])
        assert_alive()
      end

      test "_ENV replaced by a table, by nil, by a number" do
        assert_values("local _ENV = {} return print, os", [nil, nil])

        assert_values(
          "local _ENV = setmetatable({}, {__index = _G}) return select(2, pcall(os.execute)), type(print)",
          ["os.execute is not available in this sandbox", "function"]
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
end
