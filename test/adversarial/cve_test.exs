# Under both isolations (LuaSandbox.Isolation): LuaSandbox.Adversarial.CveTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.Adversarial.CveTest, Macro.camelize("#{isolation}")) do
    # Regression inputs for published Lua 5.4 bugs and CVEs, and the C-stack cases of Lua's
    # own test suite (testes/cstack.lua), reconstructed from their descriptions. The vendored
    # Lua has the fixes; these make sure the sandbox (its wrappers, the hook, the big stack)
    # does not reopen them. Expected: a clean error or a value, never a crash.
    use LuaSandbox.Adversarial.Case, async: true, isolation: isolation

    describe "CVE-2022-28805: singlevar/luaK_indexed with a constant _ENV" do
      test "_ENV <const> bound to a number, a string, nil, a float" do
        for init <- ["45", "'hello'", "nil", "1.5", "true"] do
          for body <- [
                "return x",
                "x = 1",
                "return x.y.z",
                "local function f() return y end return f()"
              ] do
            assert_clean("local _ENV <const> = #{init}\n#{body}", [:runtime, :unsupported_value])
          end
        end
      end

      test "_ENV <const> bound to a table works" do
        assert_values("local _ENV <const> = {x = 42} return x", [42])
      end
    end

    describe "5.4.4 bug: wrong code for constants in bitwise operations" do
      test "bitwise operations on <const> locals" do
        src = """
        local a <const> = 0xFF
        local b <const> = 1 << 62
        return a & 0x0F, a | 0x100, a ~ 1, ~a, a << 4, a >> 4, b << 1, b >> 62
        """

        assert_values(src, [15, 511, 254, -256, 4080, 15, -9_223_372_036_854_775_808, 1])
      end

      test "bitwise operations on non-integral constants fail cleanly" do
        assert_error("local f <const> = 1.5 return f | 0", :runtime)
        assert_error("local s <const> = 'x' return s & 1", :runtime)
        assert_values("local f <const> = 2^53 return f | 0", [9_007_199_254_740_992])
      end
    end

    describe "CVE-2022-33099: luaG_runerror and stack reallocation while handling errors" do
      test "xpcall(loop, loop) with pcall inside" do
        src = """
        local function loop() assert(pcall(loop)) end
        return xpcall(loop, loop)
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "a message handler that grows the Lua stack for a formatted runtime error" do
        src = """
        local function grow(n) if n > 0 then return 1 + grow(n - 1) end return 0 end
        return xpcall(function() local x = nil; x.field.other = 1 end, function(m)
          grow(50000)
          return m
        end)
        """

        assert_values(src, fn [false, msg] -> msg =~ "attempt to index" end,
          max_memory: 64 * 1024 * 1024
        )
      end

      test "runtime errors naming variables raised from a handler that recurses" do
        src = """
        local depth = 0
        local function h(m)
          depth = depth + 1
          local t = {}
          for i = 1, 100 do t[i] = i end
          return undefined_global_function_with_a_long_name(m)
        end
        return xpcall(function() return nothing.here end, h)
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "stack overflow inside the message handler" do
        src = """
        local count = 0
        local function loop(x, y, z) count = count + 1 return 1 + loop(x, y, z) end
        return xpcall(loop, loop)
        """

        assert_clean(src, [:runtime, :memory_limit, :instruction_limit],
          max_memory: 64 * 1024 * 1024
        )
      end
    end

    describe "CVE-2021-43519: C stack overflow through coroutines / lua_resume" do
      test "coroutine.wrap recursion in an xpcall handler" do
        src = """
        local function f() coroutine.wrap(f)() end
        return xpcall(f, f)
        """

        # Every level re-raises the error with its position prepended, so the message grows
        # with the depth: quadratic copying (~140 ms of CPU here), which the budget now charges
        # (1 unit per 16 bytes of every long string made) and may therefore exhaust.
        assert_clean(src, [:runtime, :memory_limit, :instruction_limit])
      end

      test "a handler that resumes a coroutine that errors with the same handler" do
        src = """
        local function h(e)
          local co = coroutine.wrap(function() return xpcall(error, h, e) end)
          return co()
        end
        return xpcall(error, h, 'x')
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "coroutines resumed from inside metamethods, recursively" do
        src = """
        local mt = {}
        mt.__index = function(t, k) return coroutine.wrap(function() return t[k] end)() end
        return setmetatable({}, mt).x
        """

        assert_error(src, [:runtime, :memory_limit])
      end
    end

    describe "CVE-2021-44964: collector and finalizer interplay" do
      test "the published shape: generational mode plus finalizers cannot happen" do
        # collectgarbage answers but keeps the incremental mode; the table's __gc is inert
        src = """
        local old = collectgarbage('generational')
        local ran = false
        local t = setmetatable({}, {__gc = function(o) ran = true o.x = {} end})
        t = nil
        collectgarbage()
        return old, collectgarbage('incremental'), ran
        """

        assert_values(src, ["incremental", "incremental", false])
      end

      test "finalizer-free churn with weak tables, coroutines and closures" do
        src = """
        local weak = setmetatable({}, {__mode = 'kv'})
        for i = 1, 2e4 do
          local co = coroutine.create(function(x) coroutine.yield(x) return {x} end)
          coroutine.resume(co, {i})
          weak[co] = function() return co end
          weak[i] = string.rep('s', i % 100)
        end
        local n = 0
        for _ in pairs(weak) do n = n + 1 end
        return n >= 0
        """

        assert_values(src, [true], max_instructions: 10_000_000)
      end
    end

    describe "CVE-2020-24342 and 5.4.0 luaD_callnoyield: metamethod recursion" do
      test "__index function indexing itself" do
        src = """
        local t = setmetatable({}, {__index = function(t, k) return t[k] end})
        return t.x
        """

        assert_error(src, [:runtime, :memory_limit], message: ~r/stack overflow/)
      end

      test "__index recursion inside pcall inside __index" do
        src = """
        local t
        t = setmetatable({}, {__index = function(_, k) return select(2, pcall(function() return t[k] end)) end})
        return t.x
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "__call on an object whose __call errors with a formatted message, recursively" do
        src = """
        local obj
        obj = setmetatable({}, {__call = function(self, n) return obj(n + 1) + nope end})
        return obj(0)
        """

        assert_error(src, [:runtime, :memory_limit])
      end
    end

    describe "CVE-2020-15888: stack resizing inside __lt/__le with coroutines" do
      test "comparison metamethods that grow the stack and switch coroutines" do
        src = """
        local function grow(n) if n > 0 then return 1 + grow(n - 1) end return 0 end
        local mt = {}
        mt.__lt = function(a, b)
          grow(2000)
          return coroutine.wrap(function() grow(2000) return a.v < b.v end)()
        end
        mt.__le = mt.__lt
        local t = {}
        for i = 1, 50 do t[i] = setmetatable({v = (i * 37) % 50}, mt) end
        table.sort(t)
        return t[1].v, t[50].v, t[1] <= t[2]
        """

        assert_values(src, [0, 49, true], max_instructions: 20_000_000)
      end
    end

    describe "5.4 bugs around to-be-closed variables" do
      test "a __close that grows the stack (lua_settop with a stale pointer)" do
        src = """
        local function grow(n) if n > 0 then return 1 + grow(n - 1) end return 0 end
        local function f()
          local x <close> = setmetatable({}, {__close = function() grow(20000) end})
          local y <close> = setmetatable({}, {__close = function() grow(20000) end})
          return 'v'
        end
        return f(), f()
        """

        assert_values(src, ["v", "v"], max_memory: 64 * 1024 * 1024)
      end

      test "break out of a loop with to-be-closed variables" do
        src = """
        local closed = 0
        for i = 1, 10 do
          local x <close> = setmetatable({}, {__close = function() closed = closed + 1 end})
          if i == 3 then break end
        end
        return closed
        """

        assert_values(src, [3])
      end

      test "a coroutine that closes itself from its own __close" do
        src = """
        local co
        co = coroutine.create(function()
          local x <close> = setmetatable({}, {__close = function() coroutine.close(co) end})
          coroutine.yield()
        end)
        coroutine.resume(co)
        return coroutine.close(co)
        """

        assert_clean(src, [:runtime])
      end

      test "yield inside __close" do
        src = """
        local co = coroutine.wrap(function()
          local x <close> = setmetatable({}, {__close = function() coroutine.yield('closing') end})
          return 'body'
        end)
        return co(), co()
        """

        assert_clean(src, [:runtime])
      end
    end

    describe "5.4.6 and older parser/VM bugs" do
      test "string comparison with embedded zeros (l_strcmp)" do
        assert_values(
          "return ('a\\0b') < ('a\\0c'), ('a\\0') < ('a'), ('a') < ('a\\0'), ('\\0') == ('\\0\\0')",
          [true, false, true, false]
        )
      end

      test "string.format('%q') of the minimum integer and of special floats" do
        assert_values(
          "return string.format('%q', math.mininteger), string.format('%q', 1/0), string.format('%q', 0/0)",
          ["0x8000000000000000", "1e9999", "(0/0)"]
        )
      end

      test "generic for with more than three expressions" do
        assert_values("for k in next, {}, nil, nil, nil do end return 1", [1])
      end

      test "integer for loops at the edges of the integer range" do
        src = """
        local n = 0
        for i = math.maxinteger - 2, math.maxinteger do n = n + 1 end
        for i = math.mininteger, math.mininteger + 2 do n = n + 1 end
        for i = math.mininteger + 2, math.mininteger, -1 do n = n + 1 end
        for i = 1, 0 do n = n + 100 end
        return n
        """

        assert_values(src, [9])
      end

      test "integer division and modulo edge cases" do
        assert_values(
          "return math.mininteger // -1, math.mininteger % -1, 7 // 0.0, -7 % math.huge",
          [-9_223_372_036_854_775_808, 0, :infinity, :infinity]
        )

        assert_error("return 1 // 0", :runtime)
        assert_error("return 1 % 0", :runtime)
      end

      test "goto and labels in nested blocks" do
        src = """
        local n = 0
        ::top::
        n = n + 1
        do do do if n < 5 then goto top end end end end
        return n
        """

        assert_values(src, [5])
      end
    end

    describe "testes/cstack.lua" do
      test "simple recursion: xpcall(loop, loop) with assert(pcall(loop))" do
        src = """
        local function loop() assert(pcall(loop)) end
        local res, msg = xpcall(loop, loop)
        return res, type(msg)
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "recursion inside pattern matching" do
        src = """
        local function f(size)
          local s = string.rep('a', size)
          local p = string.rep('.?', size)
          return string.match(s, p)
        end
        return #f(80), pcall(f, 2000)
        """

        assert_values(src, fn [80, false, msg] -> msg =~ "too complex" end)
      end

      test "stack overflow in recursive gsub" do
        src = """
        local count = 0
        local function foo() count = count + 1 return string.gsub('a', '.', foo) end
        return pcall(foo)
        """

        assert_values(src, fn [false, msg] -> msg =~ "stack overflow" end)
      end

      test "stack overflow in recursive gsub with metatables" do
        src = """
        local count = 0
        local t = setmetatable({}, {__index = function() return foo() end})
        function foo() count = count + 1 return string.gsub('a', '.', t) end
        return pcall(foo)
        """

        assert_values(src, fn [false, msg] -> msg =~ "stack overflow" end)
      end

      test "limits in coroutines inside deep calls" do
        src = """
        local count = 0
        local lim = 1000
        local function stack(n)
          if n > 0 then return stack(n - 1) + 1
          else coroutine.wrap(function() count = count + 1 stack(lim) end)() end
        end
        local st, msg = xpcall(stack, function() return 'ok' end, lim)
        return st, msg, count > 0
        """

        assert_values(src, [false, "ok", true],
          max_memory: 64 * 1024 * 1024,
          max_instructions: 50_000_000
        )
      end

      test "nesting of resuming yielded coroutines" do
        src = """
        local function body()
          coroutine.yield()
          local f = coroutine.wrap(body)
          f()
          f()
        end
        local f = coroutine.wrap(body)
        f()
        return pcall(f)
        """

        assert_values(src, fn [false, msg] -> is_binary(msg) end)
      end

      test "nesting coroutines running after recoverable errors" do
        src = """
        local count = 0
        local function foo()
          count = count + 1
          pcall(1)
          local f = coroutine.wrap(foo)
          f()
        end
        return pcall(foo)
        """

        assert_values(src, fn [false, msg] -> msg =~ "C stack overflow" end)
      end

      test "to-be-closed variables closing a deep coroutine" do
        src = """
        local function deep(n)
          if n > 0 then
            local x <close> = setmetatable({}, {__close = function() deep(n - 1) end})
          else
            coroutine.yield()
          end
        end
        local co = coroutine.create(function() deep(150) end)
        coroutine.resume(co)
        return coroutine.close(co)
        """

        assert_clean(src, [:runtime])
      end
    end
  end
end
