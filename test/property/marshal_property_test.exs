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

  # Maps of more than 2 048 keys leave the NIF in pieces that LuaSandbox.Pieces merges, and
  # a handle's term shaped like one of its tags is escaped: whatever the sizes, the nesting
  # and the handles' terms, a value comes back as the marshaling rules say.
  test "maps of more than one piece round-trip, with handles shaped like the internal tags" do
    tags = [:"$lua_sandbox_pieces", :"$lua_sandbox_walk", :"$lua_sandbox_term", :other]

    handle_term =
      :proper_types.oneof([
        :proper_types.tuple([:proper_types.elements(tags), term()]),
        term()
      ])

    gen =
      :proper_types.tuple([
        :proper_types.integer(1, 3 * 2048 + 1),
        term(),
        handle_term,
        :proper_types.list(:proper_types.integer(1, 3 * 2048 + 1)),
        :proper_types.elements([:map, :in_list, :in_map, :list_of_maps])
      ])

    prop =
      :proper.forall(gen, fn {n, t, ht, holes, shape} ->
        h = LuaSandbox.handle(ht)
        holes = Enum.filter(holes, &(&1 <= n))
        filler = Map.new(1..n, &{"k#{&1}", &1})
        with_holes = fn m, v -> Enum.reduce(holes, m, &Map.put(&2, "k#{&1}", v)) end
        base = filler |> with_holes.(h) |> Map.put("t", t) |> Map.put(-1, h)

        expected_base =
          filler
          |> with_holes.(ht)
          |> Map.merge(if normalize(t) == nil, do: %{}, else: %{"t" => normalize(t)})
          |> Map.put(-1, ht)

        {v, expected} =
          case shape do
            :map -> {base, expected_base}
            :in_list -> {[base, h], [expected_base, ht]}
            :in_map -> {%{x: base}, %{"x" => expected_base}}
            :list_of_maps -> {[base, base], [expected_base, expected_base]}
          end

        opts = [globals: %{v: v, h: h}, max_depth: 1000, max_instructions: 100_000_000]

        case LuaSandbox.run("return v, h", opts) do
          {:ok, %{values: values}} -> values == [expected, ht]
          {:error, %{kind: :invalid_input}} -> collides?(t)
        end
      end)

    assert check(prop, cases(2000) |> div(20)) == true
  end

  defp lua_lit(b) when is_boolean(b), do: to_string(b)
  defp lua_lit(s) when is_binary(s), do: inspect(s)
  defp lua_lit(f) when is_float(f), do: Float.to_string(f)
  defp lua_lit(i) when is_integer(i), do: Integer.to_string(i)
end
