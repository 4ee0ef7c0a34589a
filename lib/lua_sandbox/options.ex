defmodule LuaSandbox.Options do
  @moduledoc false
  # Validation and defaults for LuaSandbox.run/2, and the plain map the NIF decodes.

  @mib 1024 * 1024

  @defaults [
    globals: %{},
    call: nil,
    max_instructions: 100_000_000,
    max_memory: 64 * @mib,
    max_depth: 64,
    max_result_bytes: 16 * @mib,
    max_output: @mib,
    max_source: @mib,
    print: :capture,
    chunk_name: "script",
    tools: %{},
    modules: %{},
    max_tool_calls: 1000,
    timeout: :infinity,
    supervisor: LuaSandbox.TaskSupervisor,
    node: nil
  ]

  def defaults, do: @defaults

  @doc "Validates `opts`; raises ArgumentError on unknown options or bad values."
  def validate!(opts) when is_list(opts) do
    opts = Keyword.validate!(opts, @defaults)
    Enum.each(opts, &check!/1)
    opts
  end

  def validate!(other),
    do: raise(ArgumentError, "options must be a keyword list, got: #{inspect(other)}")

  defp check!({:max_depth, n}) when is_integer(n) and n > 10_000 do
    # Marshaling recurses once per level on a 16 MiB native stack.
    raise ArgumentError, "max_depth must be at most 10000, got: #{n}"
  end

  defp check!({key, n})
       when key in [
              :max_instructions,
              :max_memory,
              :max_depth,
              :max_result_bytes,
              :max_output,
              :max_source,
              :max_tool_calls
            ] do
    unless is_integer(n) and n >= 0 and n < 0x7FFFFFFFFFFFFFFF do
      raise ArgumentError, "#{key} must be a non-negative integer, got: #{inspect(n)}"
    end
  end

  defp check!({:globals, g}) do
    unless is_map(g) and Enum.all?(Map.keys(g), &name?/1) do
      raise ArgumentError, "globals must be a map with string or atom keys, got: #{inspect(g)}"
    end
  end

  defp check!({:call, nil}), do: :ok

  defp check!({:call, {name, args}}) when is_list(args) do
    unless name?(name), do: raise(ArgumentError, "call name must be a string or atom")
  end

  defp check!({:call, other}),
    do:
      raise(
        ArgumentError,
        "call must be {name, args} with a list of args, got: #{inspect(other)}"
      )

  defp check!({:print, p}) when p in [:capture, :log, :discard], do: :ok
  defp check!({:print, {:send, pid}}) when is_pid(pid), do: :ok
  defp check!({:print, {:send, pid, _tag}}) when is_pid(pid), do: :ok

  defp check!({:print, p}),
    do:
      raise(
        ArgumentError,
        "print must be :capture, {:send, pid}, {:send, pid, tag}, :log or :discard, got: " <>
          inspect(p)
      )

  defp check!({:chunk_name, name}) do
    unless is_binary(name) and String.valid?(name) and name != "" do
      raise ArgumentError, "chunk_name must be a non-empty string, got: #{inspect(name)}"
    end
  end

  defp check!({:tools, tools}) do
    valid = is_map(tools) and Enum.all?(tools, fn {k, f} -> name?(k) and is_function(f, 1) end)

    unless valid,
      do: raise(ArgumentError, "tools must be a map of name => fun/1, got: #{inspect(tools)}")
  end

  defp check!({:modules, mods}) do
    valid =
      is_map(mods) and
        Enum.all?(mods, fn {k, m} ->
          name?(k) and (is_binary(m) or is_struct(m, LuaSandbox.Chunk))
        end)

    unless valid do
      raise ArgumentError, "modules must be a map of name => source | %LuaSandbox.Chunk{}"
    end
  end

  defp check!({:timeout, t}) do
    unless t == :infinity or (is_integer(t) and t >= 0) do
      raise ArgumentError,
            "timeout must be a non-negative integer or :infinity, got: #{inspect(t)}"
    end
  end

  defp check!({:supervisor, _}), do: :ok

  defp check!({:node, n}) do
    unless is_nil(n) or is_atom(n), do: raise(ArgumentError, "node must be a node name")
  end

  defp name?(n),
    do: (is_binary(n) and n != "") or (is_atom(n) and not is_nil(n) and not is_boolean(n))

  @doc "The map `LuaSandbox.Native.run_start/2` decodes."
  def to_native(opts) do
    {print, pid, tag} =
      case opts[:print] do
        {:send, pid} -> {:send, pid, nil}
        # A term cannot outlive the NIF call that received it; a run spans several.
        {:send, pid, tag} -> {:send, pid, :erlang.term_to_binary(tag)}
        mode -> {mode, nil, nil}
      end

    %{
      max_instructions: opts[:max_instructions],
      max_memory: opts[:max_memory],
      max_depth: opts[:max_depth],
      max_result_bytes: opts[:max_result_bytes],
      max_output: opts[:max_output],
      max_source: opts[:max_source],
      max_tool_calls: opts[:max_tool_calls],
      print: print,
      print_pid: pid,
      print_tag: tag,
      timeout: native_timeout(opts[:deadline], opts[:timeout]),
      chunk_name: opts[:chunk_name],
      globals: Enum.map(opts[:globals], fn {k, v} -> {to_string(k), v} end),
      call: native_call(opts[:call]),
      tools: opts[:tools] |> Map.keys() |> Enum.map(&to_string/1),
      modules: Enum.map(opts[:modules], fn {k, m} -> {to_string(k), module_source(m)} end)
    }
  end

  # Milliseconds left for the run: from the caller's deadline (set by LuaSandbox.Supervisor,
  # internal), else the whole timeout.
  defp native_timeout(deadline, _) when is_integer(deadline),
    do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp native_timeout(_, :infinity), do: nil
  defp native_timeout(_, timeout), do: timeout

  defp native_call(nil), do: nil
  defp native_call({name, args}), do: {to_string(name), args}

  defp module_source(%LuaSandbox.Chunk{ref: ref}), do: ref
  defp module_source(source) when is_binary(source), do: source
end
