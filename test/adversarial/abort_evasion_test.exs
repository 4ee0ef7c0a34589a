# Under both isolations (LuaSandbox.Isolation): LuaSandbox.Adversarial.AbortEvasionTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.Adversarial.AbortEvasionTest, Macro.camelize("#{isolation}")) do
    # Scripts that try to survive an instruction, memory or output limit: by catching the
    # abort (pcall, xpcall, coroutines, load readers, __close), by looping where the hook does
    # not reach (message handlers, finalizers), or by replacing the protected functions.
    use LuaSandbox.Adversarial.Case, async: true, isolation: isolation

    describe "instruction limit" do
      test "xpcall with a looping body and a looping message handler" do
        assert_error(
          "xpcall(function() while true do end end, function() while true do end end)",
          :instruction_limit
        )
      end

      test "xpcall in a loop, handler returning the error" do
        assert_error(
          "while true do xpcall(function() while true do end end, function(e) return e end) end",
          :instruction_limit
        )
      end

      test "xpcall with a C function (print) as handler, in a loop" do
        assert_error(
          "while true do xpcall(function() while true do end end, print) end",
          :instruction_limit
        )
      end

      test "pcall in a loop" do
        assert_error(
          "while true do pcall(function() while true do end end) end",
          :instruction_limit
        )
      end

      test "pcall of pcall of pcall ... in a loop" do
        src = """
        local function f(n)
          if n == 0 then while true do end end
          return pcall(f, n - 1)
        end
        while true do f(150) end
        """

        assert_error(src, :instruction_limit)
      end

      test "error handler that raises again (error in error handling), in a loop" do
        src = """
        while true do
          xpcall(function() error('a') end, function(e) error('b') end)
        end
        """

        assert_error(src, :instruction_limit)
      end

      test "a message handler for an ordinary error that loops forever" do
        assert_error(
          "xpcall(function() error('x') end, function(e) while true do end end)",
          :instruction_limit
        )
      end

      test "a message handler that loops inside pcall, in a loop" do
        src = """
        while true do
          xpcall(function() error('x') end, function(e)
            while true do pcall(function() end) end
          end)
        end
        """

        assert_error(src, :instruction_limit)
      end

      test "coroutine.resume of a looping coroutine, in a loop" do
        assert_error(
          "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
          :instruction_limit
        )
      end

      test "pcall(coroutine.wrap(...)) of a looping coroutine, in a loop" do
        assert_error(
          "while true do pcall(coroutine.wrap(function() while true do end end)) end",
          :instruction_limit
        )
      end

      test "coroutine.close running a looping __close, in a loop" do
        src = """
        while true do
          local co = coroutine.create(function()
            local x <close> = setmetatable({}, {__close = function() while true do end end})
            coroutine.yield()
          end)
          coroutine.resume(co)
          pcall(coroutine.close, co)
        end
        """

        assert_error(src, :instruction_limit)
      end

      test "load with a reader function that loops, in a loop" do
        assert_error(
          "while true do pcall(load, function() while true do end end) end",
          :instruction_limit
        )
      end

      test "a top-level __close that loops after the abort" do
        src = """
        local x <close> = setmetatable({}, {__close = function() while true do end end})
        while true do end
        """

        assert_error(src, :instruction_limit)
      end

      test "a __close that keeps calling pcall after the abort" do
        src = """
        local x <close> = setmetatable({}, {__close = function()
          while true do pcall(error, 'again') end
        end})
        while true do end
        """

        assert_error(src, :instruction_limit)
      end

      test "several nested __close handlers, each looping" do
        src = """
        local function loop() while true do pcall(function() end) end end
        local a <close> = setmetatable({}, {__close = loop})
        local b <close> = setmetatable({}, {__close = loop})
        local c <close> = setmetatable({}, {__close = loop})
        while true do end
        """

        assert_error(src, :instruction_limit)
      end

      test "budget holds in coroutines nested several levels deep" do
        src = """
        local function nest(n)
          if n == 0 then while true do end end
          local co = coroutine.create(nest)
          return coroutine.resume(co, n - 1)
        end
        while true do nest(6) end
        """

        assert_error(src, :instruction_limit)
      end

      test "budget holds in a coroutine that yields forever" do
        src = """
        local co = coroutine.wrap(function() while true do coroutine.yield() end end)
        while true do co() end
        """

        assert_error(src, :instruction_limit)
      end

      test "string.gsub callback that loops, under pcall in a loop" do
        assert_error(
          "while true do pcall(string.gsub, 'aaa', 'a', function() while true do end end) end",
          :instruction_limit
        )
      end

      test "table.sort comparator that loops" do
        assert_error(
          "table.sort({3, 2, 1}, function(a, b) while true do end end)",
          :instruction_limit
        )
      end

      test "__index function loop reached from C (table.concat)" do
        src = """
        local t = setmetatable({}, {__index = function() while true do end end})
        return table.concat(t, ',', 1, 3)
        """

        assert_error(src, :instruction_limit)
      end

      test "__tostring that loops, through tostring and print" do
        src = """
        local t = setmetatable({}, {__tostring = function() while true do end end})
        pcall(tostring, t)
        print(t)
        """

        assert_error(src, :instruction_limit)
      end

      test "__eq, __lt and __concat metamethods that loop, under pcall" do
        src = """
        local loop = function() while true do pcall(function() end) end end
        local mt = {__eq = loop, __lt = loop, __concat = loop}
        local a, b = setmetatable({}, mt), setmetatable({}, mt)
        while true do
          pcall(function() return a == b end)
          pcall(function() return a < b end)
          pcall(function() return a .. b end)
        end
        """

        assert_error(src, :instruction_limit)
      end
    end

    describe "finalizers" do
      test "a __gc metamethod on a table never runs (setmetatable is stock, the collector ignores it)" do
        src = """
        local ran = 0
        for i = 1, 1000 do setmetatable({}, {__gc = function() ran = ran + 1 end}) end
        collectgarbage()
        collectgarbage()
        setmetatable({}, {__gc = function() while true do end end})
        return ran
        """

        assert_values(src, [0], max_instructions: 5_000_000)
        assert_alive()
      end

      test "__gc added to the metatable after setmetatable never runs" do
        src = """
        local mt = {}
        local t = setmetatable({}, mt)
        mt.__gc = function() while true do end end
        rawset(mt, '__gc', mt.__gc)
        t = nil
        for i = 1, 2e5 do local garbage = {i} end
        return 'done'
        """

        assert_values(src, ["done"], max_instructions: 5_000_000)
      end

      test "__gc reachable only through the metatable's __index is not a finalizer" do
        src = """
        local hidden = {__gc = function() while true do end end}
        local mt = setmetatable({}, {__index = hidden})
        for i = 1, 1000 do setmetatable({}, mt) end
        for i = 1, 2e5 do local garbage = {i} end
        return 'done'
        """

        assert_values(src, ["done"], max_instructions: 5_000_000)
      end

      test "the original setmetatable kept in a local sets an inert __gc too" do
        src = """
        local sm = setmetatable
        _G.setmetatable = nil
        local ran = false
        sm({}, {__gc = function() ran = true end})
        collectgarbage()
        return ran
        """

        assert_values(src, [false])
      end
    end

    describe "memory limit" do
      test "pcall in a loop around an allocation that never fits" do
        src = """
        local keep = {}
        while true do
          pcall(function() for i = 1, 1e7 do keep[#keep + 1] = {} end end)
        end
        """

        assert_error(src, :memory_limit, max_instructions: 50_000_000)
      end

      test "pcall(string.rep) of a huge string, in a loop" do
        assert_error("while true do pcall(string.rep, 'x', 1e8) end", :memory_limit)
      end

      test "memory error inside coroutine.wrap inside pcall, in a loop" do
        src = """
        while true do
          pcall(coroutine.wrap(function() local s = 'x' while true do s = s .. s end end))
        end
        """

        assert_error(src, :memory_limit)
      end

      test "memory error inside a load reader, in a loop" do
        src = """
        while true do
          pcall(load, function() local s = 'x' while true do s = s .. s end end)
        end
        """

        assert_error(src, :memory_limit)
      end

      test "memory error in a __close handler running during coroutine.close" do
        src = """
        while true do
          local co = coroutine.create(function()
            local x <close> = setmetatable({}, {__close = function()
              local s = 'x' while true do s = s .. s end
            end})
            coroutine.yield()
          end)
          coroutine.resume(co)
          pcall(coroutine.close, co)
        end
        """

        assert_error(src, :memory_limit)
      end
    end

    describe "output limit" do
      test "pcall(print) in a loop past max_output" do
        assert_error(
          "while true do pcall(print, string.rep('x', 100)) end",
          :output_limit,
          max_output: 10_000
        )
      end

      test "io.write under xpcall in a loop past max_output" do
        assert_error(
          "while true do xpcall(io.write, function(e) return e end, 'xxxxxxxxxx') end",
          :output_limit,
          max_output: 10_000
        )
      end
    end

    describe "replacing the protected functions" do
      test "replacing _G.pcall, xpcall, setmetatable and coroutine changes nothing" do
        src = """
        _G.pcall = function(f, ...) return true, f(...) end
        _G.xpcall = nil
        setmetatable = function(t) return t end
        coroutine = {resume = function() return true end}
        local ok = true
        while ok do ok = pcall(function() while true do end end) end
        """

        assert_error(src, :instruction_limit)
      end

      test "a script's own pcall-like wrapper cannot swallow the abort" do
        src = """
        local real = pcall
        local function mypcall(f) local r = {real(f)} return table.unpack(r) end
        while true do mypcall(function() while true do end end) end
        """

        assert_error(src, :instruction_limit)
      end

      test "replacing string.find does not open load to binary chunks" do
        src = """
        string.find = function() return 1 end
        return load('\\27Lua', 'x', 'b')
        """

        assert_values(src, fn [nil, msg] -> is_binary(msg) end)
      end

      test "wrapping coroutine.yield and resume with the script's own functions" do
        src = """
        local y, r = coroutine.yield, coroutine.resume
        coroutine.yield = function(...) return y(...) end
        coroutine.resume = function(co, ...) return r(co, ...) end
        local co = coroutine.create(function() while true do coroutine.yield() end end)
        while true do coroutine.resume(co) end
        """

        assert_error(src, :instruction_limit)
      end
    end

    describe "kill" do
      test "a pure Lua loop with an unlimited budget is stopped by the timeout" do
        tasks =
          for _ <- 1..3 do
            Task.async(fn ->
              :timer.tc(fn ->
                lua_run("while true do end",
                  max_instructions: 1_000_000_000_000,
                  timeout: 300
                )
              end)
            end)
          end

        for {us, result} <- Task.await_many(tasks, 10_000) do
          assert {:error, %Error{kind: :timeout}} = result
          assert_bound(us, 2_000_000)
        end

        # The dirty schedulers are free again: the runs really stopped.
        assert_alive()

        {us, result} =
          :timer.tc(fn ->
            lua_run("local n = 0 for i = 1, 1e6 do n = n + i end return n", timeout: 5_000)
          end)

        assert {:ok, %{value: 500_000_500_000}} = result
        assert_bound(us, 2_000_000)
      end
    end
  end
end
