defmodule LuaSandbox.Runner do
  @moduledoc false
  # Drives one run in the calling process (the Elixir half of native/.../src/run.rs): start it
  # in the NIF, answer its tool calls, and turn the NIF's tuples into LuaSandbox.Result /
  # LuaSandbox.Error. Expects options already normalized by LuaSandbox.Options.validate!/1.

  require Logger

  alias LuaSandbox.{Chunk, Encoding, Error, Native, Options, Result, Tools}

  def run(source, opts) do
    case check_call(opts[:call]) do
      :ok -> start(source, opts)
      {:error, _} = error -> error
    end
  end

  defp start(source, opts) do
    native_source =
      case source do
        %Chunk{ref: ref} -> ref
        source when is_binary(source) -> source
      end

    opts =
      opts
      |> Keyword.update!(:globals, &Encoding.encode_pairs/1)
      |> Keyword.update!(:call, fn
        nil -> nil
        {name, args} -> {name, Enum.map(args, &Encoding.encode/1)}
      end)

    native_source
    |> Native.run_start(Options.to_native(opts))
    |> drive(opts[:tools], opts)
  end

  defp check_call({_name, args}) do
    max = Options.max_call_args()

    if length(args) > max do
      {:error,
       %Error{
         kind: :invalid_input,
         message: "call: has #{length(args)} arguments, more than the limit of #{max}",
         stats: Error.empty_stats()
       }}
    else
      :ok
    end
  end

  defp check_call(nil), do: :ok

  defp drive({:tool_call, run, name, args}, tools, opts) do
    reply = Tools.call(name, Map.fetch!(tools, name), args)

    run
    |> Native.run_resume(reply)
    |> drive(tools, opts)
  end

  defp drive({:ok, values, output, stats}, _tools, opts) do
    log_output(output, opts)
    value = List.first(values)
    {:ok, %Result{value: value, values: values, output: output, stats: stats}}
  end

  defp drive({:error, {kind, message, line, traceback, value}, output, stats}, _tools, opts) do
    log_output(output, opts)

    {:error,
     %Error{
       kind: kind,
       message: message,
       line: line,
       traceback: traceback,
       value: value,
       output: output,
       stats: stats
     }}
  end

  defp log_output("", _opts), do: :ok

  defp log_output(output, opts) do
    if opts[:print] == :log do
      output
      |> String.split("\n")
      |> Enum.drop(-1)
      |> Enum.each(&Logger.info(&1))

      # a last line without its newline
      case String.split(output, "\n") |> List.last() do
        "" -> :ok
        rest -> Logger.info(rest)
      end
    end

    :ok
  end
end
