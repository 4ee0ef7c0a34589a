defmodule LuaSandbox.Runner do
  @moduledoc false
  # Drives one run in the calling process: start it in the NIF, answer its tool calls,
  # and turn the NIF's tuples into LuaSandbox.Result / LuaSandbox.Error.

  require Logger

  alias LuaSandbox.{Chunk, Error, Native, Options, Result}

  def run(source, opts) do
    native_source =
      case source do
        %Chunk{ref: ref} -> ref
        source when is_binary(source) -> source
      end

    tools = Map.new(opts[:tools], fn {k, f} -> {to_string(k), f} end)
    native_opts = Options.to_native(opts)

    first =
      if short?(source, opts),
        do: Native.run_try(native_source, native_opts),
        else: :retry

    case first do
      :retry -> Native.run_start(native_source, native_opts)
      answer -> answer
    end
    |> drive(tools, opts)
  end

  # Worth a first attempt on this (normal) scheduler: no tools (a tool call ends the attempt)
  # and little source to parse, since parsing is the one step of the attempt whose cost is
  # bounded by the source's size rather than by the attempt's instruction slice. The attempt
  # is thrown away unseen when the run needs more than its slice (see run.rs `run_try`).
  @short_source 4096
  defp short?(source, opts) do
    opts[:tools] == %{} and source_bytes(source) <= @short_source and
      Enum.reduce(opts[:modules], 0, fn {_, m}, acc -> acc + source_bytes(m) end) <=
        @short_source
  end

  defp source_bytes(%Chunk{}), do: 0
  defp source_bytes(source) when is_binary(source), do: byte_size(source)

  @doc false
  # Answers a native run's tool calls until it finishes; `tools` maps names to functions.
  def drive({:tool_call, run, name, args}, tools, opts) do
    reply = call_tool(Map.fetch!(tools, name), name, args)

    run
    |> Native.run_resume(reply)
    |> drive(tools, opts)
  end

  def drive({:ok, values, output, stats}, _tools, opts) do
    log_output(output, opts)
    value = List.first(values)
    {:ok, %Result{value: value, values: values, output: output, stats: stats}}
  end

  def drive({:error, {kind, message, line, traceback, value}, output, stats}, _tools, opts) do
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

  # A tool's answer, as the Lua side expects it: {:ok, value} is returned to the script,
  # {:error, message} becomes `nil, message`, {:raise, message} a Lua error.
  defp call_tool(fun, name, args) do
    case fun.(args) do
      {:ok, value} -> {:ok, value}
      {:error, reason} -> {:error, reason_text(reason)}
      :ok -> {:ok, nil}
      value -> {:ok, value}
    end
  rescue
    e -> {:raise, "tool '#{name}' failed: " <> Exception.message(e)}
  catch
    :exit, reason -> {:raise, "tool '#{name}' failed: exit #{inspect(reason)}"}
    :throw, value -> {:raise, "tool '#{name}' failed: throw #{inspect(value)}"}
  end

  defp reason_text(reason) when is_binary(reason), do: reason
  defp reason_text(reason) when is_atom(reason), do: Atom.to_string(reason)
  defp reason_text(reason), do: inspect(reason)

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
