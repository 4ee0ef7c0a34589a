# Under both isolations (LuaSandbox.Isolation).
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.MarshalTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation

    defp lua_run(source, opts \\ []),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    alias LuaSandbox.Error

    defp roundtrip(term, opts \\ []) do
      lua_run("return v", Keyword.merge([globals: %{v: term}], opts))
    end

    defp value(source, opts \\ []) do
      {:ok, r} = lua_run(source, opts)
      r.value
    end

    defp kind(result) do
      assert {:error, %Error{kind: kind}} = result
      kind
    end

    describe "Elixir to Lua" do
      test "scalars" do
        assert value("return type(v)", globals: %{v: nil}) == "nil"
        assert value("return v", globals: %{v: true}) == true
        assert value("return v", globals: %{v: false}) == false
        assert value("return v", globals: %{v: :hello}) == "hello"
        assert value("return math.type(v)", globals: %{v: 3}) == "integer"
        assert value("return math.type(v)", globals: %{v: 3.0}) == "float"
        assert value("return #v", globals: %{v: <<0, 255, 1>>}) == 3
      end

      test "int64 bounds" do
        max = 0x7FFFFFFFFFFFFFFF
        assert value("return v", globals: %{v: max}) == max
        assert value("return v", globals: %{v: -max - 1}) == -max - 1
        assert kind(roundtrip(max + 1)) == :invalid_input
      end

      test "lists become sequences 1..n" do
        assert value("return #v, v[1], v[3]", globals: %{v: [10, 20, 30]}) == 3

        assert {:ok, %{values: [3, 10, 30]}} =
                 lua_run("return #v, v[1], v[3]", globals: %{v: [10, 20, 30]})
      end

      test "improper lists are invalid input" do
        assert kind(roundtrip([1 | 2])) == :invalid_input
      end

      test "map keys: binary, atom, integer, float, boolean" do
        src = "return v.a, v.b, v[1], v[2.5], v[true]"
        term = %{"a" => 1, :b => 2, 1 => 3, 2.5 => 4, true => 5}
        assert {:ok, %{values: [1, 2, 3, 4, 5]}} = lua_run(src, globals: %{v: term})
      end

      test "two keys that become the same Lua key are invalid input" do
        assert {:error, %Error{kind: :invalid_input, message: msg}} =
                 roundtrip(%{"a" => 1, :a => 2})

        assert msg =~ "same Lua key"
      end

      test "pids, refs, funs are invalid input naming the path" do
        for bad <- [self(), make_ref(), fn -> 1 end] do
          term = %{"ctx" => %{"items" => [1, 2, bad]}}

          assert {:error, %Error{kind: :invalid_input, message: msg}} =
                   lua_run("return 1", globals: %{ctx: term["ctx"]})

          assert msg =~ "globals.ctx.items[3]"
        end
      end

      test "a scalar key Lua cannot hold is refused in the same words on both isolations" do
        # The one walk (lua_sandbox_core::marshal::to_lua) words it and names the key's place.
        for {key, what} <- [
              {Integer.pow(2, 70), "integer key outside the 64-bit range"},
              {<<1::3>>, "bitstring key"}
            ] do
          assert {:error, %Error{kind: :invalid_input, message: msg}} =
                   lua_run("return 1", globals: %{ctx: %{"m" => %{key => 1}}})

          assert msg == "#{what} at globals.ctx.m[?]"
        end
      end

      test "structs without a LuaSandbox.Encoder are invalid input" do
        assert kind(roundtrip(%ExUnit.Test{})) == :invalid_input
      end

      test "max_depth holds on the way in" do
        deep = Enum.reduce(1..10, 1, fn _, acc -> [acc] end)
        assert kind(roundtrip(deep, max_depth: 5)) == :depth_limit
        assert {:ok, _} = roundtrip(deep, max_depth: 10)
      end
    end

    describe "big values" do
      # Under :process they cross a pipe and the worker's buffers, bounded by its jail's
      # address space (native/lua_sandbox_worker/src/jail.rs buffers_for/1).
      test "tens of MB in and out, and a list of a million and a half integers" do
        s = String.duplicate("x", 30_000_000)
        assert {:ok, %{value: 30_000_000}} = lua_run("return #s", globals: %{s: s})

        assert {:ok, %{value: ^s}} =
                 lua_run("return string.rep('x', 30000000)", max_result_bytes: 40_000_000)

        l = Enum.to_list(1..1_500_000)
        assert {:ok, %{values: [1_500_000, ^l]}} = lua_run("return #l, l", globals: %{l: l})
      end
    end

    describe "large maps (more than 2 048 keys: the NIF builds them in pieces)" do
      # A table with keys of every type, maps of more than one piece nested in maps and lists
      # (LuaSandbox.Pieces, native/lua_sandbox_nif/src/term.rs `map_checked`).
      @big """
      local function big(n, base)
        local t = {}
        for i = 1, n do t['k' .. i] = base + i end
        return t
      end
      local t = big(5000, 0)
      for i = 1, 3000 do t[-i] = i; t[i + 0.5] = -i end
      t[true] = 'yes'; t[false] = {1, 2}; t[1/0] = 'inf'; t[-1/0] = 'ninf'
      t.nested = big(3000, 10)
      t.list = {big(2500, 20), big(10, 30), 7}
      t.deep = {a = {b = big(4097, 40)}}
      t.piece = big(2048, 50)
      t.over = big(2049, 60)
      """

      defp big(n, base), do: Map.new(1..n, &{"k#{&1}", base + &1})

      defp big_map do
        big(5000, 0)
        |> Map.merge(Map.new(1..3000, &{-&1, &1}))
        |> Map.merge(Map.new(1..3000, &{&1 + 0.5, -&1}))
        |> Map.merge(%{
          true => "yes",
          false => [1, 2],
          :infinity => "inf",
          :neg_infinity => "ninf",
          "nested" => big(3000, 10),
          "list" => [big(2500, 20), big(10, 30), 7],
          "deep" => %{"a" => %{"b" => big(4097, 40)}},
          "piece" => big(2048, 50),
          "over" => big(2049, 60)
        })
      end

      @opts [max_instructions: 100_000_000]

      test "as results, alone, nested and repeated" do
        expected = big_map()

        assert {:ok, %{values: [^expected, [^expected], %{"x" => ^expected}, 3]}} =
                 lua_run(@big <> "return t, {t}, {x = t}, 3", @opts)
      end

      test "as a tool's arguments" do
        parent = self()
        echo = fn args -> send(parent, {:args, args}) && map_size(hd(args)) end
        expected = big_map()
        src = @big <> "return tools.echo(t, {t}, 2)"

        assert {:ok, %{value: n}} = lua_run(src, [tools: %{echo: echo}] ++ @opts)
        assert n == map_size(expected)
        assert_received {:args, [^expected, [^expected], 2]}
      end

      test "as an error value" do
        expected = big_map()

        assert {:error, %Error{kind: :runtime, value: ^expected}} =
                 lua_run(@big <> "error(t)", @opts)

        assert {:error, %Error{value: [^expected]}} = lua_run(@big <> "error({t})", @opts)
      end

      test "as a session call's results" do
        {:ok, s} = LuaSandbox.Session.start_link(LuaSandbox.Isolation.opts(@isolation, []))
        assert {:ok, _} = LuaSandbox.Session.run(s, @big <> "T = t", @opts)
        expected = big_map()
        assert {:ok, %{values: [^expected, 1]}} = LuaSandbox.Session.run(s, "return T, 1", @opts)
        LuaSandbox.Session.stop(s)
      end

      test "values shaped like the internal tags round-trip exactly" do
        tagged = [
          {:"$lua_sandbox_pieces", [%{"a" => 1}, %{"b" => 2}]},
          {:"$lua_sandbox_walk", %{"a" => {:"$lua_sandbox_term", 1}}},
          {:"$lua_sandbox_walk", [1, 2]},
          {:"$lua_sandbox_term", {:"$lua_sandbox_pieces", []}},
          {:"$lua_sandbox_term", 5},
          %{"k" => {:"$lua_sandbox_pieces", [%{}]}},
          [{:"$lua_sandbox_walk", [{:"$lua_sandbox_term", 1}]}],
          {:"$lua_sandbox_pieces", :not_a_list, :three}
        ]

        # `b` is a map of pieces: the tables and values beside it are looked into
        # (LuaSandbox.Pieces), so a handle's term there must not be taken for a tag.
        b = "local b = {} for i = 1, 3000 do b[-i] = i end "
        big = Map.new(1..3000, &{-&1, &1})

        for term <- tagged do
          h = LuaSandbox.handle(term)
          g = [globals: %{h: h}] ++ @opts
          # alone, in small tables, beside and inside a table of pieces
          assert {:ok, %{values: [^term, [^term], %{"h" => ^term}]}} =
                   lua_run("return h, {h}, {h = h}", g)

          assert {:ok, %{values: [^term, [^term, ^big], %{"h" => ^term, "b" => ^big}, ^big]}} =
                   lua_run(b <> "return h, {h, b}, {h = h, b = b}, b", g)

          {:ok, %{value: map}} =
            lua_run(
              b <> "local t = {h = h, b = b} for i = 1, 5000 do t[i * 2] = {h} end return t",
              g
            )

          assert map_size(map) == 5002
          assert map["h"] == term and map[10_000] == [term] and map["b"] == big

          # as a tool's arguments, and in an error value
          parent = self()
          echo = fn args -> send(parent, {:args, args}) && 1 end
          src = b <> "return tools.echo(h, {h}, b)"
          assert {:ok, _} = lua_run(src, [tools: %{echo: echo}] ++ g)
          assert_received {:args, [^term, [^term], ^big]}
          assert {:error, %Error{value: [^term, ^big]}} = lua_run(b <> "error({h, b})", g)
        end
      end
    end

    describe "Lua to Elixir" do
      test "scalars and non-finite floats" do
        assert {:ok, %{values: [nil, true, 1, 1.5, "s"]}} =
                 lua_run("return nil, true, 1, 1.5, 's'")

        assert {:ok, %{values: [:nan, :infinity, :neg_infinity]}} =
                 lua_run("return 0/0, 1/0, -1/0")
      end

      test "strings are binaries with any bytes" do
        assert value("return '\\0\\255'") == <<0, 255>>
      end

      test "sequences 1..n are lists, everything else maps" do
        assert value("return {1, 2, 3}") == [1, 2, 3]
        assert value("return {}") == %{}
        assert value("return {[2] = 'b', [1] = 'a'}") == ["a", "b"]
        assert value("return {[1] = 'a', [3] = 'c'}") == %{1 => "a", 3 => "c"}
        assert value("return {[0] = 'z', 'a'}") == %{0 => "z", 1 => "a"}
        assert value("return {x = 1, 2}") == %{"x" => 1, 1 => 2}
        assert value("return {[1.5] = 1, [true] = 2}") == %{1.5 => 1, true => 2}
      end

      test "table and function keys are unsupported" do
        assert kind(lua_run("return {[{}] = 1}")) == :unsupported_value
        assert kind(lua_run("return {[print] = 1}")) == :unsupported_value
      end

      test "functions, coroutines and userdata are unsupported values" do
        assert kind(lua_run("return print")) == :unsupported_value
        assert kind(lua_run("return coroutine.create(print)")) == :unsupported_value
        assert kind(lua_run("return {f = function() end}")) == :unsupported_value
      end

      test "a table containing itself is a cycle with its path" do
        assert {:error, %Error{kind: :cycle, message: msg}} =
                 lua_run("local t = {a = {}} t.a.b = t return t")

        assert msg =~ "result[1].a.b"
      end

      test "a shared sub-table is copied twice, not a cycle" do
        assert value("local s = {1} return {s, s}") == [[1], [1]]
      end

      test "metamethods do not run while marshaling" do
        src = "return setmetatable({}, {__index = function() error('ran') end, __pairs = error})"
        assert value(src) == %{}
      end

      test "max_depth holds on the way out" do
        src = "local t = 1 for i = 1, 100 do t = {t} end return t"
        assert kind(lua_run(src)) == :depth_limit
        assert {:ok, _} = lua_run(src, max_depth: 101)
      end

      test "max_result_bytes counts string bytes and values" do
        assert kind(lua_run("return string.rep('x', 2000)", max_result_bytes: 1000)) ==
                 :size_limit

        assert {:ok, _} = lua_run("return string.rep('x', 900)", max_result_bytes: 1000)
      end

      test "a DAG of 2^40 paths is stopped by max_result_bytes before the term is built" do
        src = "local t = {} for i = 1, 40 do t = {t, t} end return t"
        {time, result} = :timer.tc(fn -> lua_run(src) end)
        assert kind(result) == :size_limit
        assert time < 5_000_000
      end

      test "many references to one big string count every time" do
        src =
          "local s = string.rep('x', 1000000) local t = {} for i = 1, 10000 do t[i] = s end return t"

        assert kind(lua_run(src)) == :size_limit
      end

      test "no atoms are created from Lua data" do
        before = :erlang.system_info(:atom_count)

        src =
          "local t = {} for i = 1, 1000 do t['k' .. i .. '_#{System.unique_integer([:positive])}'] = i end return t"

        assert {:ok, %{value: map}} = lua_run(src)
        assert map_size(map) == 1000
        # 1000 new keys; other tests running concurrently create atoms of their own (each
        # supervisor of workers_test a name, over a hundred in a run): far fewer than 1000
        assert :erlang.system_info(:atom_count) - before < 500
      end
    end
  end
end
