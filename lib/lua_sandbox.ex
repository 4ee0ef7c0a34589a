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

  | option | default | meaning |
  | --- | --- | --- |
  | `globals` | `%{}` | `%{name => term}` set as Lua globals before the chunk runs |
  | `call` | `nil` | `{name, args}`: after the chunk ran, call global `name` with `args`; its return values are the result |
  | `max_instructions` | `100_000_000` | VM instructions (and builtin work) before `:instruction_limit` |
  | `max_memory` | `67_108_864` (64 MiB) | Lua heap bytes before `:memory_limit` |
  | `max_depth` | `64` | table nesting allowed when marshaling, both directions |
  | `max_result_bytes` | `16_777_216` (16 MiB) | string bytes plus 8 per value of a result |
  | `max_output` | `1_048_576` (1 MiB) | bytes of `print`/`io.write` output before `:output_limit` |
  | `max_source` | `1_048_576` (1 MiB) | bytes of source (and of each `load`) |
  | `print` | `:capture` | `:capture`, `{:send, pid}` (streams `{:lua_print, chunk}`, coalesced), `{:send, pid, tag}` (`{:lua_print, tag, chunk}`), `:log` (Logger, at the end, metadata `lua_chunk`, `lua_run`), `:discard` |
  | `chunk_name` | `"script"` | name in messages: `script:3: attempt to ...` |
  | `tools` | `%{}` | `%{name => fun/1}` callable from Lua as `tools.name(...)` |
  | `modules` | `%{}` | `%{name => source \\| %LuaSandbox.Chunk{}}` loadable with `require(name)` |
  | `max_tool_calls` | `1000` | tool calls before `:tool_limit` |
  | `timeout` | `:infinity` | ms; a deadline checked inside the run (`:timeout` with output and stats); the run happens in a supervised task, killed as a backstop 500 ms later |
  | `supervisor` | `LuaSandbox.TaskSupervisor` | the `LuaSandbox.Supervisor` used with `timeout`/`node` |
  | `node` | `nil` | run on another connected node (through its `LuaSandbox.TaskSupervisor`) |

  Unknown options raise `ArgumentError`.
  """

  alias LuaSandbox.{Chunk, Error, Native, Options, Result, Runner}

  @type source :: String.t() | Chunk.t()

  @doc """
  Runs `source` (Lua text or a `LuaSandbox.Chunk`) in a fresh sandboxed state.

      iex> LuaSandbox.run("return 1, 'two', {3}") |> elem(1) |> Map.get(:values)
      [1, "two", [3]]

      iex> {:error, %LuaSandbox.Error{kind: :runtime, line: 1}} = LuaSandbox.run("error('boom')")
      iex> :ok
      :ok
  """
  @spec run(source, keyword) :: {:ok, Result.t()} | {:error, Error.t()}
  def run(source, opts \\ []) do
    check_source!(source)
    opts = Options.validate!(opts)

    if opts[:timeout] == :infinity and is_nil(opts[:node]) do
      Runner.run(source, opts)
    else
      LuaSandbox.Supervisor.run(source, opts)
    end
  end

  @doc """
  Like `run/2`, but returns the `LuaSandbox.Result` or raises the `LuaSandbox.Error`.

      iex> LuaSandbox.run!("return 'ok'").value
      "ok"
  """
  @spec run!(source, keyword) :: Result.t()
  def run!(source, opts \\ []) do
    case run(source, opts) do
      {:ok, result} -> result
      {:error, error} -> raise error
    end
  end

  @doc """
  Parses `source` once. Run the chunk as often as needed; each run still gets a fresh state.

  Options: `chunk_name` (default `"script"`), `max_source` (default 1 MiB).

      iex> {:ok, chunk} = LuaSandbox.compile("return x * 2", chunk_name: "double")
      iex> LuaSandbox.run!(chunk, globals: %{x: 21}).value
      42
  """
  @spec compile(String.t(), keyword) :: {:ok, Chunk.t()} | {:error, Error.t()}
  def compile(source, opts \\ []) when is_binary(source) do
    opts = Keyword.validate!(opts, chunk_name: "script", max_source: 1024 * 1024)

    case Native.compile(source, %{chunk_name: opts[:chunk_name], max_source: opts[:max_source]}) do
      {:ok, ref} ->
        {:ok, %Chunk{ref: ref, name: opts[:chunk_name]}}

      {:error, kind, message, line} ->
        {:error, %Error{kind: kind, message: message, line: line}}
    end
  end

  @doc """
  Starts `run/2` in a task under the supervisor (`supervisor:` option) and returns it; await
  it with `await/2` or `await_many/2`. The `timeout` belongs to the await.

      iex> tasks = for n <- 1..3, do: LuaSandbox.async("return n * n", globals: %{n: n})
      iex> LuaSandbox.await_many(tasks) |> Enum.map(fn {:ok, r} -> r.value end)
      [1, 4, 9]
  """
  @spec async(source, keyword) :: Task.t()
  def async(source, opts \\ []) do
    check_source!(source)
    opts = Options.validate!(opts)
    run_opts = Keyword.merge(opts, timeout: :infinity, node: nil)

    try do
      Task.Supervisor.async_nolink(opts[:supervisor], Runner, :run, [source, run_opts])
    rescue
      e in RuntimeError ->
        overloaded = %Error{kind: :overloaded, message: Exception.message(e)}
        Task.async(fn -> {:error, overloaded} end)
    end
  end

  @doc """
  Waits for a task from `async/2`. On timeout the task is killed (stopping the Lua run) and
  `{:error, %LuaSandbox.Error{kind: :timeout}}` is returned.
  """
  @spec await(Task.t(), timeout) :: {:ok, Result.t()} | {:error, Error.t()}
  def await(task, timeout \\ 5000) do
    task |> Task.yield(timeout) |> settle(task, timeout)
  end

  @doc """
  Waits for several tasks from `async/2` with one shared deadline; results in order.
  Tasks still running at the deadline are killed and give `:timeout` errors.
  """
  @spec await_many([Task.t()], timeout) :: [{:ok, Result.t()} | {:error, Error.t()}]
  def await_many(tasks, timeout \\ 5000) do
    tasks
    |> Task.yield_many(timeout)
    |> Enum.map(fn {task, res} -> settle(res, task, timeout) end)
  end

  defp settle(res, task, timeout) do
    case res || Task.shutdown(task, :brutal_kill) do
      {:ok, result} ->
        result

      nil ->
        {:error, %Error{kind: :timeout, message: "run exceeded its timeout of #{timeout} ms"}}

      {:exit, reason} ->
        {:error, %Error{kind: :runtime, message: "run crashed: #{inspect(reason)}"}}
    end
  end

  defp check_source!(source) when is_binary(source), do: :ok
  defp check_source!(%Chunk{}), do: :ok

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
