defmodule LuaSandbox.Session do
  @moduledoc """
  A sandboxed Lua state that lives across calls: load helpers once, call into them many
  times, with per-call limits, and a failed call rolled back.

      {:ok, s} = LuaSandbox.Session.start_link(max_memory: 16 * 1024 * 1024)
      {:ok, _} = LuaSandbox.Session.run(s, "count = 0 function bump(n) count = count + n return count end")
      {:ok, %{value: 5}} = LuaSandbox.Session.call(s, "bump", [5])
      {:error, %{kind: :runtime}} = LuaSandbox.Session.run(s, "count = 1000 error('halfway')")
      {:ok, %{value: 5}} = LuaSandbox.Session.run(s, "return count")

  ## State-wide options (`start_link/1`)

  | option | default | meaning |
  | --- | --- | --- |
  | `max_memory` | 64 MiB | Lua heap bytes for the whole session |
  | `globals` | `%{}` | set once, when the session starts |
  | `tools` | `%{}` | `name => fun/1`, as in `LuaSandbox.run/2` |
  | `modules` | `%{}` | `name => source \\| %LuaSandbox.Chunk{}` for `require` |
  | `print` | `:capture` | as in `LuaSandbox.run/2` |
  | `chunk_name` | `"script"` | name of the chunks `run/3` loads |
  | `max_depth`, `max_source` | as in `LuaSandbox.run/2` | |
  | `name` | none | registers the session process |

  ## Per-call options (`run/3`, `call/4`)

  | option | default | meaning |
  | --- | --- | --- |
  | `max_instructions` | 100 000 000 | budget of this call |
  | `max_output`, `max_tool_calls`, `max_result_bytes` | as in `LuaSandbox.run/2` | per call |
  | `timeout` | `:infinity` | ms; the call runs in a task that is killed on expiry (`:timeout`) |
  | `rollback` | `true` | a call that ends in any error leaves the state as it was before it |

  Calls on one session are serialized (callers wait their turn); many sessions run in
  parallel. A call runs in the calling process: if that process dies, the call stops within
  milliseconds and is rolled back. If the session process stops, its state is freed.

  Rollback copies the state's used memory aside before each call (a `memcpy`, about 1 µs
  per 40 KiB; see bench/RESULTS.md) and back after a failed one.
  """

  use GenServer

  alias LuaSandbox.{Chunk, Error, Native, Options, Runner}

  @state_keys [
    :max_memory,
    :max_depth,
    :max_source,
    :print,
    :chunk_name,
    :globals,
    :tools,
    :modules
  ]
  @call_keys [:max_instructions, :max_output, :max_tool_calls, :max_result_bytes, :timeout]

  @typedoc "A running session: its pid or registered name."
  @type t :: GenServer.server()

  @doc """
  Starts a session linked to the caller, with the state-wide options above.

  Raises `ArgumentError` for unknown or invalid options. Returns `{:error, %LuaSandbox.Error{}}`
  when the state cannot be set up (e.g. `:invalid_input` globals, `:syntax` in a module).
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, Error.t()}
  def start_link(opts \\ []) do
    {name, opts} = Keyword.pop(opts, :name)
    validated = state_options(opts)
    native = validated |> Runner.encode_opts() |> Options.to_native()
    gen_opts = if name, do: [name: name], else: []

    case Native.session_new(native) do
      {:ok, res} ->
        GenServer.start_link(__MODULE__, {res, validated[:tools], validated}, gen_opts)

      {:error, _, _, _} = failed ->
        Runner.drive(failed, %{}, [])
    end
  end

  @doc "Runs Lua `source` (or a compiled `%LuaSandbox.Chunk{}`) in the session's state."
  @spec run(t, String.t() | Chunk.t(), keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def run(session, source, opts \\ []) when is_binary(source) or is_struct(source, Chunk) do
    native_source =
      case source do
        %Chunk{ref: ref} -> ref
        text -> text
      end

    exec(session, native_source, nil, opts)
  end

  @doc "Calls the global function `name` of the session's state with `args`."
  @spec call(t, String.t() | atom, list, keyword) ::
          {:ok, LuaSandbox.Result.t()} | {:error, Error.t()}
  def call(session, name, args, opts \\ []) when is_list(args) do
    exec(session, nil, {to_string(name), Enum.map(args, &LuaSandbox.Encoding.encode/1)}, opts)
  end

  @doc "Memory in use (bytes), calls made, instructions used and rollbacks done so far."
  @spec info(t) :: %{
          memory: non_neg_integer,
          calls: non_neg_integer,
          instructions: non_neg_integer,
          rollbacks: non_neg_integer
        }
  def info(session), do: GenServer.call(session, :info, :infinity)

  @doc "Stops the session; its state is freed."
  @spec stop(t) :: :ok
  def stop(session), do: GenServer.stop(session)

  ## Client side of a call

  defp exec(session, source, call, opts) do
    {timeout, call_opts} = call_options(opts, call)

    case timeout do
      :infinity ->
        exec_here(session, source, call_opts)

      ms ->
        task =
          Task.Supervisor.async_nolink(LuaSandbox.TaskSupervisor, fn ->
            exec_here(session, source, call_opts)
          end)

        # The deadline is checked inside the call; the task's kill is the backstop (time
        # spent in tools).
        case Task.yield(task, ms + 100) || Task.shutdown(task, :brutal_kill) do
          {:ok, result} ->
            result

          {:exit, reason} ->
            {:error, Error.crashed("session call", reason)}

          nil ->
            {:error, Error.timeout("call", ms)}
        end
    end
  end

  defp exec_here(session, source, call_opts) do
    {res, tools, print} = GenServer.call(session, :checkout, :infinity)

    try do
      res
      |> run_when_free(source, call_opts, 0)
      |> Runner.drive(tools, print: print)
    after
      GenServer.cast(session, {:checkin, self()})
    end
  end

  # The state may still be on its way back from a call whose caller just died (the native
  # call notices within milliseconds and rolls back).
  defp run_when_free(res, source, call_opts, waited) do
    case Native.session_run(res, source, call_opts) do
      :busy when waited < 5_000 ->
        Process.sleep(1)
        run_when_free(res, source, call_opts, waited + 1)

      :busy ->
        {:error, {:runtime, "session state did not come back", nil, nil, nil}, "",
         Error.empty_stats()}

      answer ->
        answer
    end
  end

  defp call_options(opts, call) do
    {rollback, opts} = Keyword.pop(opts, :rollback, true)

    unless is_boolean(rollback),
      do: raise(ArgumentError, "rollback must be a boolean, got: #{inspect(rollback)}")

    case Keyword.keys(opts) -- @call_keys do
      [] -> :ok
      bad -> raise ArgumentError, "unknown options for a session call: #{inspect(bad)}"
    end

    o = Options.validate!(opts)

    {o[:timeout],
     %{
       max_instructions: o[:max_instructions],
       max_output: o[:max_output],
       max_tool_calls: o[:max_tool_calls],
       max_result_bytes: o[:max_result_bytes],
       rollback: rollback,
       call: call,
       timeout: Options.native_timeout(nil, o[:timeout])
     }}
  end

  # Validated and normalized (names as strings, tools as name => {fun, spec}).
  defp state_options(opts) do
    case Keyword.keys(opts) -- @state_keys do
      [] -> :ok
      bad -> raise ArgumentError, "unknown session options: #{inspect(bad)}"
    end

    Options.validate!(opts)
  end

  ## Server

  @impl true
  def init({res, tools, opts}) do
    {:ok,
     %{res: res, tools: tools, print: opts[:print] || :capture, owner: nil, queue: :queue.new()}}
  end

  @impl true
  def handle_call(:checkout, {pid, _}, %{owner: nil} = s),
    do: {:reply, grant(s), %{s | owner: {pid, Process.monitor(pid)}}}

  def handle_call(:checkout, from, s), do: {:noreply, %{s | queue: :queue.in(from, s.queue)}}

  def handle_call(:info, _from, s) do
    case Native.session_info(s.res) do
      {:ok, info} -> {:reply, info, s}
      :busy -> {:reply, %{busy: true}, s}
    end
  end

  @impl true
  def handle_cast({:checkin, pid}, %{owner: {pid, mref}} = s) do
    Process.demonitor(mref, [:flush])
    {:noreply, next(%{s | owner: nil})}
  end

  def handle_cast({:checkin, _}, s), do: {:noreply, s}

  @impl true
  def handle_info({:DOWN, mref, :process, pid, _}, %{owner: {pid, mref}} = s),
    do: {:noreply, next(%{s | owner: nil})}

  def handle_info(_, s), do: {:noreply, s}

  defp grant(s), do: {s.res, s.tools, s.print}

  # Hands the state to the next waiting caller that is still alive.
  defp next(s) do
    case :queue.out(s.queue) do
      {:empty, _} ->
        s

      {{:value, {pid, _} = from}, queue} ->
        if Process.alive?(pid) do
          GenServer.reply(from, grant(s))
          %{s | queue: queue, owner: {pid, Process.monitor(pid)}}
        else
          next(%{s | queue: queue})
        end
    end
  end
end
