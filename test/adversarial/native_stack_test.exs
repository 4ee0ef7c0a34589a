# Under both isolations (LuaSandbox.Isolation): LuaSandbox.Adversarial.NativeStackTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.Adversarial.NativeStackTest, Macro.camelize("#{isolation}")) do
    # Recursion through C (builtins, metamethods, the parser, coroutines) on the default dirty
    # scheduler stack: a clean :runtime error ("stack overflow", "C stack overflow", "too many
    # ... levels") or :memory_limit, never a crashed VM.
    use LuaSandbox.Adversarial.Case, async: true, isolation: isolation

    @overflow ~r/stack overflow|C stack|too many|levels|chain too long|overflow|error in error handling/

    describe "builtins calling back into Lua" do
      test "string.gsub with a callback recursing into gsub" do
        src = "local function g(s) return (string.gsub(s, '.', g)) end return g('ab')"
        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "string.gsub with a replacement table whose __index recurses into gsub" do
        src = """
        local foo
        local t = setmetatable({}, {__index = function(_, k) return foo() end})
        foo = function() return (string.gsub('a', '.', t)) end
        return foo()
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "string.format('%s', t) where __tostring formats t again" do
        src = """
        local t = setmetatable({}, {__tostring = function(t) return string.format('%s', t) end})
        return tostring(t)
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "tostring recursion through __tostring" do
        src = """
        local mt = {}
        mt.__tostring = function(t) return 'x' .. tostring(t) end
        return tostring(setmetatable({}, mt))
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "table.sort comparator that sorts recursively" do
        src = """
        local function cmp(a, b) table.sort({3, 2, 1}, cmp) return a < b end
        table.sort({3, 2, 1}, cmp)
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "load with a reader that calls load" do
        src = """
        local function reader() local f = load(reader) return nil end
        return type(load(reader))
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "pcall recursion to the C-call limit returns its values" do
        assert_clean("local function f() return pcall(f) end return f()", [
          :runtime,
          :memory_limit
        ])
      end
    end

    describe "metamethods" do
      test "__index function indexing itself (t[k] inside __index)" do
        src = """
        local t = setmetatable({}, {__index = function(t, k) return t[k] end})
        return t.x
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "__newindex function assigning to itself" do
        src = """
        local t = setmetatable({}, {__newindex = function(t, k, v) t[k] = v end})
        t.x = 1
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "chains of __index functions over 1000 tables" do
        src = """
        local t = {}
        for i = 1, 1000 do
          local inner = t
          t = setmetatable({}, {__index = function(_, k) return inner[k] end})
        end
        return t.x
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "a 1e4-deep chain of __index tables" do
        src = """
        local t = {}
        for i = 1, 1e4 do t = setmetatable({}, {__index = t}) end
        return t.x
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "a 1e4-deep chain of __newindex tables" do
        src = """
        local t = {}
        for i = 1, 1e4 do t = setmetatable({}, {__newindex = t}) end
        t.x = 1
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      @tag :hardened_builtins
      test "__call chains: a table whose __call is itself, 2 MB heap" do
        # luaD_tryfuncTM shifts the whole stack by one slot per link and never runs an
        # instruction: quadratic C work bounded only by the heap (3 s at 2 MB, about a minute at
        # 8 MB, many minutes at the 64 MB default), out of reach of the budget and of a kill.
        src = """
        local t = setmetatable({}, {})
        getmetatable(t).__call = t
        return t()
        """

        assert_error(src, [:runtime, :memory_limit, :instruction_limit],
          max_memory: 2 * 1024 * 1024,
          bound_us: 1_000_000
        )
      end

      @tag :hardened_builtins
      @tag skip: skip_unless_hardened(:call_chain)
      test "__call chains at the default memory limit" do
        src = """
        local a, b = setmetatable({}, {}), setmetatable({}, {})
        getmetatable(a).__call = b
        getmetatable(b).__call = a
        return a()
        """

        assert_error(src, [:runtime, :memory_limit, :instruction_limit],
          max_memory: 64 * 1024 * 1024
        )
      end

      test "__len, __concat, __eq, __lt, __unm recursing through themselves" do
        for {mm, expr} <- [
              {"__len", "#a"},
              {"__concat", "a .. a"},
              {"__eq", "a == b"},
              {"__lt", "a < b"},
              {"__le", "a <= b"},
              {"__unm", "-a"},
              {"__add", "a + 1"}
            ] do
          src = """
          local mt = {}
          local a, b = setmetatable({}, mt), setmetatable({}, mt)
          mt.#{mm} = function(x, y) return #{expr} end
          return #{expr}
          """

          assert_error(src, [:runtime, :memory_limit], message: @overflow)
        end
      end
    end

    describe "the parser" do
      test "load of 1e5 open parentheses" do
        assert_values("return load(string.rep('(', 1e5))", fn [nil, msg] -> msg =~ @overflow end)
      end

      test "load of 'a = ' followed by 1e5 open braces" do
        assert_values(
          "return load('a = ' .. string.rep('{', 1e5))",
          fn [nil, msg] -> is_binary(msg) end
        )
      end

      test "a source of 1e5 open braces" do
        assert_error("a = " <> String.duplicate("{", 100_000), [:syntax, :runtime])
      end

      test "a source of 1e5 nested parentheses around a value" do
        src = "return " <> String.duplicate("(", 100_000) <> "1" <> String.duplicate(")", 100_000)
        assert_error(src, [:syntax, :runtime])
      end

      test "right-associative operators nested 1e5 deep" do
        for op <- ["^", ".."] do
          src = "return " <> String.duplicate("2 #{op} ", 100_000) <> "2"
          assert_error(src, [:syntax, :runtime, :memory_limit])
        end
      end

      test "unary operators nested 1e5 deep" do
        for op <- ["- ", "not ", "~ ", "# "] do
          assert_error("return " <> String.duplicate(op, 100_000) <> "1", [:syntax, :runtime])
        end
      end

      test "nested blocks and functions 1e4 deep" do
        for {open, close} <- [
              {"do ", " end"},
              {"if true then ", " end"},
              {"while false do ", " end"},
              {"local function f() ", " end"},
              {"repeat ", " until true"}
            ] do
          src = String.duplicate(open, 10_000) <> String.duplicate(close, 10_000)
          assert_error(src, [:syntax, :runtime])
        end
      end

      test "300 locals in one function" do
        locals = Enum.map_join(1..300, "\n", &"local v#{&1} = #{&1}")
        assert_error(locals, :syntax, message: ~r/too many local variables|limit/)
      end

      test "a function with 300 upvalues" do
        outer = Enum.map_join(1..150, "\n", &"local v#{&1} = #{&1}")
        inner = Enum.map_join(1..150, "\n", &"local w#{&1} = #{&1}")
        uses = Enum.map_join(1..150, " + ", &"v#{&1} + w#{&1}")

        src =
          "#{outer}\nlocal function g()\n#{inner}\nreturn function() return #{uses} end\nend\nreturn g()()"

        assert_error(src, :syntax, message: ~r/upvalues|limit/)
      end
    end

    describe "coroutines" do
      test "1e4 nested coroutine.wrap" do
        src = """
        local function f(n)
          if n == 0 then return 0 end
          return coroutine.wrap(f)(n - 1) + 1
        end
        return f(10000)
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "1e4 nested coroutine.resume" do
        src = """
        local function f(n)
          if n == 0 then return 0 end
          local ok, v = coroutine.resume(coroutine.create(f), n - 1)
          if not ok then error(v, 0) end
          return v + 1
        end
        return f(10000)
        """

        assert_error(src, [:runtime, :memory_limit], message: @overflow)
      end

      test "coroutine.wrap recursion caught by pcall at every level" do
        src = """
        local function f(n) return pcall(coroutine.wrap(f), n + 1) end
        return f(0)
        """

        assert_clean(src, [:runtime, :memory_limit])
      end

      test "1e5 live suspended coroutines" do
        src = """
        local t = {}
        for i = 1, 1e5 do
          local co = coroutine.create(function() coroutine.yield() end)
          coroutine.resume(co)
          t[i] = co
        end
        return #t
        """

        assert_clean(src, [:memory_limit, :instruction_limit])
      end

      test "coroutine.close chain: each __close closes the next coroutine" do
        src = """
        local function make(n)
          return coroutine.create(function()
            local inner = n > 0 and make(n - 1) or nil
            if inner then coroutine.resume(inner) end
            local x <close> = setmetatable({}, {__close = function()
              if inner then coroutine.close(inner) end
            end})
            coroutine.yield()
          end)
        end
        local co = make(300)
        coroutine.resume(co)
        return coroutine.close(co)
        """

        assert_clean(src, [:runtime, :memory_limit])
      end
    end

    describe "plain Lua recursion" do
      test "non-tail recursion without end, 32 MB heap" do
        assert_error(
          "local function f() return 1 + f() end return f()",
          [:runtime, :memory_limit],
          max_memory: 32 * 1024 * 1024
        )
      end

      # Regression: the count hook once called lua_sethook at every firing, and lua_sethook walks
      # every CallInfo (settraps), so each 1000 instructions cost O(stack depth) and deep
      # recursion ran quadratically (~9 s at 64 MB for 1.6M instructions). The instruction ticker
      # that replaced the hook has no per-frame cost.
      @tag :hook_cost
      test "a loop at the bottom of a 150k-deep recursion runs at full speed" do
        src = """
        local function f(n)
          if n == 0 then for i = 1, 2e6 do end return 0 end
          return 1 + f(n - 1)
        end
        return f(150000)
        """

        assert_values(src, [150_000],
          max_memory: 64 * 1024 * 1024,
          max_instructions: 5_000_000,
          bound_us: 3_000_000
        )
      end

      test "recursion with many arguments per frame" do
        src = "local function f(...) return 1 + f(1, 2, 3, 4, 5, 6, 7, 8, ...) end return f()"
        assert_error(src, [:runtime, :memory_limit], max_memory: 64 * 1024 * 1024)
      end
    end
  end
end
