defmodule LuaSandbox.Options do
  @moduledoc false
  # The one list of run options: defaults, validation, the documentation table (rendered into
  # LuaSandbox's moduledoc and checked against the README by a test) and the plain map the NIF
  # decodes (RunOpts in native/lua_sandbox_nif/src/run.rs).

  @kib 1024
  @mib 1024 * 1024

  # A trivial run peaks at ~40 KiB of Lua heap (measured with tools, a module and a global);
  # below this a limit cannot mean anything useful, and 0 used to mean "unlimited".
  @min_memory 256 * @kib

  # Lua's stack holds at most LUAI_MAXSTACK = 1_000_000 slots; 200_000 arguments work (87 ms),
  # 900_000 overflow. A documented bound well inside that.
  @max_call_args 100_000

  @options [
    globals:
      {%{},
       "`%{name => term}` (or a keyword list) set as Lua globals before the chunk runs; " <>
         "values go through `LuaSandbox.Encoder`"},
    call:
      {nil,
       "`{name, args}`: after the chunk ran, call global function `name` with `args` " <>
         "(at most #{@max_call_args}); its return values are the result"},
    max_instructions:
      {100_000_000,
       "Lua VM instructions, plus work inside builtins and bytes parsed by `load`, " <>
         "before `:instruction_limit`"},
    max_memory: {64 * @mib, "Lua heap bytes before `:memory_limit` (at least #{@min_memory})"},
    max_depth: {64, "table nesting when marshaling, both directions (at most 10 000)"},
    max_result_bytes:
      {16 * @mib,
       "bytes of a result: every string byte plus 8 per value, shared sub-tables counted each time"},
    max_output: {@mib, "bytes of `print`/`io.write` output before `:output_limit`"},
    max_source: {@mib, "bytes of source, of each module, and of each chunk given to `load`"},
    print:
      {:capture,
       "`:capture`; `{:send, pid}` also streams `{:lua_print, chunk}` to `pid` while the run " <>
         "goes (coalesced: at most one message per 100 ms unless 4 KiB are pending), " <>
         "`{:send, pid, tag}` streams `{:lua_print, tag, chunk}`; `:log` also logs the output " <>
         "via Logger at `:info` when the run ends, in pieces of at most 4 KiB with metadata " <>
         "`lua_chunk` and `lua_run`; `:discard`"},
    chunk_name:
      {"script", "name used in messages: `script:3: attempt to ...` (no NUL or newline)"},
    tools:
      {%{},
       "`%{name => fun/1 | {fun/1, args: spec, doc: text}}` (or a keyword list), callable " <>
         "from Lua as `tools.name(...)`; see `describe_tools/1`"},
    modules:
      {%{},
       "`%{name => source | %LuaSandbox.Chunk{}}` (or a keyword list) loadable with `require(name)`"},
    max_tool_calls: {1000, "tool calls before `:tool_limit`"},
    timeout:
      {:infinity,
       "milliseconds; a deadline the run checks as it goes (`:timeout`, with the output and " <>
         "stats so far), tools included: a tool still running at the deadline is stopped; " <>
         "the run happens in a supervised task, killed 500 ms after the deadline as a backstop"},
    supervisor:
      {LuaSandbox.TaskSupervisor,
       "the `LuaSandbox.Supervisor` whose `max_concurrency` every run counts against; " <>
         "one that is not running is an `ArgumentError`"},
    queue_timeout:
      {5_000,
       "milliseconds a run waits in its supervisor's FIFO queue for a free slot before " <>
         "`:overloaded` (`0`: refused at once; `:infinity`); like Finch's `pool_timeout`. " <>
         "Never past the run's `timeout:`. `async_stream/2` defaults it to `:infinity`"},
    tenant:
      {nil,
       "any term naming who the run is for: counted per tenant in `LuaSandbox.metrics/1` and " <>
         "held to the supervisor's `quotas:` (see `LuaSandbox.Supervisor.start_link/1`)"},
    node:
      {nil,
       "run on another connected BEAM node, through its supervisor of the same name; `:any`: " <>
         "on a member of the cluster group of `supervisor:`, local or remote, the least loaded " <>
         "of two picked at random (see Clustering)"},
    max_remote_bytes:
      {4 * @mib,
       "bytes of a run's input (source and options, as sent) above which it is not sent to " <>
         "another node (`:invalid_input`); `node: :any` then picks a local member only"}
  ]

  @defaults Enum.map(@options, fn {k, {default, _}} -> {k, default} end)
  @default_map Map.new(@defaults)

  @limits [
    :max_instructions,
    :max_memory,
    :max_depth,
    :max_result_bytes,
    :max_output,
    :max_source,
    :max_tool_calls,
    :max_remote_bytes
  ]

  @tool_types [:string, :integer, :number, :boolean, :table, :list, :map, :any]

  def defaults, do: @defaults
  def min_memory, do: @min_memory
  def max_call_args, do: @max_call_args
  def tool_types, do: @tool_types

  @doc "The options table in Markdown, for the docs."
  def table(keys \\ Keyword.keys(@options)) do
    rows =
      Enum.map_join(keys, "\n", fn key ->
        {default, doc} = Keyword.fetch!(@options, key)
        "| `#{key}` | `#{default_text(default)}` | #{String.replace(doc, "|", "\\|")} |"
      end)

    "| option | default | meaning |\n| --- | --- | --- |\n" <> rows
  end

  defp default_text(n) when is_integer(n) and n >= @mib and rem(n, @mib) == 0,
    do: "#{n} (#{div(n, @mib)} MiB)"

  defp default_text(other), do: inspect(other)

  @doc """
  Validates `opts` and returns them normalized: every default present, `globals` and
  `modules` as lists of `{string_name, value}`, `tools` as a map of `string_name => {fun, spec}`.
  Raises `ArgumentError` on unknown options or bad values.
  """
  def validate!([]), do: normalized_defaults()

  def validate!(opts) when is_list(opts) do
    # By hand rather than Keyword.validate!/2: this runs before every run, and a run on a
    # fresh state costs only a few µs of its own.
    checked =
      Enum.map(opts, fn
        {key, value} when is_map_key(@default_map, key) -> {key, check!(key, value)}
        {key, _} when is_atom(key) -> unknown!(key)
        _ -> raise ArgumentError, "options must be a keyword list, got: #{inspect(opts)}"
      end)

    Keyword.merge(normalized_defaults(), checked)
  end

  def validate!(other),
    do: raise(ArgumentError, "options must be a keyword list, got: #{inspect(other)}")

  # The defaults in normalized form (names as lists/maps of strings), computed once.
  defp normalized_defaults do
    [
      globals: [],
      call: nil,
      max_instructions: @default_map.max_instructions,
      max_memory: @default_map.max_memory,
      max_depth: @default_map.max_depth,
      max_result_bytes: @default_map.max_result_bytes,
      max_output: @default_map.max_output,
      max_source: @default_map.max_source,
      print: :capture,
      chunk_name: "script",
      tools: %{},
      modules: [],
      max_tool_calls: @default_map.max_tool_calls,
      timeout: :infinity,
      supervisor: LuaSandbox.TaskSupervisor,
      queue_timeout: @default_map.queue_timeout,
      tenant: nil,
      node: nil,
      max_remote_bytes: @default_map.max_remote_bytes
    ]
  end

  defp unknown!(key) do
    raise ArgumentError,
          "unknown option #{inspect(key)}, the known options are: " <>
            inspect(Keyword.keys(@defaults))
  end

  @doc "Validates the options of `LuaSandbox.compile/2`."
  def validate_compile!(opts) when is_list(opts) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "options must be a keyword list, got: #{inspect(opts)}"
    end

    opts = Keyword.validate!(opts, Keyword.take(@defaults, [:chunk_name, :max_source]))
    Enum.map(opts, fn {k, v} -> {k, check!(k, v)} end)
  end

  def validate_compile!(other),
    do: raise(ArgumentError, "options must be a keyword list, got: #{inspect(other)}")

  defp check!(:max_depth, n) when is_integer(n) and n > 10_000 do
    # Marshaling recurses once per level on a 16 MiB native stack.
    raise ArgumentError, "max_depth must be at most 10000, got: #{n}"
  end

  defp check!(key, n) when key in @limits do
    unless is_integer(n) and n >= 0 and n < 0x7FFFFFFFFFFFFFFF do
      raise ArgumentError, "#{key} must be a non-negative integer, got: #{inspect(n)}"
    end

    if key == :max_memory and n < @min_memory do
      raise ArgumentError,
            "max_memory must be at least #{@min_memory} bytes (256 KiB), got: #{n}"
    end

    n
  end

  defp check!(:globals, g), do: names!(g, "globals", fn _ -> true end, "term")

  defp check!(:call, nil), do: nil

  defp check!(:call, {name, args}) when is_list(args) do
    name!(name, "call name")
    {name_string(name), args}
  end

  defp check!(:call, other),
    do:
      raise(
        ArgumentError,
        "call must be {name, args} with a list of args, got: #{inspect(other)}"
      )

  defp check!(:print, p) when p in [:capture, :log, :discard], do: p
  defp check!(:print, {:send, pid} = p) when is_pid(pid), do: p
  defp check!(:print, {:send, pid, _tag} = p) when is_pid(pid), do: p

  defp check!(:print, p),
    do:
      raise(
        ArgumentError,
        "print must be :capture, {:send, pid}, {:send, pid, tag}, :log or :discard, got: " <>
          inspect(p)
      )

  defp check!(:chunk_name, name) do
    unless is_binary(name) and String.valid?(name) and name != "" do
      raise ArgumentError, "chunk_name must be a non-empty string, got: #{inspect(name)}"
    end

    if String.contains?(name, ["\0", "\n", "\r"]) do
      raise ArgumentError, "chunk_name must not contain a NUL or a newline, got: #{inspect(name)}"
    end

    name
  end

  defp check!(:tools, tools) do
    tools
    |> names!("tools", &tool?/1, "fun/1 or {fun/1, args: spec, doc: text}")
    |> Map.new(fn {name, tool} -> {name, normalize_tool!(name, tool)} end)
  end

  defp check!(:modules, mods) do
    names!(
      mods,
      "modules",
      &(is_binary(&1) or LuaSandbox.Chunk.valid?(&1)),
      "Lua source or %LuaSandbox.Chunk{}"
    )
  end

  defp check!(key, t) when key in [:timeout, :queue_timeout] do
    unless t == :infinity or (is_integer(t) and t >= 0) do
      raise ArgumentError,
            "#{key} must be a non-negative integer or :infinity, got: #{inspect(t)}"
    end

    t
  end

  defp check!(:supervisor, s) do
    unless is_atom(s) and s not in [nil, true, false] do
      raise ArgumentError,
            "supervisor must be the name of a LuaSandbox.Supervisor, got: #{inspect(s)}"
    end

    s
  end

  defp check!(:tenant, t), do: t

  defp check!(:node, n) do
    unless is_nil(n) or is_atom(n), do: raise(ArgumentError, "node must be a node name")
    n
  end

  # A map or keyword list of names => values, as a list of {string_name, value}; two names
  # that become one Lua name are an error rather than a silent overwrite.
  defp names!(entries, what, value_ok?, expected) do
    pairs =
      cond do
        is_map(entries) and not is_struct(entries) ->
          Map.to_list(entries)

        is_list(entries) and Enum.all?(entries, &match?({_, _}, &1)) ->
          entries

        true ->
          raise ArgumentError, "#{what} must be a map or a keyword list, got: #{inspect(entries)}"
      end

    normalized =
      Enum.map(pairs, fn {name, value} ->
        name!(name, "#{what} name")

        unless value_ok?.(value) do
          raise ArgumentError,
                "#{what}: #{inspect(name)} must be #{expected}, got: #{inspect(value)}"
        end

        {name_string(name), value}
      end)

    dups = normalized |> Enum.frequencies_by(&elem(&1, 0)) |> Enum.filter(&(elem(&1, 1) > 1))

    if dups != [] do
      raise ArgumentError,
            "#{what}: #{inspect(dups |> hd() |> elem(0))} is given more than once"
    end

    normalized
  end

  defp name!(name, what) do
    valid =
      (is_binary(name) and name != "" and String.valid?(name)) or
        (is_atom(name) and name not in [nil, true, false])

    unless valid do
      raise ArgumentError,
            "#{what} must be a non-empty UTF-8 string or an atom, got: #{inspect(name)}"
    end
  end

  defp name_string(name) when is_binary(name), do: name
  defp name_string(name) when is_atom(name), do: Atom.to_string(name)

  defp tool?(f) when is_function(f, 1), do: true
  defp tool?({f, spec}) when is_function(f, 1) and is_list(spec), do: true
  defp tool?(_), do: false

  defp normalize_tool!(_name, f) when is_function(f, 1), do: {f, %{args: nil, doc: nil}}

  defp normalize_tool!(name, {f, spec}) do
    unless Keyword.keyword?(spec) do
      raise ArgumentError, "tool #{inspect(name)}: spec must be a keyword list"
    end

    spec = Keyword.validate!(spec, args: nil, doc: nil)
    doc = spec[:doc]

    unless is_nil(doc) or is_binary(doc) do
      raise ArgumentError, "tool #{inspect(name)}: doc must be a string, got: #{inspect(doc)}"
    end

    {f, %{args: tool_args!(name, spec[:args]), doc: doc}}
  end

  defp tool_args!(_name, nil), do: nil

  defp tool_args!(name, args) when is_list(args) do
    parsed =
      Enum.map(args, fn
        {arg, type} when is_atom(arg) and type in @tool_types ->
          {Atom.to_string(arg), type, :required}

        {arg, {type, :optional}} when is_atom(arg) and type in @tool_types ->
          {Atom.to_string(arg), type, :optional}

        other ->
          raise ArgumentError,
                "tool #{inspect(name)}: each arg must be name: type or name: {type, :optional} " <>
                  "with type one of #{inspect(@tool_types)}, got: #{inspect(other)}"
      end)

    required_after_optional =
      parsed
      |> Enum.drop_while(&(elem(&1, 2) == :required))
      |> Enum.any?(&(elem(&1, 2) == :required))

    if required_after_optional do
      raise ArgumentError,
            "tool #{inspect(name)}: required args must come before optional ones"
    end

    parsed
  end

  defp tool_args!(name, other),
    do:
      raise(
        ArgumentError,
        "tool #{inspect(name)}: args must be a keyword list, got: #{inspect(other)}"
      )

  @doc "The map `LuaSandbox.Native.run_start/2` decodes (after `validate!/1` and encoding)."
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
      globals: opts[:globals],
      call: opts[:call],
      tools: opts[:tools] |> Map.keys() |> Enum.sort(),
      modules: Enum.map(opts[:modules], fn {k, m} -> {k, module_source(m)} end)
    }
  end

  @doc false
  # Milliseconds left for the run, as the NIF's `timeout` field: from the caller's deadline
  # (set by LuaSandbox.Supervisor, internal), else the whole timeout; nil for none.
  def native_timeout(deadline, _) when is_integer(deadline),
    do: max(deadline - System.monotonic_time(:millisecond), 0)

  def native_timeout(_, :infinity), do: nil
  def native_timeout(_, timeout), do: timeout

  defp module_source(%LuaSandbox.Chunk{ref: ref}), do: ref
  defp module_source(source) when is_binary(source), do: source
end
