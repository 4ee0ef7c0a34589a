defmodule LuaSandbox.HeapEntryTest do
  # Every path by which host bytes enter a run's Lua heap counts against max_memory: a value
  # larger than the limit is :memory_limit on each of them, and the same path with a small value
  # runs (so the limit, not something else, refused the big one).
  use ExUnit.Case, async: true

  alias LuaSandbox.{Error, Session}

  @limit 2_000_000
  @big 4_000_000

  defp tool(fun), do: [tools: %{t: fun}]

  # name => fn payload -> result of a run that hands `payload` (a binary) to the heap
  defp entries do
    %{
      globals: fn p -> LuaSandbox.run("return #g", [globals: %{g: p}] ++ opts()) end,
      call_args: fn p ->
        LuaSandbox.run("function f(s) return #s end", [call: {"f", [p]}] ++ opts())
      end,
      handles: fn p ->
        hs = List.duplicate(LuaSandbox.handle(:x), div(byte_size(p), 64))
        LuaSandbox.run("return #h", [globals: %{h: hs}] ++ opts())
      end,
      modules: fn p ->
        LuaSandbox.run(
          "return #require('m')",
          [modules: %{m: "return [[" <> p <> "]]"}, max_source: 2 * @big] ++ opts()
        )
      end,
      tool_ok: fn p ->
        LuaSandbox.run("return #tools.t()", tool(fn _ -> {:ok, p} end) ++ opts())
      end,
      tool_error: fn p ->
        LuaSandbox.run(
          "local v, e = tools.t() return #e",
          tool(fn _ -> {:error, p} end) ++ opts()
        )
      end,
      tool_raise: fn p ->
        LuaSandbox.run(
          "local ok, e = pcall(tools.t) return #e",
          tool(fn _ -> raise p end) ++ opts()
        )
      end,
      session_tool_raise: fn p ->
        {:ok, s} = Session.start_link(tool(fn _ -> raise p end) ++ opts())
        result = Session.run(s, "local ok, e = pcall(tools.t) return #e")
        Session.stop(s)
        result
      end,
      session_call_args: fn p ->
        {:ok, s} = Session.start_link(opts())
        {:ok, _} = Session.run(s, "function f(s) return #s end")
        result = Session.call(s, "f", [p])
        Session.stop(s)
        result
      end
    }
  end

  defp opts, do: [max_memory: @limit]

  @entry_names [
    :globals,
    :call_args,
    :handles,
    :modules,
    :tool_ok,
    :tool_error,
    :tool_raise,
    :session_tool_raise,
    :session_call_args
  ]

  for name <- @entry_names do
    test "#{name}: more bytes than max_memory is :memory_limit, a few bytes run" do
      entry = Map.fetch!(entries(), unquote(name))
      assert {:ok, _} = entry.(:binary.copy("a", 1_000))

      assert {:error, %Error{kind: :memory_limit}} = entry.(:binary.copy("a", @big)),
             "#{unquote(name)} let #{@big} bytes into a #{@limit}-byte heap"
    end
  end

  test "every entry has a test" do
    assert entries() |> Map.keys() |> Enum.sort() == Enum.sort(@entry_names)
  end
end
