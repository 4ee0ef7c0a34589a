defmodule LuaSandbox.MarshalPropertyTest do
  use ExUnit.Case, async: true

  import LuaSandbox.Generators

  @moduletag :property
  @moduletag timeout: :infinity

  test "Elixir -> Lua -> Elixir round-trips supported terms by the marshaling rules" do
    prop =
      :proper.forall(term(), fn t ->
        case LuaSandbox.run("return v", globals: %{v: t}, max_depth: 1000) do
          {:ok, %{values: values}} ->
            expected = normalize(t)
            # a top-level nil is no return value at all
            values == if(expected == nil, do: [nil], else: [expected])

          {:error, %{kind: :invalid_input}} ->
            collides?(t)
        end
      end)

    assert check(prop, cases(2000) |> div(2)) == true
  end

  test "generated Lua table constructors come back as the rules say" do
    gen =
      :proper_types.list(
        :proper_types.tuple([
          :proper_types.oneof([
            :proper_types.integer(-2, 6),
            :proper_types.elements(["a", "b", "c"]),
            :proper_types.elements([true, false, 0.5, 2.0])
          ]),
          :proper_types.oneof([:proper_types.integer(-5, 5), :proper_types.elements(["x", "y"])])
        ])
      )

    prop =
      :proper.forall(gen, fn pairs ->
        fields = Enum.map_join(pairs, ", ", fn {k, v} -> "[#{lua_lit(k)}] = #{lua_lit(v)}" end)

        {:ok, %{value: value}} = LuaSandbox.run("return {#{fields}}")
        # later fields win in a Lua constructor, like Map.new/1
        value == constructor(pairs)
      end)

    assert check(prop, cases(2000) |> div(2)) == true
  end

  defp lua_lit(b) when is_boolean(b), do: to_string(b)
  defp lua_lit(s) when is_binary(s), do: inspect(s)
  defp lua_lit(f) when is_float(f), do: Float.to_string(f)
  defp lua_lit(i) when is_integer(i), do: Integer.to_string(i)
end
