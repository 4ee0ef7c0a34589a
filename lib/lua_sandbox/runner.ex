defmodule LuaSandbox.Runner do
  @moduledoc false
  # Drives one run in the calling process: start it in the NIF, answer its tool calls,
  # and turn the NIF's tuples into LuaSandbox.Result / LuaSandbox.Error.

  require Logger

  alias LuaSandbox.{Chunk, Error, Native, Options, Result}

  def run(source, opts) do
    {native_source, opts} =
      case source do
        # A chunk runs under its own name (in messages and the :log metadata).
        %Chunk{ref: ref, name: name} -> {ref, Keyword.put(opts, :chunk_name, name)}
        source when is_binary(source) -> {source, opts}
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
    message = if kind == :timeout, do: timeout_message(opts[:timeout]), else: message

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

  @doc false
  def timeout_message(ms), do: "run exceeded its timeout of #{ms} ms"

  # print: :log logs the output in pieces of at most @log_bytes, cut after a newline when
  # there is one: one Logger call per piece, not per line (a MiB of newlines was 10^6 calls).
  @log_bytes 4096

  defp log_output("", _opts), do: :ok

  defp log_output(output, opts) do
    if opts[:print] == :log do
      metadata = [lua_chunk: opts[:chunk_name], lua_run: System.unique_integer([:positive])]
      output |> log_pieces([]) |> Enum.each(&Logger.info(&1, metadata))
    end

    :ok
  end

  @doc false
  def log_pieces("", acc), do: Enum.reverse(acc)

  def log_pieces(output, acc) when byte_size(output) <= @log_bytes,
    do: log_pieces("", [String.trim_trailing(output, "\n") | acc])

  def log_pieces(output, acc) do
    window = binary_part(output, 0, @log_bytes)

    cut =
      case :binary.matches(window, "\n") do
        [] -> char_boundary(output, @log_bytes)
        matches -> matches |> List.last() |> elem(0) |> Kernel.+(1)
      end

    <<piece::binary-size(cut), rest::binary>> = output
    log_pieces(rest, [String.trim_trailing(piece, "\n") | acc])
  end

  # A long line is cut before a UTF-8 continuation byte, not inside a character.
  defp char_boundary(bin, cut) do
    back =
      Enum.find(0..3, 0, fn k ->
        b = :binary.at(bin, cut - k)
        b < 0x80 or b >= 0xC0
      end)

    if back < cut, do: cut - back, else: cut
  end
end
