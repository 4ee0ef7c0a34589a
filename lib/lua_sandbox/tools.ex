defmodule LuaSandbox.Tools do
  @moduledoc false
  # Calling a tool for a script, and describing a tool set for a prompt. The answer goes back
  # to the NIF (run.rs `reply_to_lua`): {:ok, value} is returned to the script, {:error, text}
  # becomes Lua's `nil, text`, {:raise, text} a Lua error raised at the script's calling line
  # (prelude.lua `finish_tool`), so every message here is written for the script's author — often
  # a model — and names no Elixir internals.

  alias LuaSandbox.Encoding

  @max_shown 120

  # A result that cannot fit the run's `bound` (LuaSandbox.Encoding) is answered with the
  # limit's kind (`:memory_limit`, ...), which ends the run as that limit would in Lua.
  def call(name, {fun, spec}, args, bound) do
    case check_args(name, spec.args, args) do
      :ok -> apply_tool(name, fun, args, bound)
      {:error, message} -> {:raise, message}
    end
  end

  defp apply_tool(name, fun, args, bound) do
    case fun.(args) do
      {:ok, value} -> result(value, bound)
      {:error, reason} -> {:error, reason_text(reason)}
      :ok -> {:ok, nil}
      value -> result(value, bound)
    end
  rescue
    e in FunctionClauseError ->
      if raised_by?(fun, __STACKTRACE__) do
        {:raise, "tool '#{name}' was called with bad arguments (#{lua_args(args)})"}
      else
        {:raise, "tool '#{name}' failed: " <> Exception.message(e)}
      end

    e ->
      {:raise, "tool '#{name}' failed: " <> Exception.message(e)}
  catch
    :exit, reason -> {:raise, "tool '#{name}' failed: exit #{inspect(reason)}"}
    :throw, value -> {:raise, "tool '#{name}' failed: throw #{inspect(value)}"}
  end

  defp result(value, bound) do
    case Encoding.encode(value, bound) do
      {:ok, value} -> {:ok, value}
      {:error, kind} -> kind
    end
  end

  # The clause error comes from the tool function itself (its clauses do not match what the
  # script passed), not from code deeper inside it.
  defp raised_by?(fun, [{mod, fname, _, _} | _]) do
    info = Function.info(fun)
    info[:module] == mod and info[:name] == fname
  end

  defp raised_by?(_fun, _stack), do: false

  defp reason_text(reason) when is_binary(reason), do: reason
  defp reason_text(reason) when is_atom(reason), do: Atom.to_string(reason)
  defp reason_text(reason), do: inspect(reason)

  # --- specs ---

  defp check_args(_name, nil, _args), do: :ok

  defp check_args(name, spec, args) do
    max = length(spec)

    if length(args) > max and Enum.any?(Enum.drop(args, max), &(not is_nil(&1))) do
      {:error,
       "tool '#{name}' takes at most #{max} argument#{if max == 1, do: "", else: "s"}, " <>
         "got #{length(args)}; usage: #{usage(name, spec)}"}
    else
      spec
      |> Enum.with_index(1)
      |> Enum.find_value(:ok, fn {{arg, type, need}, i} ->
        value = Enum.at(args, i - 1)

        cond do
          is_nil(value) and need == :required ->
            {:error,
             "tool '#{name}' is missing argument #{i} (#{arg}: #{type}); usage: #{usage(name, spec)}"}

          is_nil(value) or type?(type, value) ->
            nil

          true ->
            {:error,
             "tool '#{name}': argument #{i} (#{arg}) must be #{article(type)}, got " <>
               "#{lua_type(value)} #{lua_value(value)}; usage: #{usage(name, spec)}"}
        end
      end)
    end
  end

  defp type?(:any, _), do: true
  defp type?(:string, v), do: is_binary(v)
  defp type?(:integer, v), do: is_integer(v)
  defp type?(:number, v), do: is_number(v) or v in [:nan, :infinity, :neg_infinity]
  defp type?(:boolean, v), do: is_boolean(v)
  defp type?(:table, v), do: is_map(v) or is_list(v)
  defp type?(:list, v), do: is_list(v) or v == %{}
  defp type?(:map, v), do: is_map(v) or is_list(v)

  defp article(:integer), do: "an integer"
  defp article(:any), do: "a value"
  defp article(type), do: "a #{type}"

  # --- Lua-style rendering of what a script passed ---

  defp lua_args(args), do: args |> Enum.map_join(", ", &lua_value/1) |> shorten()

  defp lua_type(v) when is_binary(v), do: "string"
  defp lua_type(v) when is_integer(v), do: "integer"
  defp lua_type(v) when is_number(v) or v in [:nan, :infinity, :neg_infinity], do: "number"
  defp lua_type(v) when is_boolean(v), do: "boolean"
  defp lua_type(nil), do: "nil"
  defp lua_type(_), do: "table"

  defp lua_value(v) when is_binary(v), do: inspect(v, printable_limit: @max_shown)
  defp lua_value(nil), do: "nil"
  defp lua_value(v) when is_boolean(v) or is_number(v), do: to_string(v)
  defp lua_value(:nan), do: "nan"
  defp lua_value(:infinity), do: "inf"
  defp lua_value(:neg_infinity), do: "-inf"

  defp lua_value(v) when is_list(v),
    do: "{" <> (v |> Enum.take(10) |> Enum.map_join(", ", &lua_value/1)) <> more(v) <> "}"

  defp lua_value(v) when is_map(v) do
    fields =
      v
      |> Enum.take(10)
      |> Enum.map_join(", ", fn
        {k, val} when is_binary(k) -> "#{k} = #{lua_value(val)}"
        {k, val} -> "[#{lua_value(k)}] = #{lua_value(val)}"
      end)

    "{" <> fields <> more(v) <> "}"
  end

  defp lua_value(v), do: inspect(v)

  defp more(v), do: if(Enum.count(v) > 10, do: ", ...", else: "")

  defp shorten(text) do
    if String.length(text) > @max_shown,
      do: String.slice(text, 0, @max_shown) <> "...",
      else: text
  end

  # --- prompt text ---

  defp usage(name, spec) do
    params =
      Enum.map_join(spec, ", ", fn
        {arg, type, :required} -> "#{arg}: #{type}"
        {arg, type, :optional} -> "#{arg}?: #{type}"
      end)

    "tools.#{name}(#{params})"
  end

  @doc "Prompt text for a normalized tool map (see `LuaSandbox.describe_tools/1`)."
  def describe(tools) do
    tools
    |> Enum.sort_by(&elem(&1, 0))
    |> Enum.map_join("\n", fn {name, {_fun, spec}} ->
      signature = if spec.args, do: usage(name, spec.args), else: "tools.#{name}(...)"
      if spec.doc, do: "#{signature} -- #{spec.doc}", else: signature
    end)
  end
end
