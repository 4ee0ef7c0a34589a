defmodule LuaSandbox do
  @moduledoc """
  Runs untrusted Lua 5.4 from Elixir: real Lua (mlua, vendored) in a NIF on dirty CPU
  schedulers, a fresh isolated state for every run, and the BEAM owning time — when the
  process running a script dies, the script stops.

      iex> {:ok, result} = LuaSandbox.run("return 1 + 1")
      iex> result.value
      2

  An agent-shaped call: a context in, a table out, output captured.

      iex> source = \"\"\"
      ...> function run(ctx)
      ...>   print("hello " .. ctx.name)
      ...>   return {greeting = "hi " .. ctx.name, n = #ctx.items}
      ...> end
      ...> \"\"\"
      iex> {:ok, r} = LuaSandbox.run(source, call: {"run", [%{name: "ada", items: [1, 2, 3]}]})
      iex> r.value
      %{"greeting" => "hi ada", "n" => 3}
      iex> r.output
      "hello ada\\n"

  Limits end a run with their own kind, and no `pcall` can swallow them:

      iex> {:error, e} = LuaSandbox.run("while true do pcall(function() end) end", max_instructions: 10_000)
      iex> e.kind
      :instruction_limit

  ## Options

  Every function that runs code takes these (`t:option/0`):

  #{LuaSandbox.Options.table()}

  Unknown options and bad values raise `ArgumentError`. Names (of globals, tools, modules and
  the `call:` function) are non-empty UTF-8 strings or atoms; where a map of names is taken, a
  keyword list is too. Values crossing into Lua go through `LuaSandbox.Encoder`.

  ## Errors

  Failures are `{:error, %LuaSandbox.Error{}}` with a `kind` from a closed list
  (`LuaSandbox.Error.kinds/0`); each function below lists the kinds it typically returns.
  """

  alias LuaSandbox.{Chunk, Error, Native, Options, Result, Runner, Tools}

  @typedoc "Lua source text or a chunk from `compile/2`."
  @type source :: String.t() | Chunk.t()

  @typedoc "A map (or keyword list) of names to values."
  @type names(value) :: %{optional(String.t() | atom) => value} | [{atom | String.t(), value}]

  @typedoc "A tool: a function of the argument list, optionally with a spec checked before it runs."
  @type tool ::
          (list -> term)
          | {(list -> term),
             [
               args: [{atom, tool_type | {tool_type, :optional}}],
               doc: String.t()
             ]}

  @typedoc "The argument types a tool spec may name."
  @type tool_type :: :string | :integer | :number | :boolean | :table | :list | :map | :any

  @typedoc "One option of `run/2` (see the table in the module docs)."
  @type option ::
          {:globals, names(term)}
          | {:call, {String.t() | atom, list} | nil}
          | {:max_instructions, non_neg_integer}
          | {:max_memory, non_neg_integer}
          | {:max_depth, non_neg_integer}
          | {:max_result_bytes, non_neg_integer}
          | {:max_output, non_neg_integer}
          | {:max_source, non_neg_integer}
          | {:print, :capture | :log | :discard | {:send, pid}}
          | {:chunk_name, String.t()}
          | {:tools, names(tool)}
          | {:modules, names(String.t() | Chunk.t())}
          | {:max_tool_calls, non_neg_integer}
          | {:timeout, timeout}
          | {:supervisor, atom}
          | {:queue_timeout, timeout}
          | {:tenant, term}
          | {:node, node | :any | nil}
          | {:max_remote_bytes, non_neg_integer}

  @type options :: [option]

  @typedoc "An option of `compile/2`."
  @type compile_option :: {:chunk_name, String.t()} | {:max_source, non_neg_integer}

  @typedoc "Options of `async_stream/2`: every `t:option/0` plus the stream's own."
  @type stream_option ::
          option
          | {:max_concurrency, pos_integer}
          | {:ordered, boolean}
          | {:on_timeout, :kill_task}

  @type result :: {:ok, Result.t()} | {:error, Error.t()}

  @doc """
  The counters of a `LuaSandbox.Supervisor` since it started: runs by outcome (`:ok` or the
  error kind) and by tenant, `overloads`, `rate_limited` and `quota_exceeded` refusals, `kills`
  (runs whose caller died), summed `instructions`, `cpu_us`, `duration_us` and `tool_calls`,
  runs that waited in the queue (`queued`, and `queue_us` waited in all), `denied` (every
  capability a script called that the sandbox does not offer, by name => calls), a
  `memory_peak_histogram` (upper bound in bytes => runs), and the `running`/`capacity`/`queue`
  now. Kept in `:counters`, `:atomics` and ETS; reading them costs nothing to the runs.

      iex> LuaSandbox.run!("return 1", tenant: "doc")
      iex> m = LuaSandbox.metrics(LuaSandbox.TaskSupervisor)
      iex> m.by_tenant["doc"][:ok] >= 1
      true
  """
  @spec metrics(atom) :: map
  def metrics(supervisor \\ LuaSandbox.TaskSupervisor),
    do: LuaSandbox.Supervisor.Slots.metrics(supervisor)

  @doc """
  Runs `source` (Lua text or a `LuaSandbox.Chunk`) in a fresh sandboxed state.

  Takes every option in the module docs' table. Without `timeout:` the run happens in the
  calling process (tool functions too); with it, in a task under `supervisor:` that is killed
  on expiry. Either way it counts against the supervisor's `max_concurrency`.

      iex> LuaSandbox.run("return 1, 'two', {3}") |> elem(1) |> Map.get(:values)
      [1, "two", [3]]

      iex> {:error, %LuaSandbox.Error{kind: :runtime, line: 1}} = LuaSandbox.run("error('boom')")
      iex> :ok
      :ok

  ## Typical error kinds

    * `:syntax` — the source does not parse
    * `:runtime` — the script raised an error (`line`, `traceback`, `value` set)
    * `:instruction_limit`, `:memory_limit`, `:output_limit`, `:tool_limit` — a limit was hit
    * `:invalid_input` — a global or argument that cannot become a Lua value, source over
      `max_source`, more than #{Options.max_call_args()} `call:` arguments
    * `:unsupported_value`, `:cycle`, `:depth_limit`, `:size_limit` — the result cannot leave
    * `:timeout` — `timeout:` expired; `:overloaded` — the supervisor is full;
      `:node_down` — `node:` went away (or `node: :any` found no member)
    * `:rate_limited`, `:quota_exceeded` — the `tenant:` is over a quota of its supervisor

  Raises `ArgumentError` for unknown options, bad option values and a `supervisor:` that is
  not running.
  """
  @spec run(source, options) :: result
  def run(source, opts \\ []) do
    check_source!(source)
    opts = Options.validate!(opts)

    if opts[:timeout] == :infinity and is_nil(opts[:node]) do
      LuaSandbox.Supervisor.run_local(source, opts)
    else
      # The run goes to a task or a node: its input is encoded (bounded) before it is copied.
      with {:ok, opts} <- Runner.encode_input(opts), do: LuaSandbox.Supervisor.run(source, opts)
    end
  end

  @doc """
  Like `run/2`, but returns the `LuaSandbox.Result` or raises the `LuaSandbox.Error`.

  Same options and error kinds as `run/2`.

      iex> LuaSandbox.run!("return 'ok'").value
      "ok"
  """
  @spec run!(source, options) :: Result.t()
  def run!(source, opts \\ []) do
    case run(source, opts) do
      {:ok, result} -> result
      {:error, error} -> raise error
    end
  end

  @doc """
  Parses `source` once. Run the chunk as often as needed; each run still gets a fresh state.

  ## Options

  #{Options.table([:chunk_name, :max_source])}

      iex> {:ok, chunk} = LuaSandbox.compile("return x * 2", chunk_name: "double")
      iex> LuaSandbox.run!(chunk, globals: %{x: 21}).value
      42

      iex> {:error, e} = LuaSandbox.compile("return +")
      iex> {e.kind, e.line}
      {:syntax, 1}

  ## Typical error kinds

    * `:syntax` — the source does not parse
    * `:invalid_input` — the source is over `max_source` or is a binary chunk

  Raises `ArgumentError` when `source` is not a binary or an option is unknown or invalid.
  """
  @spec compile(String.t(), [compile_option]) :: {:ok, Chunk.t()} | {:error, Error.t()}
  def compile(source, opts \\ []) do
    unless is_binary(source) do
      raise ArgumentError, "source must be a string, got: #{inspect(source)}"
    end

    opts = Options.validate_compile!(opts)

    case Native.compile(source, %{chunk_name: opts[:chunk_name], max_source: opts[:max_source]}) do
      {:ok, ref} ->
        {:ok, %Chunk{ref: ref, name: opts[:chunk_name]}}

      {:error, failure, output, stats} ->
        {:error, Error.from_native(failure, output, stats)}
    end
  end

  @doc """
  Like `compile/2`, but returns the chunk or raises the `LuaSandbox.Error`.

      iex> LuaSandbox.compile!("return 1") |> LuaSandbox.run!() |> Map.get(:value)
      1
  """
  @spec compile!(String.t(), [compile_option]) :: Chunk.t()
  def compile!(source, opts \\ []) do
    case compile(source, opts) do
      {:ok, chunk} -> chunk
      {:error, error} -> raise error
    end
  end

  @doc """
  Starts `run/2` in a task under the supervisor (`supervisor:` option) and returns it; await
  it with `await/2` or `await_many/2`. The `timeout` belongs to the await.

  Takes the options of `run/2` (its `timeout` and `node` are ignored). On a full supervisor
  the task waits in the supervisor's queue (`queue_timeout:`) like `run/2`, then returns
  `:overloaded`. The run stops if the calling process dies.

      iex> tasks = for n <- 1..3, do: LuaSandbox.async("return n * n", globals: %{n: n})
      iex> LuaSandbox.await_many(tasks) |> Enum.map(fn {:ok, r} -> r.value end)
      [1, 4, 9]
  """
  @spec async(source, options) :: Task.t()
  def async(source, opts \\ []) do
    check_source!(source)
    opts = Options.validate!(opts)
    run_opts = Keyword.merge(opts, timeout: :infinity, node: nil)
    sup = opts[:supervisor]

    # The task takes its slot when it starts (an :overloaded result if there is none). Its
    # input is encoded (bounded) here, before it is copied to the task.
    {fun, args} =
      case Runner.encode_input(run_opts) do
        {:ok, run_opts} -> {:run_for, [self(), source, run_opts]}
        {:error, _} = refused -> {:answer, [refused]}
      end

    try do
      Task.Supervisor.async_nolink(sup, LuaSandbox.Supervisor, fun, args)
    catch
      :exit, {reason, _} when reason in [:noproc, :normal, :shutdown, :killed] ->
        raise ArgumentError, "supervisor #{inspect(sup)} is not running"
    end
  end

  @doc """
  Waits for a task from `async/2`. On timeout the task is killed (stopping the Lua run) and
  `{:error, %LuaSandbox.Error{kind: :timeout}}` is returned.

  ## Typical error kinds

  Those of `run/2`, and `:timeout` when `timeout` ms pass first.
  """
  @spec await(Task.t(), timeout) :: result
  def await(task, timeout \\ 5000) do
    task |> Task.yield(timeout) |> settle(task, timeout)
  end

  @doc """
  Waits for several tasks from `async/2` with one shared deadline; results in order.
  Tasks still running at the deadline are killed and give `:timeout` errors.
  """
  @spec await_many([Task.t()], timeout) :: [result]
  def await_many(tasks, timeout \\ 5000) do
    tasks
    |> Task.yield_many(timeout)
    |> Enum.map(fn {task, res} -> settle(res, task, timeout) end)
  end

  defp settle(res, task, timeout) do
    case res || Task.shutdown(task, :brutal_kill) do
      {:ok, result} -> result
      nil -> {:error, timeout_error(timeout)}
      {:exit, reason} -> {:error, crash_error(reason)}
    end
  end

  @doc """
  Runs many scripts, at most `max_concurrency` at once, and streams their results, like
  `Task.async_stream/3`. A run that finds its supervisor full waits in the supervisor's FIFO
  queue, shared with `run/2` and `async/2`: without bound by default (`queue_timeout:
  :infinity`; the stream's `timeout` still bounds each run, queueing included).

  Each element of `sources` is a source or `{source, opts}`; an element's `opts` are merged
  over the shared ones (they may not set `timeout`). The stream yields `t:result/0`s.

  ## Options

  The options of `run/2`, shared by every run, and:

    * `max_concurrency` — runs at once (default: dirty CPU schedulers)
    * `ordered` — results in input order (default `true`)
    * `timeout` — ms for each run, counted from its start (default `:infinity`); a run over it
      is killed and gives `:timeout`
    * `on_timeout` — `:kill_task` (the only choice: a run is never left going)

      iex> ["return 1", {"return x", globals: %{x: 2}}, "error('no')"]
      ...> |> LuaSandbox.async_stream(max_concurrency: 2)
      ...> |> Enum.map(fn {:ok, r} -> r.value; {:error, e} -> e.kind end)
      [1, 2, :runtime]

  ## Typical error kinds

  Those of `run/2` (`:overloaded` only with a finite `queue_timeout`), `:timeout` for a run
  over `timeout`.
  """
  @spec async_stream(Enumerable.t(), [stream_option]) :: Enumerable.t()
  def async_stream(sources, opts \\ []) do
    {stream_opts, run_opts} = Keyword.split(opts, [:max_concurrency, :ordered, :on_timeout])

    stream_opts =
      Keyword.validate!(stream_opts,
        max_concurrency: :erlang.system_info(:dirty_cpu_schedulers),
        ordered: true,
        on_timeout: :kill_task
      )

    if stream_opts[:on_timeout] != :kill_task do
      raise ArgumentError,
            "on_timeout must be :kill_task, got: #{inspect(stream_opts[:on_timeout])}"
    end

    {timeout, run_opts} = Keyword.pop(run_opts, :timeout, :infinity)
    run_opts = Keyword.put_new(run_opts, :queue_timeout, :infinity)
    # Validated now (and the supervisor looked up), so a mistake raises here, not in a worker.
    shared = Options.validate!(Keyword.put(run_opts, :timeout, timeout))
    _ = LuaSandbox.Supervisor.running(shared[:supervisor])

    sources
    |> Stream.map(&stream_item!(&1, run_opts))
    |> Task.async_stream(&stream_run/1,
      max_concurrency: stream_opts[:max_concurrency],
      ordered: stream_opts[:ordered],
      timeout: timeout,
      on_timeout: :kill_task
    )
    |> Stream.map(fn
      {:ok, result} -> result
      {:exit, :timeout} -> {:error, timeout_error(timeout)}
      {:exit, reason} -> {:error, crash_error(reason)}
    end)
  end

  defp stream_item!({source, item_opts}, shared) when is_list(item_opts) do
    if Keyword.has_key?(item_opts, :timeout) do
      raise ArgumentError, "an async_stream element may not set timeout; pass it to async_stream"
    end

    stream_item!(source, Keyword.merge(shared, item_opts))
  end

  # The input is encoded (bounded) here, before it is copied to a worker.
  defp stream_item!(source, shared) do
    check_source!(source)

    case shared |> Options.validate!() |> Runner.encode_input() do
      {:ok, opts} -> {source, opts}
      {:error, _} = refused -> refused
    end
  end

  defp stream_run({:error, _} = refused), do: refused

  defp stream_run({source, opts}) do
    if is_nil(opts[:node]) do
      LuaSandbox.Supervisor.run_local(source, opts)
    else
      LuaSandbox.Supervisor.run(source, Keyword.put(opts, :timeout, :infinity))
    end
  end

  @doc """
  What a script can use under `opts` (the options of `run/2`), as text for a model's prompt:
  the functions and libraries (`json` included), the tools with their specs, the modules,
  the limits, and what is not available. The functions and libraries are those a fresh
  sandboxed state offers, found by asking one; that probe is not a run of any supervisor, so
  the functions it finds refused are not counted in `metrics/1`, telemetry or an audit log.

      iex> text = LuaSandbox.describe(tools: [search: {fn [q] -> [q] end, args: [query: :string]}])
      iex> text =~ "json.{" and text =~ "tools.search(query: string)" and text =~ "io.open"
      true

  Raises `ArgumentError` for unknown options or bad option values.
  """
  @spec describe(options) :: String.t()
  def describe(opts \\ []), do: LuaSandbox.Describe.describe(opts)

  @doc """
  Renders a tool set (the `tools:` option) as text to put in a model's prompt: one line per
  tool, `tools.name(arg: type, opt?: type) -- doc`, sorted by name. Tools without a spec show
  as `tools.name(...)`.

      iex> LuaSandbox.describe_tools(
      ...>   search: {fn [q | _] -> [q] end, args: [query: :string, limit: {:integer, :optional}], doc: "web search"},
      ...>   now: fn [] -> 0 end
      ...> )
      "tools.now(...)\\ntools.search(query: string, limit?: integer) -- web search"

  Raises `ArgumentError` when `tools` is not a valid `tools:` option.
  """
  @spec describe_tools(names(tool)) :: String.t()
  def describe_tools(tools) do
    [tools: tools] |> Options.validate!() |> Keyword.fetch!(:tools) |> Tools.describe()
  end

  defp timeout_error(timeout) do
    Error.timeout("run", timeout, %{Error.empty_stats() | duration_us: timeout * 1000})
  end

  defp crash_error(reason) do
    Error.crashed("run", reason)
  end

  defp check_source!(source) when is_binary(source), do: :ok
  defp check_source!(%Chunk{} = chunk), do: Chunk.check!(chunk)

  defp check_source!(other),
    do:
      raise(
        ArgumentError,
        "source must be a string or a LuaSandbox.Chunk, got: #{inspect(other)}"
      )

  @doc """
  Wraps `term` as an opaque handle for a script: see `LuaSandbox.Handle`.

      iex> {:ok, r} = LuaSandbox.run("return h", globals: %{h: LuaSandbox.handle(%{secret: 1})})
      iex> r.value
      %{secret: 1}
  """
  @spec handle(term) :: LuaSandbox.Handle.t()
  def handle(term), do: %LuaSandbox.Handle{term: term}
end
