# Under both isolations (LuaSandbox.Isolation).
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.JsonTest, Macro.camelize("#{isolation}")) do
    # The sandbox's `json` library (native/lua_sandbox_core/csrc/sb_json.c).
    use ExUnit.Case, async: true
    @isolation isolation

    defp lua_run(source, opts),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    defp value!(src, opts \\ []) do
      {:ok, %{values: values}} = lua_run(src, opts)
      values
    end

    defp lua_error(src, opts \\ []) do
      {:error, %{kind: kind, message: message}} = lua_run(src, opts)
      {kind, message}
    end

    test "encode: scalars, arrays, objects, json.null, json.array, empty tables" do
      assert value!("return json.encode({1, 2, 'x'})") == [~S([1,2,"x"])]
      assert value!("return json.encode({a = {b = true}})") == [~S({"a":{"b":true}})]
      assert value!("return json.encode({})") == ["{}"]
      assert value!("return json.encode(json.array({}))") == ["[]"]
      assert value!("return json.encode({json.null, false})") == ["[null,false]"]

      assert value!("return json.encode(nil), json.encode('a\"b\\n\\1')") == [
               "null",
               ~S("a\"b\n\u0001")
             ]

      assert value!("return json.encode({[1] = 'a', [3] = 'c'})") in [
               [~S({"1":"a","3":"c"})],
               [~S({"3":"c","1":"a"})]
             ]
    end

    test "encode: integers stay integers, floats keep a fraction and round-trip" do
      assert value!(
               "return json.encode(3), json.encode(3.0), json.encode(0.1), json.encode(-0.0)"
             ) ==
               ["3", "3.0", "0.1", "-0.0"]

      assert value!("return json.encode(math.maxinteger), json.encode(math.mininteger)") ==
               ["9223372036854775807", "-9223372036854775808"]

      assert value!("local x = 1/3 return json.decode(json.encode(x)) == x") == [true]
    end

    test "decode: the mapping back, with null as json.null and arrays marked" do
      src = ~S"""
      local v = json.decode('{"a": [1, 2.5, "s\\u00e9", null, true], "b": {}, "c": []}')
      return v.a[1], math.type(v.a[1]), v.a[2], v.a[3], v.a[4] == json.null, v.a[5],
             json.encode(v.c), json.encode(v.b), #v.a
      """

      assert value!(src) == [1, "integer", 2.5, "sé", true, true, "[]", "{}", 5]
      # json.null comes out of the sandbox as nil
      assert value!(~S"return json.decode('[null, 1]')") == [[nil, 1]]
      assert value!(~S"return json.decode('\"\\ud83d\\ude00\"')") == ["😀"]
      assert value!(~S"return math.type(json.decode('12345678901234567890'))") == ["float"]
    end

    test "errors a script can act on" do
      assert {:runtime, "script:1: json.decode: expected a string key at line 2 column 3"} =
               lua_error(~S"return json.decode('{\n  x}')")

      assert {:runtime, "script:1: json.decode: trailing characters at line 1 column 3"} =
               lua_error(~S"return json.decode('1 2')")

      assert {:runtime, "script:1: json.encode: string is not valid UTF-8 (byte 2)"} =
               lua_error(~S"return json.encode('a\255')")

      assert {:runtime, "script:1: json.decode: invalid UTF-8 at line 1 column 2"} =
               lua_error(~S"return json.decode('\"\255\"')")

      assert {:runtime, "script:1: json.encode: NaN cannot be encoded"} =
               lua_error("return json.encode(0/0)")

      assert {:runtime, "script:1: json.encode: cannot encode a function"} =
               lua_error("return json.encode(print)")

      assert {:runtime, "script:1: json.encode: tables nested deeper than 64 (or a cycle)"} =
               lua_error("local t = {} t[1] = t return json.encode(t)")
    end

    test "bounded by max_depth, the budget and the memory limit" do
      deep = "string.rep('[', 50) .. string.rep(']', 50)"
      assert {:runtime, _} = lua_error("return json.decode(#{deep})", max_depth: 10)
      assert [_] = value!("return #json.encode(json.decode(#{deep}))", max_depth: 64)

      assert {:instruction_limit, _} =
               lua_error(
                 "local t = {} for i = 1, 1e4 do t[i] = i end while true do json.encode(t) end",
                 max_instructions: 2_000_000
               )

      assert {:instruction_limit, _} =
               lua_error(
                 "local s = '[' .. string.rep('1,', 1e5) .. '1]' while true do json.decode(s) end",
                 max_instructions: 2_000_000
               )

      assert {:memory_limit, _} =
               lua_error(
                 "local t = {} for i = 1, 1e5 do t[i] = string.rep('x', 30) end return json.encode(t)",
                 max_memory: 4_000_000
               )
    end

    test "round trip of generated data through encode and decode" do
      for seed <- 1..30 do
        :rand.seed(:exsss, {seed, seed, seed})
        term = gen(4)

        {:ok, %{value: back}} = lua_run("return json.decode(json.encode(v))", globals: %{v: term})

        assert back == normalize(term), "seed #{seed}: #{inspect(term)}"
      end
    end

    defp gen(0), do: Enum.random([1, -7, 2.5, "str", "é", true, false])

    defp gen(d) do
      case :rand.uniform(4) do
        1 -> for _ <- 1..:rand.uniform(4), do: gen(d - 1)
        2 -> Map.new(1..:rand.uniform(4), fn i -> {"k#{i}", gen(d - 1)} end)
        _ -> gen(0)
      end
    end

    defp normalize(term), do: term
  end
end
