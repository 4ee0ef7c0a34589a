defmodule LuaSandbox.Runner do
  @moduledoc false
  # Drives one run in the calling process (the Elixir half of native/.../src/run.rs): start it
  # in the NIF, answer its tool calls, and turn the NIF's tuples into LuaSandbox.Result /
  # LuaSandbox.Error. Expects options already normalized by LuaSandbox.Options.validate!/1.

  require Logger

  alias LuaSandbox.{Chunk, Encoding, Error, Native, Options, Pieces, Result, Tools, Worker}
  alias LuaSandbox.Supervisor.Workers

  def run(source, opts) do
    opts = with_deadline(opts)

    with :ok <- check_call(opts[:call]),
         {:ok, encoded} <- encode_opts(opts, Encoding.bound(opts)) do
      start(source, encoded, opts)
    end
  end

  defp start(source, encoded, opts) do
    {native_source, opts} =
      case source do
        # A chunk runs under its own name (in messages and the :log metadata).
        %Chunk{ref: ref, name: name} -> {ref, Keyword.put(opts, :chunk_name, name)}
        source when is_binary(source) -> {source, opts}
      end

    native_opts = Options.to_native(encoded)

    case Workers.whereis(opts[:supervisor]) do
      nil -> start_native(source, native_source, native_opts, opts)
      pool -> start_worker(pool, native_source, native_opts, opts)
    end
  end

  defp start_native(source, native_source, native_opts, opts) do
    first =
      if short?(source, opts),
        do: Native.run_try(native_source, native_opts),
        else: :retry

    case first do
      :retry -> Native.run_start(native_source, native_opts)
      answer -> answer
    end
    |> drive(opts[:tools], opts)
  end

  # isolation: :process: the run goes to a worker of the supervisor's pool, checked out for
  # this process (its death closes the worker's port, and the worker stops the run: see
  # LuaSandbox.Worker), and its tool calls come back here.
  defp start_worker(pool, native_source, native_opts, opts) do
    case Workers.checkout(pool) do
      {:ok, port} ->
        {answer, status} =
          try do
            port
            |> Worker.run(native_source, native_opts, opts[:deadline])
            |> drive(opts[:tools], opts)
          catch
            kind, reason ->
              Workers.checkin(pool, port, :broken)
              :erlang.raise(kind, reason, __STACKTRACE__)
          end

        Workers.checkin(pool, port, status)
        answer

      {:error, reason} ->
        {:error, Error.new(:overloaded, "no worker process: " <> reason)}
    end
  end

  @doc false
  # A run with `timeout:` has a deadline (monotonic ms) that bounds its tools too; the
  # supervisor sets it when it starts the task, so time waiting for a scheduler counts.
  def with_deadline(opts) do
    case {opts[:deadline], opts[:timeout]} do
      {nil, ms} when is_integer(ms) ->
        Keyword.put(opts, :deadline, System.monotonic_time(:millisecond) + ms)

      _ ->
        opts
    end
  end

  @doc false
  # The run's input encoded within its limits in the caller, before it crosses to another
  # process (a task, a node): a copy between processes expands shared subterms as a walk does,
  # so only input the run can take may cross. `{:ok, opts}` or `{:error, %Error{}}`.
  def encode_input(opts), do: encode_opts(opts, Encoding.bound(with_deadline(opts)))

  @doc false
  # Globals and call: arguments through LuaSandbox.Encoder within `bound` (tool results are
  # encoded where the tool answers, in LuaSandbox.Tools): the options with them encoded, or
  # the run's error.
  def encode_opts(opts, bound) do
    with {:ok, globals} <- encode(:encode_pairs, opts[:globals], "globals", bound, opts),
         {:ok, call} <- encode_call(opts[:call], bound, opts) do
      {:ok, opts |> Keyword.put(:globals, globals) |> Keyword.put(:call, call)}
    end
  end

  defp encode_call(nil, _bound, _opts), do: {:ok, nil}

  defp encode_call({name, args}, bound, opts) do
    with {:ok, args} <- encode(:encode_all, args, "call: arguments", bound, opts),
         do: {:ok, {name, args}}
  end

  defp encode(fun, terms, what, bound, opts) do
    case apply(Encoding, fun, [terms, bound]) do
      {:ok, _} = ok -> ok
      {:error, kind} -> {:error, Encoding.error(kind, what, bound, opts[:timeout])}
    end
  end

  defp check_call({_name, args}) do
    max = Options.max_call_args()

    if length(args) > max do
      {:error,
       Error.new(
         :invalid_input,
         "call: has #{length(args)} arguments, more than the limit of #{max}"
       )}
    else
      :ok
    end
  end

  defp check_call(nil), do: :ok

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
  # Answers a native run's tool calls until it finishes; `tools` is the normalized tools map
  # (LuaSandbox.Options: name => {fun, spec}). The NIF's Lua values are merged from their pieces
  # here (LuaSandbox.Pieces); a worker's never are in pieces.
  def drive({:tool_call, run, name, args}, tools, opts) do
    reply = call_tool(name, Map.fetch!(tools, name), Pieces.values(args), Encoding.bound(opts))

    run
    |> Native.run_resume(reply)
    |> drive(tools, opts)
  end

  # A worker's answer (LuaSandbox.Worker.run/4), with whether the worker can be reused.
  def drive({:worker, port, context, {:tool_call, name, args}}, tools, opts) do
    reply = call_tool(name, Map.fetch!(tools, name), args, Encoding.bound(opts))

    port
    |> Worker.reply(reply, context)
    |> drive(tools, opts)
  end

  def drive({:worker, _port, _context, {:ok, _, _, _} = answer}, _tools, opts),
    do: {finish(answer, opts), :ok}

  def drive({:worker, _port, _context, {:error, {_, _, _, _, _}, _, _} = answer}, _tools, opts),
    do: {finish(answer, opts), :ok}

  # The worker died (:worker_crashed), did not answer in time, or answered nonsense.
  def drive({:worker, _port, _context, {:broken, error}}, _tools, _opts),
    do: {{:error, error}, :broken}

  def drive({:ok, _, _, _} = answer, _tools, opts), do: answer |> Pieces.answer() |> finish(opts)

  def drive({:error, {_, _, _, _, _}, _, _} = answer, _tools, opts),
    do: answer |> Pieces.answer() |> finish(opts)

  @doc false
  # A final answer (the NIF's, merged, or a worker's) as `{:ok, %Result{}}` / `{:error, %Error{}}`.
  def finish({:ok, values, output, stats}, opts) do
    log_output(output, opts)
    value = List.first(values)
    {:ok, %Result{value: value, values: values, output: output, stats: stats}}
  end

  def finish({:error, {kind, message, line, traceback, value}, output, stats}, opts) do
    log_output(output, opts)
    message = if kind == :timeout, do: Error.timeout_message("run", opts[:timeout]), else: message
    {:error, Error.from_native({kind, message, line, traceback, value}, output, stats)}
  end

  # Without a deadline the tool runs here, in the process that runs the script. With one, it
  # runs in a process linked to this one (so it dies with it), and at the deadline it is
  # killed and the run resumed with `:timeout`, which the NIF turns into the run's end with
  # `:timeout`, keeping the output printed so far (run.rs `reply_to_lua`).
  defp call_tool(name, tool, args, {_, _, nil} = bound), do: Tools.call(name, tool, args, bound)

  defp call_tool(name, tool, args, {_, _, deadline} = bound) do
    parent = self()
    callers = [parent | Process.get(:"$callers", [])]
    families = LuaSandbox.Session.Family.held()

    pid =
      spawn_link(fn ->
        Process.put(:"$callers", callers)
        LuaSandbox.Session.Family.hold(families)
        send(parent, {self(), :tool_reply, Tools.call(name, tool, args, bound)})
      end)

    mref = Process.monitor(pid)
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^pid, :tool_reply, reply} ->
        Process.demonitor(mref, [:flush])
        reply
    after
      left ->
        Process.unlink(pid)
        Process.exit(pid, :kill)
        # Signals from one process arrive in order: after its :DOWN no reply can follow.
        receive do
          {:DOWN, ^mref, :process, ^pid, _} -> :ok
        end

        receive do
          {^pid, :tool_reply, _late} -> :ok
        after
          0 -> :ok
        end

        :timeout
    end
  end

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
