defmodule LuaSandbox.Pieces do
  @moduledoc false
  # The Elixir half of a result built in pieces (native/lua_sandbox_nif/src/term.rs
  # `map_checked`, marshal/to_term.rs). The NIF makes a map of more than 2 048 keys as maps of
  # 2 048 pairs each, with a budget check between two (one `enif_make_map_from_arrays` of
  # 2·10^5 pairs was 30 ms that no kill could stop, issue 16), and hands them over as
  # `{:"$lua_sandbox_pieces", [piece, ...]}`; here, in the caller, they are merged with
  # `:maps.merge/2`, which yields like any BEAM code, so a kill stops it at once.
  #
  # So that the pieces are found without walking the whole result (host-side work is bounded
  # by what is tagged, not by the result's size), the NIF tags every table that holds a tagged
  # term below it as `{:"$lua_sandbox_walk", list_or_map}`, and a read's values as
  # `{:"$lua_sandbox_walk", values}`: only those are looked into. A Lua table becomes a list or
  # a map, never a tuple, so a tuple can only be a handle's term, which is never looked into,
  # except one shaped like a tag in a value's place: the NIF escapes it as
  # `{:"$lua_sandbox_term", term}`, given back here as it was. Every Lua value the NIF hands
  # over goes through here (LuaSandbox.Runner: results, tool calls' arguments, error values,
  # session calls' alike). A worker's answers (`isolation: :process`) are never in pieces:
  # the worker writes the external term format, which `:erlang.binary_to_term/2` decodes in
  # the caller (yielding too), and its handles' terms come back untouched
  # (LuaSandbox.Worker.Handles), so they do not come here.
  #
  # The pieces' keys are distinct: Lua's keys are distinct values, and no two become the same
  # term (float keys with an integer value are integers in Lua, -0.0 included; NaN is never a
  # key; `:infinity` and friends are atoms, strings binaries).

  @pieces :"$lua_sandbox_pieces"
  @walk :"$lua_sandbox_walk"
  @term :"$lua_sandbox_term"

  @doc "A NIF answer (`{:ok, values, output, stats}`, `{:error, failure, output, stats}`) merged."
  def answer({:ok, values, output, stats}), do: {:ok, values(values), output, stats}

  def answer({:error, {kind, message, line, traceback, value}, output, stats}),
    do: {:error, {kind, message, line, traceback, value(value)}, output, stats}

  def answer(other), do: other

  @doc "A read's values (a run's results, a tool call's arguments) merged."
  def values({@walk, values}) when is_list(values), do: :lists.map(&value/1, values)
  def values(values) when is_list(values), do: values

  @doc "One value merged."
  def value({@walk, list}) when is_list(list), do: :lists.map(&value/1, list)
  def value({@walk, map}) when is_map(map), do: :maps.map(fn _key, v -> value(v) end, map)
  def value({@pieces, pieces}) when is_list(pieces), do: :lists.map(&value/1, pieces) |> merge()
  def value({@term, term}), do: term
  def value(other), do: other

  # Merged pairwise, a balanced tree of merges: each pair of keys is copied O(log pieces)
  # times, where merging each piece into one growing map would copy it O(pieces) times.
  defp merge([map]), do: map
  defp merge(maps), do: maps |> pairs() |> merge()

  defp pairs([a, b | rest]), do: [:maps.merge(a, b) | pairs(rest)]
  defp pairs(rest), do: rest
end
