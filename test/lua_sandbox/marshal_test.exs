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
