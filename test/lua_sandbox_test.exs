# Under both isolations (LuaSandbox.Isolation): LuaSandboxTest.Nif and LuaSandboxTest.Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandboxTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation
    if @isolation == :nif, do: doctest(LuaSandbox)

    alias LuaSandbox.{Error, Isolation, Result}

    defp run(source, opts \\ []), do: LuaSandbox.run(source, Isolation.opts(@isolation, opts))
    defp run!(source, opts \\ []), do: LuaSandbox.run!(source, Isolation.opts(@isolation, opts))

    defp run_ok(source, opts \\ []) do
      assert {:ok, %Result{} = r} = run(source, opts)
      r
    end

    defp run_err(source, opts \\ []) do
      assert {:error, %Error{} = e} = run(source, opts)
      e
    end

    describe "run/2 results" do
      test "value is the first returned value, values all of them" do
        r = run_ok("return 1, 2, 3")
        assert r.value == 1
        assert r.values == [1, 2, 3]
      end

      test "no return gives nil and []" do
        r = run_ok("local x = 1")
        assert r.value == nil
        assert r.values == []
      end

      test "stats are reported" do
        r = run_ok("local s = 0 for i = 1, 10000 do s = s + i end return s")
        assert r.value == 50_005_000
        assert %{instructions: n, memory_peak: m, duration_us: d} = r.stats
        # two VM instructions per iteration, plus a few of the chunk, of its compile (one per
        # token) and of the sandbox's runner
        assert n >= 20_000 and n <= 20_300
        assert m > 0
        assert is_integer(d)
      end

      test "globals are visible, names as atoms or strings" do
        assert run_ok("return a + b", globals: %{:a => 1, "b" => 2}).value == 3
      end

      test "call: runs a global function with args after the chunk" do
        src = "function run(ctx, k) return ctx[k] * 2, k end"
        r = run_ok(src, call: {"run", [%{"x" => 21}, "x"]})
        assert r.values == [42, "x"]
      end

      test "call: of a missing function is a runtime error" do
        e = run_err("x = 1", call: {:run, []})
        assert e.kind == :runtime
        assert e.message =~ "global 'run' is not a function"
      end
    end

    describe "errors" do
      test "syntax errors carry the line" do
        e = run_err("local x = 1\nlocal y = = 2")
        assert e.kind == :syntax
        assert e.line == 2
        assert e.message =~ "script:2:"
      end

      test "runtime errors carry line and traceback" do
        e = run_err("local function f()\n  error('boom')\nend\nf()")
        assert e.kind == :runtime
        assert e.line == 2
        assert e.message == "script:2: boom"
        assert e.traceback =~ "script:2"
        refute e.traceback =~ "prelude"
      end

      test "non-string error objects are marshaled into value" do
        e = run_err("error({code = 1, msg = 'x'})")
        assert e.kind == :runtime
        assert e.value == %{"code" => 1, "msg" => "x"}
        assert e.message == "(error object is a table value)"
      end

      test "error(nil) is a clean error" do
        e = run_err("error(nil)")
        assert e.kind == :runtime
        assert e.message == "(error object is a nil value)"
      end

      test "output printed before a failure is kept" do
        e = run_err("print('before') error('x')")
        assert e.output == "before\n"
      end

      test "chunk_name appears in messages, no host path does" do
        e = run_err("error('x')", chunk_name: "agent.lua")
        assert e.message == "agent.lua:1: x"
        refute e.message =~ File.cwd!()
      end

      test "run!/2 raises the error struct with a readable message" do
        err = assert_raise Error, fn -> run!("error('bad')") end
        assert err.kind == :runtime
        assert Exception.message(err) == "runtime: script:1: bad"
      end

      test "error kinds are a closed documented list" do
        assert :timeout in Error.kinds()
        assert length(Error.kinds()) == length(Enum.uniq(Error.kinds()))
      end
    end

    describe "options" do
      test "unknown options raise ArgumentError" do
        assert_raise ArgumentError, fn -> run("return 1", max_instrs: 5) end
      end

      test "bad option values raise ArgumentError" do
        assert_raise ArgumentError, fn -> run("return 1", max_memory: -1) end
        assert_raise ArgumentError, fn -> run("return 1", print: :stdout) end
        assert_raise ArgumentError, fn -> run("return 1", call: "run") end
      end

      test "source must be a string or chunk" do
        assert_raise ArgumentError, fn -> run(:nope) end
      end

      test "max_source bounds the source" do
        e = run_err(String.duplicate(" ", 101) <> "return 1", max_source: 100)
        assert e.kind == :invalid_input
      end
    end

    describe "standard library allowlist" do
      test "allowed libraries are there" do
        src = """
        return type(string.format), type(table.concat), type(math.floor), type(utf8.char),
               type(coroutine.wrap), type(os.time), type(os.clock), type(os.date), type(io.write)
        """

        assert run_ok(src).values == List.duplicate("function", 9)
      end

      test "removed functions raise an error that names them" do
        for f <- ~w(dofile loadfile string.dump os.execute os.getenv os.remove os.exit io.open
                  io.read debug.getinfo) do
          e = run_err("\n#{f}()")
          assert e.message =~ ~r/^script:2: #{Regex.escape(f)} is not available in this sandbox/
        end

        assert run_err("return package.path").message ==
                 "script:1: package.path is not available in this sandbox " <>
                   "(require loads the built-in libraries and the host's modules)"

        assert run_err("io.read()").message =~ "globals and tool calls"
        assert run_ok("return warn, rawget(_G, 'warn')").values == [nil, nil]
      end

      test "require returns the built-in libraries and lists them for an unknown module" do
        assert run_ok("return require('os') == os, require('string') == string").values == [
                 true,
                 true
               ]

        assert run_ok("return require('utf8') == utf8, package.loaded.math == math").values ==
                 [true, true]

        e = run_err("return require('json')")

        assert e.message ==
                 "script:1: module 'json' not found (available: _G, coroutine, debug, io, math, " <>
                   "os, package, string, table, utf8)"
      end

      test "binary chunks are rejected" do
        assert run_err("\x1bLua\x54\x00").kind == :invalid_input
        assert run_ok("return load('\\27Lua')").values |> hd() == nil
        assert run_ok("return load('return 1', 'x', 'b')").values |> hd() == nil
      end

      test "load works on text, with env" do
        assert run_ok("return load('return 1 + 1')()").value == 2
        assert run_ok("return load('return x', 'c', 't', {x = 5})()").value == 5
      end

      test "collectgarbage answers every option but never stops or retunes the collector" do
        assert is_float(run_ok("return collectgarbage('count')").value)

        assert run_ok("""
               return collectgarbage(), collectgarbage('collect'), collectgarbage('stop'),
                      collectgarbage('isrunning'), collectgarbage('restart'),
                      collectgarbage('generational'), collectgarbage('incremental'),
                      type(collectgarbage('step')), collectgarbage('setpause', 1),
                      collectgarbage('setpause')
               """).values == [
                 0,
                 0,
                 0,
                 true,
                 0,
                 "incremental",
                 "incremental",
                 "boolean",
                 200,
                 200
               ]

        assert run_err("collectgarbage('bogus')").message =~ "invalid option 'bogus'"
      end

      test "__gc metamethods are inert on tables" do
        # setmetatable is Lua's own; the collector never marks a table for finalization
        assert run_ok("""
               local ran = false
               local mt = {__gc = function() ran = true end}
               local t = setmetatable({}, mt)
               t = nil
               collectgarbage()
               collectgarbage()
               return ran, getmetatable(setmetatable({}, mt)) == mt
               """).values == [false, true]
      end

      test "wrapped functions report argument errors as Lua does" do
        for {src, msg} <- [
              {"setmetatable(1, {})",
               "bad argument #1 to 'setmetatable' (table expected, got number)"},
              {"setmetatable({}, 1)",
               "bad argument #2 to 'setmetatable' (nil or table expected, got number)"},
              {"pcall()", "bad argument #1 to 'pcall' (value expected)"},
              {"coroutine.resume()",
               "bad argument #1 to 'resume' (thread expected, got no value)"},
              {"coroutine.wrap(nil)", "bad argument #1 to 'wrap' (function expected, got nil)"},
              {"coroutine.close({})", "bad argument #1 to 'close' (thread expected, got table)"},
              {"load({})", "bad argument #1 to 'load' (function expected, got table)"}
            ] do
          assert run_err("\n" <> src).message == "script:2: " <> msg
        end
      end

      test "the string metatable is protected" do
        assert run_ok("return getmetatable('')").value == false
        assert run_ok("return ('x'):upper()").value == "X"
      end
    end

    describe "print and io.write" do
      test "print joins tostring of arguments with tabs" do
        assert run_ok("print(1, nil, true, 'x', 1.5)").output == "1\tnil\ttrue\tx\t1.5\n"
      end

      test "io.write appends strings and numbers as they are" do
        assert run_ok("io.write('a', 1, 2.5) io.write('b')").output == "a12.5b"
        assert run_err("io.write({})").kind == :runtime
      end

      test "max_output ends the run" do
        e = run_err("while true do print('xxxxxxxxxx') end", max_output: 1000)
        assert e.kind == :output_limit
        assert byte_size(e.output) <= 1000
      end

      test "max_output cannot be swallowed by pcall" do
        src = "for i = 1, 1000 do pcall(print, string.rep('x', 100)) end return 'survived'"
        assert run_err(src, max_output: 1000).kind == :output_limit
      end

      test "print: :discard drops output" do
        assert run_ok("print('x')", print: :discard).output == ""
      end

      test "print: {:send, pid} streams chunks and keeps them in output" do
        r = run_ok("print('a') io.write('b')", print: {:send, self()})
        assert r.output == "a\nb"
        # Streamed chunks are coalesced; together they are the output, in order, once.
        assert LuaSandbox.TestStream.streamed() == "a\nb"
      end
    end

    describe "compile/2" do
      test "a chunk runs many times, each in a fresh state" do
        {:ok, chunk} = LuaSandbox.compile("counter = (counter or 0) + 1 return counter")
        assert run!(chunk).value == 1
        assert run!(chunk).value == 1
      end

      test "syntax errors come back from compile" do
        assert {:error, %Error{kind: :syntax, line: 1}} = LuaSandbox.compile("return +")
      end

      test "the chunk is opaque and keeps its name" do
        {:ok, chunk} = LuaSandbox.compile("error('x')", chunk_name: "c1")
        assert inspect(chunk) == "#LuaSandbox.Chunk<c1>"
        assert {:error, %Error{message: "c1:1: x", line: 1}} = run(chunk)
        # its own name, whatever chunk_name the run is given
        assert {:error, %Error{message: "c1:1: x"}} = run(chunk, chunk_name: "other")
      end

      test "a chunk takes its globals, call: and tools like source text" do
        {:ok, chunk} =
          LuaSandbox.compile("function f(a) return a + base + tools.one() end return base")

        tools = %{one: fn _ -> 1 end}
        assert run!(chunk, globals: %{base: 10}, tools: tools).value == 10
        assert run!(chunk, globals: %{base: 10}, tools: tools, call: {"f", [5]}).value == 16
      end

      test "a forged chunk is rejected" do
        assert_raise ArgumentError, fn ->
          run(%LuaSandbox.Chunk{ref: make_ref(), name: "x"})
        end
      end
    end

    describe "limits" do
      test "instruction limit" do
        e = run_err("while true do end", max_instructions: 10_000)
        assert e.kind == :instruction_limit
        assert e.stats.instructions == 10_000
      end

      test "instruction limit holds inside coroutines" do
        src = "local co = coroutine.wrap(function() while true do end end) co()"
        assert run_err(src, max_instructions: 10_000).kind == :instruction_limit
      end

      test "memory limit" do
        src = "local t = {} for i = 1, 1e8 do t[i] = i end"
        e = run_err(src, max_memory: 1_000_000)
        assert e.kind == :memory_limit
      end

      test "memory limit cannot be swallowed by pcall" do
        src = """
        for i = 1, 100 do
          pcall(function() local s = 'x' while true do s = s .. s end end)
        end
        return 'survived'
        """

        assert run_err(src, max_memory: 2_000_000).kind == :memory_limit
      end
    end

    describe "isolation" do
      test "nothing leaks between runs" do
        run_ok("leak = 42 string.leak = 1")
        assert run_ok("return leak, string.leak").values == [nil, nil]
      end

      test "concurrent runs never see each other's globals" do
        tasks =
          for i <- 1..50 do
            Task.async(fn ->
              src = "local s = 0 for k = 1, 1000 do s = s + k end return me, other"
              run(src, globals: %{me: i})
            end)
          end

        results = Task.await_many(tasks, 30_000)

        for {{:ok, r}, i} <- Enum.with_index(results, 1) do
          assert r.values == [i, nil]
        end
      end
    end
  end
end
