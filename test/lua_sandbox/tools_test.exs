# Under both isolations (LuaSandbox.Isolation).
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.ToolsTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation

    defp lua_run(source, opts \\ []),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    alias LuaSandbox.Error

    defp tools do
      %{
        "add" => fn [a, b] -> a + b end,
        :echo => fn args -> args end,
        :lookup => fn [key] -> Map.get(%{"a" => %{"x" => 1}}, key) end,
        :missing => fn [_] -> {:error, "not found"} end,
        :boom => fn _ -> raise "kaput" end,
        :exits => fn _ -> exit(:gone) end,
        :throws => fn _ -> throw(:ball) end,
        :ok_tuple => fn _ -> {:ok, [1, 2]} end,
        :bad => fn _ -> %{pid: self()} end
      }
    end

    defp run(src, opts \\ []), do: lua_run(src, Keyword.merge([tools: tools()], opts))

    describe "calling tools" do
      test "from the top level" do
        assert {:ok, %{value: 3, stats: %{tool_calls: 1}}} = run("return tools.add(1, 2)")
      end

      test "arguments are marshaled to a list, results back to Lua" do
        assert {:ok, %{value: [1, "two", %{"k" => true}]}} =
                 run("return tools.echo(1, 'two', {k = true})")

        assert {:ok, %{value: 1}} = run("return tools.lookup('a').x")
        assert {:ok, %{value: [1, 2]}} = run("return tools.ok_tuple()")
      end

      test "from inside coroutines, several levels deep" do
        src = """
        local inner = coroutine.wrap(function()
          local a = tools.add(1, 2)
          coroutine.yield(a)
          return tools.add(a, 10)
        end)
        local outer = coroutine.create(function()
          local x = inner()
          local y = inner()
          coroutine.yield(x + y)
        end)
        local ok, v = coroutine.resume(outer)
        return v
        """

        assert {:ok, %{value: 16, stats: %{tool_calls: 2}}} = run(src)
      end

      test "inside pcall" do
        assert {:ok, %{values: [true, 3]}} = run("return pcall(tools.add, 1, 2)")
      end

      test "inside a metamethod that may yield" do
        src =
          "local t = setmetatable({}, {__index = function(_, k) return tools.lookup(k) end}) return t.a.x"

        assert {:ok, %{value: 1}} = run(src)
      end

      test "where a yield is impossible the script gets a clear error" do
        src = "return pcall(string.gsub, 'a', 'a', function() return tools.add(1, 2) end)"
        assert {:ok, %{values: [false, msg]}} = run(src)
        assert msg =~ "tool 'add' cannot be called here"
      end

      test "the tools table is read-only" do
        assert {:error, %Error{message: msg}} = run("tools.add = print")
        assert msg =~ "read-only"
        assert {:ok, %{value: false}} = run("return getmetatable(tools)")
      end

      test "an unknown tool is an error at the calling line that lists the tools" do
        assert {:error, %Error{kind: :runtime, line: 2, message: msg}} =
                 run("local x = 1\nreturn tools.nope()")

        assert msg ==
                 "script:2: unknown tool 'nope'; the tools are: add, bad, boom, echo, exits, " <>
                   "lookup, missing, ok_tuple, throws"

        assert {:ok, %{values: [false, _]}} = run("return pcall(function() return tools[1] end)")
      end
    end

    describe "tool errors" do
      test "{:error, reason} is Lua's nil, message idiom" do
        assert {:ok, %{values: [nil, "not found"]}} = run("return tools.missing('k')")
      end

      test "raise, exit and throw become catchable Lua errors without stacktraces" do
        for name <- ["boom", "exits", "throws"] do
          assert {:ok, %{values: [false, msg]}} = run("return pcall(tools.#{name})")
          assert msg =~ "tool '#{name}' failed"
          refute msg =~ "lib/"
        end
      end

      test "an uncaught tool error ends the run as :runtime" do
        assert {:error, %Error{kind: :runtime, message: msg}} = run("tools.boom()")
        assert msg =~ "kaput"
      end

      test "a result that cannot become a Lua value is a Lua error naming the tool, path and type" do
        assert {:error, %Error{kind: :runtime, message: msg}} = run("return tools.bad()")
        assert msg =~ "tool 'bad': pid cannot become a Lua value at tool result[1].pid"

        struct = %{__struct__: Some.Module, a: 1}

        for {value, what, path} <- [
              {%{x: [struct]}, "struct Some.Module", "[1].x[1]"},
              {%{x: self()}, "pid", "[1].x"},
              {[make_ref()], "reference", "[1][1]"}
            ] do
          tools = %{give: fn [] -> {:ok, value} end}
          src = "local ok, e = pcall(tools.give) return ok, e, 'went on'"
          assert {:ok, %{values: [false, msg, "went on"]}} = lua_run(src, tools: tools)
          assert msg =~ "tool 'give': #{what} cannot become a Lua value"
          assert msg =~ "tool result#{path}"
        end
      end
    end

    describe "limits across tool calls" do
      test "max_tool_calls" do
        src = "for i = 1, 100 do tools.add(i, i) end"
        assert {:error, %Error{kind: :tool_limit}} = run(src, max_tool_calls: 10)
        assert {:ok, _} = run(src, max_tool_calls: 100)
      end

      test "the instruction budget spans tool calls" do
        src = "for i = 1, 50 do tools.add(1, 1) for j = 1, 1000 do end end"
        assert {:ok, %{stats: %{instructions: n}}} = run(src, max_instructions: 1_000_000)
        assert n > 40_000
        assert {:error, %Error{kind: :instruction_limit}} = run(src, max_instructions: 20_000)
      end

      test "the memory limit spans tool calls" do
        src = "local t = {} for i = 1, 1000 do t[i] = tools.echo(string.rep('x', 10000)) end"
        assert {:error, %Error{kind: :memory_limit}} = run(src, max_memory: 2_000_000)
      end

      test "timeout: counts tool time" do
        slow = %{sleep: fn [ms] -> Process.sleep(ms) end}
        src = "for i = 1, 100 do tools.sleep(50) end"
        assert {:error, %Error{kind: :timeout}} = lua_run(src, tools: slow, timeout: 300)
      end

      test "tools run in the run's task when a timeout is set" do
        me = self()
        where = %{pid: fn _ -> send(me, {:tool_pid, self()}) && :ok end}
        assert {:ok, _} = lua_run("tools.pid()", tools: where, timeout: 5_000)
        assert_received {:tool_pid, pid}
        assert pid != self()
      end
    end

    if @isolation == :nif do
      describe "a run's resource" do
        test "can only be resumed by the process that started it" do
          opts = LuaSandbox.Options.validate!(tools: %{t: fn _ -> 1 end})
          native = LuaSandbox.Options.to_native(opts)

          assert {:tool_call, run, "t", []} =
                   LuaSandbox.Native.run_start("return tools.t() + 1", native)

          stolen = Task.async(fn -> catch_error(LuaSandbox.Native.run_resume(run, {:ok, 1})) end)

          assert Task.await(stolen) == "a run can only be resumed by the process that started it"

          assert {:ok, [2], _, _} = LuaSandbox.Native.run_resume(run, {:ok, 1})

          assert catch_error(LuaSandbox.Native.run_resume(run, {:ok, 1})) ==
                   "run has already finished"
        end
      end
    end

    describe "modules" do
      test "require loads host modules once per run and caches them" do
        modules = %{
          "util" => "count = (count or 0) + 1 return {double = function(x) return x * 2 end}",
          "app" =>
            "local u = require('util') return {quad = function(x) return u.double(u.double(x)) end}"
        }

        src =
          "local a = require('app') local u = require('util') return a.quad(3), count, u == require('util')"

        assert {:ok, %{values: [12, 1, true]}} = lua_run(src, modules: modules)
      end

      test "modules keep their own chunk name in errors" do
        modules = %{"m" => "local x = nil\nreturn x.y"}

        assert {:error, %Error{message: "m:2: " <> _}} = lua_run("require('m')", modules: modules)
      end

      test "a name is looked up up to its first NUL, as lua_getfield saw it; the loader gets it whole" do
        modules = %{"m" => "local name = ... return {name = name}"}

        src = """
        local a = require('m\\0x')
        return #a.name, a == require('m'), require('string\\0y') == string, select(2, pcall(require, 'no\\0pe'))
        """

        assert {:ok, %{values: [3, true, true, msg]}} = lua_run(src, modules: modules)
        assert msg =~ "module 'no' not found"
      end

      test "a missing module is a Lua error" do
        assert {:ok, %{values: [false, msg]}} = lua_run("return pcall(require, 'nope')")
        assert msg =~ "module 'nope' not found"
      end

      test "compiled chunks work as modules" do
        {:ok, chunk} = LuaSandbox.compile("return {v = 7}", chunk_name: "seven")

        assert {:ok, %{value: 7}} = lua_run("return require('seven').v", modules: %{seven: chunk})
      end

      test "a compiled module keeps the chunk's own name in errors" do
        {:ok, chunk} = LuaSandbox.compile("local x = nil\nreturn x.y", chunk_name: "own")

        assert {:error, %Error{message: "own:2: " <> _}} =
                 lua_run("require('m')", modules: %{"m" => chunk})
      end

      test "modules can use tools" do
        modules = %{"svc" => "return {sum = function(a, b) return tools.add(a, b) end}"}

        assert {:ok, %{value: 5}} =
                 lua_run("return require('svc').sum(2, 3)", modules: modules, tools: tools())
      end
    end
  end
end
