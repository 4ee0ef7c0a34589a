defmodule Mix.Tasks.LuaSandbox.Run do
  @shortdoc "Runs a Lua file in the sandbox"
  @moduledoc """
  Runs a Lua file through `LuaSandbox.run/2` and prints the value, the output and the stats,
  or the error with its kind and line.

      mix lua_sandbox.run FILE [--global name=value ...] [--call NAME]
                               [--max-instructions N] [--max-memory N] [--max-output N]
                               [--timeout MS]

  A `--global` value is parsed as an integer or float when it looks like one, `true`/`false`
  as booleans, anything else stays a string. With `--call NAME` the globals are also passed
  as one context table to the global function `NAME`. Exits with status 1 on an error.
  """
  use Mix.Task

  @switches [
    global: :keep,
    call: :string,
    max_instructions: :integer,
    max_memory: :integer,
    max_output: :integer,
    timeout: :integer
  ]

  @impl true
  def run(argv) do
    Mix.Task.run("app.start")
    {parsed, files, invalid} = OptionParser.parse(argv, strict: @switches)

    file =
      case {files, invalid} do
        {[file], []} -> file
        _ -> Mix.raise("usage: mix lua_sandbox.run FILE [--global name=value ...] [options]")
      end

    globals = parsed |> Keyword.get_values(:global) |> Map.new(&parse_global/1)

    opts =
      [globals: globals, chunk_name: Path.basename(file)] ++
        Keyword.take(parsed, [:max_instructions, :max_memory, :max_output, :timeout])

    opts =
      case parsed[:call] do
        nil -> opts
        name -> Keyword.put(opts, :call, {name, [globals]})
      end

    case LuaSandbox.run(File.read!(file), opts) do
      {:ok, result} ->
        Mix.shell().info("value:  #{inspect(result.value, pretty: true)}")
        Mix.shell().info("output:\n" <> indent(result.output))
        Mix.shell().info("stats:  #{inspect(result.stats)}")

      {:error, error} ->
        Mix.shell().error("error:  #{error.kind}#{line(error)}: #{error.message}")
        if error.output != "", do: Mix.shell().info("output:\n" <> indent(error.output))
        Mix.shell().info("stats:  #{inspect(error.stats)}")
        exit({:shutdown, 1})
    end
  end

  defp line(%{line: nil}), do: ""
  defp line(%{line: n}), do: " (line #{n})"

  defp indent(text),
    do: text |> String.split("\n", trim: true) |> Enum.map_join("\n", &("  " <> &1))

  defp parse_global(spec) do
    case String.split(spec, "=", parts: 2) do
      [name, value] -> {name, parse_value(value)}
      _ -> Mix.raise("--global expects name=value, got: #{spec}")
    end
  end

  defp parse_value("true"), do: true
  defp parse_value("false"), do: false

  defp parse_value(v) do
    case Integer.parse(v) do
      {i, ""} ->
        i

      _ ->
        case Float.parse(v) do
          {f, ""} -> f
          _ -> v
        end
    end
  end
end
