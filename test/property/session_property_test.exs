defmodule LuaSandbox.SessionPropertyTest do
  # Rollback, as a property: a random sequence of session calls, some of which fail (script
  # errors, limits) after changing the state, ends in the same state as replaying only the
  # calls that succeeded in a fresh session.
  use ExUnit.Case, async: true

  import LuaSandbox.Generators, only: [check: 2, cases: 1]

  alias LuaSandbox.Session

  @moduletag :property
  @moduletag timeout: :infinity

  @setup "log = {} counts = {} function dump() local o = {} for i, v in ipairs(log) do o[i] = v end " <>
           "local ks = {} for k in pairs(counts) do ks[#ks + 1] = k end table.sort(ks) " <>
           "for _, k in ipairs(ks) do o[#o + 1] = k .. '=' .. counts[k] end return table.concat(o, ',') end"

  # One change to the state, in Lua.
  defp change({:push, w}), do: "log[#log + 1] = '#{w}'"
  defp change({:count, w}), do: "counts['#{w}'] = (counts['#{w}'] or 0) + 1"
  defp change({:drop, _}), do: "table.remove(log)"

  # How the call ends after making its changes.
  defp ending(:ok), do: "return #log"
  defp ending(:error), do: "error('failed on purpose')"
  defp ending(:budget), do: "while true do end"
  defp ending(:memory), do: "local t = {} for i = 1, 1e8 do t[i] = i end"
  defp ending(:pcall_error), do: "pcall(error, 'caught') return 0"

  defp call_gen do
    word = :proper_types.elements(["a", "b", "c"])
    op = :proper_types.tuple([:proper_types.elements([:push, :count, :drop]), word])

    :proper_types.tuple([
      :proper_types.non_empty(:proper_types.list(op)),
      :proper_types.elements([:ok, :ok, :error, :budget, :memory, :pcall_error])
    ])
  end

  defp source({ops, how}), do: Enum.map_join(ops, " ", &change/1) <> " " <> ending(how)

  defp session! do
    {:ok, s} = Session.start_link(max_memory: 4 * 1024 * 1024)
    {:ok, _} = Session.run(s, @setup)
    s
  end

  defp final(s) do
    {:ok, %{value: v}} = Session.call(s, "dump", [])
    Session.stop(s)
    v
  end

  test "a session with failed calls equals a replay of its successful calls" do
    prop =
      :proper.forall(:proper_types.list(call_gen()), fn calls ->
        s = session!()

        succeeded =
          Enum.filter(calls, fn call ->
            match?({:ok, _}, Session.run(s, source(call), max_instructions: 50_000))
          end)

        replay = session!()
        Enum.each(succeeded, fn call -> {:ok, _} = Session.run(replay, source(call)) end)
        final(s) == final(replay)
      end)

    assert check(prop, cases(2000) |> div(10) |> max(50)) == true
  end
end
