defmodule LuaSandbox.ToolsPropertyTest do
  use ExUnit.Case, async: true

  import LuaSandbox.Generators, only: [check: 2, cases: 1]

  @moduletag :property
  @moduletag timeout: :infinity

  # Each tool is deterministic, so what Lua sees can be computed here.
  @tools %{
    "add" => &__MODULE__.add/1,
    "concat" => &__MODULE__.concat/1,
    "fail" => &__MODULE__.fail/1,
    "wrap" => &__MODULE__.wrap/1
  }

  def add([a, b]), do: a + b
  def concat(parts), do: Enum.join(parts, "-")
  def fail([msg]), do: {:error, msg}
  def wrap([x]), do: %{"v" => x}

  defp expected({"add", [a, b]}), do: a + b
  defp expected({"concat", parts}), do: Enum.join(parts, "-")
  defp expected({"fail", [msg]}), do: msg
  defp expected({"wrap", [x]}), do: x

  # How a call's result is read back in Lua, per tool.
  defp lua_call({"add", [a, b]}), do: "tools.add(#{a}, #{b})"
  defp lua_call({"concat", parts}), do: "tools.concat(#{Enum.map_join(parts, ", ", &inspect/1)})"
  defp lua_call({"fail", [msg]}), do: "select(2, tools.fail(#{inspect(msg)}))"
  defp lua_call({"wrap", [x]}), do: "tools.wrap(#{x}).v"

  # Where the call happens: plainly, inside pcall, or inside a (nested) coroutine.
  defp place(call, :plain), do: call
  defp place(call, :pcall), do: "select(2, pcall(function() return #{call} end))"
  defp place(call, :wrap), do: "coroutine.wrap(function() return #{call} end)()"

  defp place(call, :nested),
    do: "coroutine.wrap(function() return coroutine.wrap(function() return #{call} end)() end)()"

  defp op do
    word = :proper_types.elements(["a", "b", "xyz"])
    int = :proper_types.integer(-1000, 1000)

    :proper_types.tuple([
      :proper_types.oneof([
        :proper_types.tuple([:proper_types.exactly("add"), :proper_types.tuple([int, int])]),
        :proper_types.tuple([:proper_types.exactly("concat"), :proper_types.list(word)]),
        :proper_types.tuple([:proper_types.exactly("fail"), :proper_types.tuple([word])]),
        :proper_types.tuple([:proper_types.exactly("wrap"), :proper_types.tuple([int])])
      ]),
      :proper_types.elements([:plain, :pcall, :wrap, :nested])
    ])
  end

  test "random sequences of tool calls give Lua the tools' results" do
    prop =
      :proper.forall(:proper_types.list(op()), fn ops ->
        calls = Enum.map(ops, fn {{name, args}, where} -> {{name, as_list(args)}, where} end)

        body =
          calls
          |> Enum.with_index(1)
          |> Enum.map_join("\n", fn {{call, where}, i} ->
            "r[#{i}] = #{place(lua_call(call), where)}"
          end)

        src = "local r = {}\n#{body}\nreturn r, #r"

        case LuaSandbox.run(src, tools: @tools) do
          {:ok, %{values: [results, n], stats: %{tool_calls: count}}} ->
            want = Enum.map(calls, fn {call, _} -> expected(call) end)
            got = if n == 0, do: [], else: results
            got == want and count == length(calls)

          other ->
            IO.inspect(other, label: "unexpected")
            false
        end
      end)

    assert check(prop, cases(2000) |> div(2)) == true
  end

  defp as_list(args) when is_tuple(args), do: Tuple.to_list(args)
  defp as_list(args) when is_list(args), do: args
end
