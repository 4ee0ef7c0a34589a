# Under both isolations (LuaSandbox.Isolation): LuaSandbox.Adversarial.BuiltinsCpuTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.Adversarial.BuiltinsCpuTest, Macro.camelize("#{isolation}")) do
    # CPU spent inside C builtins, where the count hook does not fire: catastrophic patterns,
    # O(n*m) plain find, sorting, and C loops whose length the script chooses. Each must end
    # with :instruction_limit (or :memory_limit for huge allocations).
    #
    # Tagged :hardened_builtins: they need the budget-charging builtins. Inputs that stay bounded
    # without them (a second or less of C) always run, so they fail visibly until then; the
    # full-size inputs pin a dirty scheduler for minutes to forever without them (a kill cannot
    # interrupt C), so they are skipped until the probe in LuaSandbox.Adversarial.Case sees the
    # builtin charge its work.
    # Not async: the inputs that fail today keep dirty schedulers busy for seconds, which
    # would starve the other modules' runs into timeouts.
    use LuaSandbox.Adversarial.Case, async: false, isolation: isolation

    describe "pattern matching, bounded today" do
      @describetag :hardened_builtins

      test "string.find with '.-.-.-b' on 150 chars" do
        assert_error(
          "return string.find(string.rep('a', 150), '.-.-.-b')",
          :instruction_limit,
          max_instructions: 100_000
        )
      end

      test "string.match with '.-.-b' on 400 chars" do
        assert_error(
          "return string.match(string.rep('a', 400), '.-.-b')",
          :instruction_limit,
          max_instructions: 100_000
        )
      end

      test "string.gsub with '.-.-b' on 400 chars" do
        assert_error(
          "return string.gsub(string.rep('a', 400), '.-.-b', '')",
          :instruction_limit,
          max_instructions: 100_000
        )
      end

      test "string.gmatch with '.-.-b' on 400 chars" do
        assert_error(
          "local n = 0 for _ in string.gmatch(string.rep('a', 400), '.-.-b') do n = n + 1 end return n",
          :instruction_limit,
          max_instructions: 100_000
        )
      end

      test "string.find with '.*.*b' on 1000 chars" do
        assert_error(
          "return string.find(string.rep('a', 1000), '.*.*b')",
          :instruction_limit,
          max_instructions: 100_000
        )
      end

      test "string.find with '%s*$' on 2000 spaces and an x" do
        assert_error(
          "return string.find(string.rep(' ', 2000) .. 'x', '%s*$')",
          :instruction_limit,
          max_instructions: 20_000
        )
      end

      test "plain string.find, O(n*m): 1e6 haystack, 1e4 needle" do
        assert_error(
          "return string.find(string.rep('a', 1e6), string.rep('a', 1e4) .. 'b', 1, true)",
          :instruction_limit,
          max_instructions: 10_000_000,
          max_memory: 16 * 1024 * 1024
        )
      end

      test "plain string.find in a loop (a few instructions buy 0.1 s of C each)" do
        src = """
        local hay, needle = string.rep('a', 1e6), string.rep('a', 1e4) .. 'b'
        for i = 1, 1e6 do string.find(hay, needle, 1, true) end
        """

        assert_error(src, :instruction_limit,
          max_instructions: 3_000_000,
          max_memory: 16 * 1024 * 1024,
          timeout: 3_000
        )
      end
    end

    describe "table.sort" do
      @tag :hardened_builtins
      test "of 2e5 numbers without a comparator" do
        src = """
        local t = {}
        for i = 1, 2e5 do t[i] = (i * 7919) % 200003 end
        table.sort(t)
        return #t
        """

        assert_error(src, :instruction_limit, max_instructions: 1_000_000)
      end

      @tag :hardened_builtins
      test "of 5e5 numbers built in C, without a comparator" do
        src = """
        local t = table.pack(string.byte(string.rep('zyxwvutsrq', 5e4), 1, -1))
        t.n = nil
        table.sort(t)
        return #t
        """

        assert_error(src, :instruction_limit,
          max_instructions: 3_000_000,
          max_memory: 64 * 1024 * 1024
        )
      end

      test "of 2e5 numbers with a Lua comparator" do
        src = """
        local t = {}
        for i = 1, 2e5 do t[i] = (i * 7919) % 200003 end
        table.sort(t, function(a, b) return a < b end)
        return #t
        """

        assert_error(src, :instruction_limit, max_instructions: 1_000_000)
      end

      test "with an inconsistent comparator" do
        src = """
        local t = {}
        for i = 1, 1000 do t[i] = i end
        table.sort(t, function(a, b) return true end)
        """

        assert_error(src, [:runtime, :instruction_limit])
      end

      test "with a comparator that shrinks the table while sorting" do
        src = """
        local t = {}
        for i = 1, 500 do t[i] = i end
        table.sort(t, function(a, b) t[#t] = nil return (a or 0) > (b or 0) end)
        return #t
        """

        assert_clean(src, [:runtime, :instruction_limit])
      end
    end

    describe "C loops the script sizes (bounded today)" do
      @describetag :hardened_builtins

      test "string.rep('', 1e8) copies nothing 1e8 times" do
        assert_error("return #string.rep('', 1e8)", :instruction_limit, max_instructions: 1_000)
      end

      test "string.rep('', 1e8, '') with an empty separator" do
        assert_error("return #string.rep('', 1e8, '')", :instruction_limit,
          max_instructions: 1_000
        )
      end

      test "table.move({}, 1, 1e8, 2) moves 1e8 nils" do
        assert_error("return table.move({}, 1, 1e8, 2) ~= nil", :instruction_limit,
          max_instructions: 1_000
        )
      end

      test "table.insert at 1 with a __len of 1e8" do
        src = """
        local t = setmetatable({}, {__len = function() return 1e8 end})
        table.insert(t, 1, 'x')
        """

        assert_error(src, :instruction_limit, max_instructions: 1_000)
      end

      test "table.remove at 1 with a __len of 1e8" do
        src = """
        local t = setmetatable({}, {__len = function() return 1e8 end})
        table.remove(t, 1)
        """

        assert_error(src, :instruction_limit, max_instructions: 1_000)
      end

      test "table.insert at the front of a 1e5-element table, 300 times" do
        src = """
        local t = table.pack(string.byte(string.rep('a', 1e5), 1, -1))
        for i = 1, 300 do table.insert(t, 1, i) end
        return #t
        """

        assert_error(src, :instruction_limit, max_instructions: 1_000_000)
      end

      test "load of a 600 KB chunk in a loop (parsing is outside the hook)" do
        src = """
        local s = string.rep('x = 1 ', 1e5)
        for i = 1, 1e6 do load(s) end
        """

        assert_error(src, :instruction_limit, max_instructions: 2_000_000, timeout: 3_000)
      end
    end

    describe "full size (skipped until the builtin is budgeted)" do
      @describetag :hardened_builtins

      @tag skip: skip_unless_hardened(:patterns)
      test "string.find(string.rep('a', 3000), '.-.-.-b')" do
        assert_error("return string.find(string.rep('a', 3000), '.-.-.-b')", :instruction_limit)
      end

      @tag skip: skip_unless_hardened(:patterns)
      test "string.match/gsub/gmatch with '.-.-b' on 5000 chars" do
        for src <- [
              "return string.match(string.rep('a', 5000), '.-.-b')",
              "return string.gsub(string.rep('a', 5000), '.-.-b', '')",
              "for _ in string.gmatch(string.rep('a', 5000), '.-.-b') do end"
            ] do
          assert_error(src, :instruction_limit)
        end
      end

      @tag skip: skip_unless_hardened(:patterns)
      test "'.*.*b', '%w-%w-%w-x' and '%s*$' on long subjects" do
        for src <- [
              "return string.find(string.rep('a', 40000), '.*.*b')",
              "return string.find(string.rep('a', 5000), '%w-%w-%w-x')",
              "return string.find(string.rep(' ', 1e5) .. 'x', '%s*$')",
              "return string.match(string.rep('a', 3000), '(.-)(.-)(.-)b')"
            ] do
          assert_error(src, :instruction_limit)
        end
      end

      @tag skip: skip_unless_hardened(:patterns)
      test "catastrophic string.find under pcall in a loop" do
        assert_error(
          "while true do pcall(string.find, string.rep('a', 3000), '.-.-.-b') end",
          :instruction_limit
        )
      end

      @tag skip: skip_unless_hardened(:rep)
      test "string.rep('', math.maxinteger) (a 1e19-step C loop)" do
        assert_error("return #string.rep('', math.maxinteger)", :instruction_limit)
        assert_error("return #string.rep('', math.maxinteger, '')", :instruction_limit)
      end

      @tag skip: skip_unless_hardened(:table_move)
      test "table.move({}, 1, math.maxinteger - 1, 2)" do
        assert_error("table.move({}, 1, math.maxinteger - 1, 2)", :instruction_limit)
      end

      @tag skip: skip_unless_hardened(:table_insert)
      test "table.insert/remove with __len = 2^62" do
        for op <- ["table.insert(t, 1, 'x')", "table.remove(t, 1)"] do
          src = "local t = setmetatable({}, {__len = function() return 2^62 end}) " <> op
          assert_error(src, :instruction_limit)
        end
      end
    end

    describe "huge allocations" do
      test "string.rep of 1e8 bytes" do
        assert_error("return #string.rep('x', 1e8)", :memory_limit)
      end

      test "string.rep('x', 1e9, ',')" do
        assert_error("return #string.rep('x', 1e9, ',')", :memory_limit)
      end

      test "table.concat of 100 references to a 100 KB string" do
        src = """
        local s = string.rep('x', 1e5)
        local t = {}
        for i = 1, 100 do t[i] = s end
        return #table.concat(t)
        """

        assert_error(src, :memory_limit,
          max_memory: 4 * 1024 * 1024,
          max_instructions: 100_000_000
        )
      end

      test "string.format('%s') and .. of big strings" do
        assert_error(
          "local s = string.rep('x', 1e6) while true do s = string.format('%s%s', s, s) end",
          :memory_limit,
          max_instructions: 100_000_000
        )
      end

      test "'.?' repeated 2000 times is too complex for the matcher" do
        assert_error(
          "return string.match(string.rep('a', 2000), string.rep('.?', 2000))",
          [:runtime, :instruction_limit]
        )
      end
    end
  end
end
