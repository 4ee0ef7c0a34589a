defmodule LuaSandbox.Worker do
  @moduledoc false
  # One jailed worker OS process of `isolation: :process`, behind an Erlang port, as the BEAM
  # sees it (the other half is native/lua_sandbox_worker/src/bin/worker/main.rs). Frames are
  # `{:packet, 4}` with one term in the external term format each way (src/proto.rs names the
  # messages). Terms from the worker are decoded with `:safe`: a worker is not trusted, so it
  # can create no atom and no fun on this node.
  #
  # The pool (LuaSandbox.Supervisor.Workers) owns the ports; a caller that checked a worker out
  # is connected to its port for the time it uses it, so the answers and the worker's exit
  # status come to the caller directly, without a hop through the pool.

  alias LuaSandbox.Error
  alias LuaSandbox.Worker.Handles

  @boot_timeout 10_000

  # Every atom a worker may send (src/proto.rs, jail.rs's Layers::to_term): decoding with
  # `:safe` accepts only atoms that exist, and these exist once this module is loaded.
  @layers [
    :user_ns,
    :pid_ns,
    :ipc_ns,
    :fds_closed,
    :no_new_privs,
    :landlock,
    :rlimits,
    :address_space,
    :seccomp
  ]
  @answers [:boot, :on, :off, :pong, :ok, :error, :errno, :done, :tool_call, :print, nil, :nan] ++
             [:handle] ++
             [:cancelled, :busy, :arena_busy, :memory, :calls, :instructions, :rollbacks] ++
             [:infinity, :neg_infinity] ++ LuaSandbox.Error.kinds()

  @doc "The jail's layers, in the order the worker applies and reports them."
  @spec layers() :: [atom]
  def layers, do: @layers

  @doc false
  @spec protocol_atoms() :: [atom]
  def protocol_atoms, do: @layers ++ @answers

  @typedoc "A layer's state as the worker reports it at boot."
  @type layer_state :: :on | {:on, String.t()} | {:off, String.t()} | non_neg_integer

  @doc "The worker binary the Mix compiler installs next to the NIF."
  @spec default_path() :: Path.t()
  def default_path, do: Application.app_dir(:lua_sandbox, "priv/native/lua_sandbox_worker")

  @doc """
  Starts the worker at `path` for the calling process and waits for its boot frame:
  `{:ok, port, os_pid, layers}` or `{:error, reason}` (the worker is gone then).
  """
  @spec start(Path.t(), pos_integer) ::
          {:ok, port, pos_integer, [{atom, layer_state}]} | {:error, String.t()}
  def start(path, max_memory) do
    case open(path, max_memory) do
      {:ok, port} -> await_boot(port)
      error -> error
    end
  end

  @doc "Opens the port without waiting for the boot frame (see `boot/2`)."
  @spec open(Path.t(), pos_integer) :: {:ok, port} | {:error, String.t()}
  def open(path, max_memory) do
    if File.regular?(path) do
      port =
        Port.open({:spawn_executable, path}, [
          {:packet, 4},
          :binary,
          :exit_status,
          :use_stdio,
          {:args, [Integer.to_string(max_memory)]}
        ])

      {:ok, port}
    else
      {:error,
       "the worker binary #{path} is missing (built by `mix compile` with cargo; not with " <>
         "LUA_SANDBOX_NIF_PATH)"}
    end
  end

  defp await_boot(port) do
    receive do
      {^port, msg} ->
        case boot(port, msg) do
          {:ok, layers} -> {:ok, port, os_pid(port), layers}
          error -> error
        end
    after
      @boot_timeout ->
        close(port)
        {:error, "the worker sent no boot frame within #{@boot_timeout} ms"}
    end
  end

  @doc """
  Reads the boot frame from a port message: `{:ok, layers}`, or `{:error, reason}` when the
  worker exited instead (its jail could not be applied) or sent something else.
  """
  @spec boot(port, term) :: {:ok, [{atom, layer_state}]} | {:error, String.t()}
  def boot(port, {:data, frame}) do
    case decode(frame) do
      {:boot, layers} when is_list(layers) ->
        {:ok, layers}

      other ->
        close(port)
        {:error, "the worker's boot frame is not one: #{inspect(other, limit: 10)}"}
    end
  end

  def boot(_port, {:exit_status, status}),
    do: {:error, "the worker exited at boot: #{describe_exit(status)}"}

  @doc "The layers of a boot frame that are not in force, each as `{name, reason}`."
  @spec missing([{atom, layer_state}]) :: [{atom, String.t()}]
  def missing(layers), do: for({name, {:off, why}} <- layers, do: {name, why})

  @doc """
  Sends `request` to the worker on `port` (connected to the calling process) and waits at most
  `timeout` ms for its answer: `{:ok, answer}`, `{:error, %Error{kind: :worker_crashed}}` when
  the worker died meanwhile, or `:timeout` (the worker is then in an unknown state: give it
  back as broken).
  """
  @spec request(port | {:session, pid, non_neg_integer}, term, timeout, (binary -> any) | nil) ::
          {:ok, term} | {:error, Error.t()} | :timeout
  def request(target, request, timeout, print \\ nil)

  # A session's worker, through its session process (LuaSandbox.Session.Worker), which
  # forwards the session's streamed output itself.
  def request({:session, pid, gen}, request, timeout, _print),
    do: LuaSandbox.Session.Worker.request(pid, gen, request, timeout)

  def request(port, request, timeout, print) do
    id = System.unique_integer([:positive])
    started = System.monotonic_time(:microsecond)
    os_pid = os_pid(port)

    # A port can close without an exit status (an error on its pipe: a write to a worker that
    # had just died is :epipe), so the wait watches the port itself too.
    mref = :erlang.monitor(:port, port)

    try do
      Port.command(port, :erlang.term_to_binary({id, request}))
    rescue
      ArgumentError -> :closed
    end

    answer = await(port, {id, mref}, os_pid, started, timeout, print)
    :erlang.demonitor(mref, [:flush])
    answer
  end

  # `timeout` (ms) counts from `started`: frames along the way do not extend the wait.
  defp await(port, {id, mref} = ids, os_pid, started, timeout, print) do
    receive do
      {^port, {:data, frame}} ->
        case decode(frame) do
          # a run's streamed output, ahead of its answer (print: {:send, ...})
          {^id, {:print, bytes}} when is_binary(bytes) and print != nil ->
            print.(bytes)
            await(port, ids, os_pid, started, timeout, print)

          {^id, answer} ->
            {:ok, answer}

          # an answer to an earlier request that timed out: not ours
          _other ->
            await(port, ids, os_pid, started, timeout, print)
        end

      {^port, {:exit_status, status}} ->
        {:error, crashed(os_pid, describe_exit(status), started)}

      # closed without an exit status (see request/4), or gone already
      {:DOWN, ^mref, :port, _, reason} ->
        {:error, crashed(os_pid, "closed its pipe (#{inspect(reason)})", started)}
    after
      left(timeout, started) -> :timeout
    end
  end

  defp left(:infinity, _started), do: :infinity

  defp left(timeout, started),
    do: max(timeout - div(System.monotonic_time(:microsecond) - started, 1000), 0)

  defp crashed(os_pid, how, started) do
    stats = %{Error.empty_stats() | duration_us: System.monotonic_time(:microsecond) - started}
    Error.worker_crashed(os_pid, how, stats)
  end

  @doc false
  # A frame from a worker (any atom it names exists: see @answers).
  def decode(frame) do
    :erlang.binary_to_term(frame, [:safe])
  rescue
    ArgumentError -> {:undecodable, byte_size(frame)}
  end

  # Beyond the run's own deadline (which the worker enforces), how long the caller waits for
  # the answer before it gives the worker up as broken.
  @deadline_slack 1_000

  @doc """
  Runs `source` (Lua text, or a compiled chunk's reference as `LuaSandbox.Options.to_native/1`
  passes chunks) on the worker `port` (checked out for the calling process) with the NIF's
  options (`LuaSandbox.Options.to_native/1`); `deadline` is monotonic ms or nil. The answer is
  wrapped as `{:worker, port, context, answer}` for `LuaSandbox.Runner.drive/3`: `answer` is
  the NIF's shape (`{:ok, ...}`, `{:error, failure, output, stats}`), `{:tool_call, name, args}`
  (reply with `reply/3`, passing `context` on), or `{:broken, %Error{}}` when the worker died or
  did not answer. With `print: {:send, ...}` the worker streams the output as it goes and it is
  forwarded from here as the NIF's `{:lua_print, ...}` messages, before the answer.
  """
  @spec run(port, binary | reference, map, integer | nil) :: {:worker, port, context, term}
  def run(port, source, native_opts, deadline) do
    # the run's handles: their terms stay here (LuaSandbox.Worker.Handles)
    context = {deadline, forward(native_opts.print_pid, native_opts.print_tag), Handles.new()}
    step(port, {:run, wire(source), run_opts(native_opts)}, context)
  end

  @doc "The NIF's options (`LuaSandbox.Options.to_native/1`) as the worker reads them."
  @spec run_opts(map) :: map
  def run_opts(native_opts) do
    native_opts
    # :capture, :log (logged by LuaSandbox.Runner from the output), :discard, or :send (the
    # pid and the tag stay here: forward/2)
    |> Map.drop([:print_pid, :print_tag])
    |> Map.update!(:chunk_name, &to_string/1)
    |> Map.update!(:modules, &Enum.map(&1, fn {name, m} -> {name, wire(m)} end))
  end

  @typedoc """
  What a run's steps share: its deadline, where its streamed output goes, and its handles
  (nil for a session call's: its session process swaps them, LuaSandbox.Session.Worker).
  """
  @opaque context :: {integer | nil, (binary -> any) | nil, Handles.t() | nil}

  @doc """
  Where a run's streamed output goes (`print: {:send, ...}`, from the NIF's options'
  `print_pid` and `print_tag`): a function sending the NIF's messages
  (native/lua_sandbox_nif/src/print.rs), `{:lua_print, chunk}` or, with the tag of
  `{:send, pid, tag}` (encoded by `LuaSandbox.Options.to_native/1`), `{:lua_print, tag, chunk}`;
  nil when the output is not streamed.
  """
  @spec forward(pid | nil, binary | nil) :: (binary -> any) | nil
  def forward(nil, _tag), do: nil
  def forward(pid, nil), do: &send(pid, {:lua_print, &1})

  def forward(pid, tag) do
    tag = :erlang.binary_to_term(tag)
    &send(pid, {:lua_print, tag, &1})
  end

  @doc false
  # A source as it crosses to a worker (a run's, a module's, a session call's): text as it is,
  # a chunk as `{:bytecode, bytes, name}`, its bytecode straight from its resource (the worker
  # loads it as our own bytecode: native/lua_sandbox_worker/src/run.rs `Source`).
  def wire(source) when is_binary(source), do: source

  def wire(chunk) when is_reference(chunk) do
    {bytecode, name} = LuaSandbox.Native.chunk_bytecode(chunk)
    {:bytecode, bytecode, name}
  end

  @doc "Gives the tool's reply to the run parked on `port`; answers like `run/4`."
  @spec reply(port, term, context) :: {:worker, port, context, term}
  def reply(port, reply, context), do: step(port, {:reply, reply}, context)

  @doc false
  # One request of a run (or a session call) and its answer, checked and wrapped for
  # LuaSandbox.Runner.drive/3; `port` is a port or a session's `{:session, pid, gen}`. A run's
  # handles are swapped here, both ways (LuaSandbox.Worker.Handles).
  def step(port, request, {deadline, print, handles}) do
    wait =
      case deadline do
        nil -> :infinity
        d -> max(d - System.monotonic_time(:millisecond), 0) + @deadline_slack
      end

    {request, handles} = if handles, do: Handles.wire(request, handles), else: {request, nil}

    {answer, handles} =
      port
      |> request(request, wait, print)
      |> unwire(handles)

    answer =
      case answer do
        {:ok, {:ok, values, output, stats} = ok}
        when is_list(values) and is_binary(output) and is_map(stats) ->
          ok

        {:ok, {:error, {kind, message, _, _, _}, output, stats} = error}
        when is_atom(kind) and is_binary(message) and is_binary(output) and is_map(stats) ->
          error

        {:ok, {:tool_call, name, args} = call} when is_binary(name) and is_list(args) ->
          call

        # a session call while another member of its family has the arena (try again)
        {:ok, :arena_busy} ->
          :arena_busy

        {:ok, other} ->
          {:broken,
           Error.new(:worker_crashed, "the worker answered #{inspect(other, limit: 10)}")}

        {:error, %Error{} = crashed} ->
          {:broken, crashed}

        :timeout ->
          {:broken,
           Error.new(:timeout, "the worker did not answer within its deadline",
             stats: Error.empty_stats()
           )}
      end

    {:worker, port, {deadline, print, handles}, answer}
  end

  defp unwire({:ok, answer}, handles) when handles != nil do
    case Handles.unwire(answer, handles) do
      {:ok, answer, handles} -> {{:ok, answer}, handles}
      {:error, why} -> {{:error, Error.new(:worker_crashed, "the worker broke: #{why}")}, handles}
    end
  end

  defp unwire(answer, handles), do: {answer, handles}

  @doc "The worker's OS pid, or nil once its port is closed."
  @spec os_pid(port) :: pos_integer | nil
  def os_pid(port) do
    case Port.info(port, :os_pid) do
      {:os_pid, pid} -> pid
      nil -> nil
    end
  end

  @doc "The resident set of OS process `os_pid` in bytes (Linux), or nil."
  @spec rss(pos_integer | nil) :: non_neg_integer | nil
  def rss(nil), do: nil

  def rss(os_pid) do
    with {:ok, status} <- File.read("/proc/#{os_pid}/status"),
         [_, kb] <- Regex.run(~r/^VmRSS:\s+(\d+) kB/m, status) do
      String.to_integer(kb) * 1024
    else
      _ -> nil
    end
  end

  @doc """
  Closes the port: a worker in an unknown state (its caller died mid-request, a request timed
  out) is never reused. The worker sees its pipe hang up and exits, whether it waits for a
  request or is busy (it checks as it goes); no kill by pid, which could hit another process
  once the worker's pid is reused.
  """
  @spec close(port) :: :ok
  def close(port) do
    Port.close(port)
    :ok
  rescue
    ArgumentError -> :ok
  end

  # Linux's numbering (erts reports a death by signal n as exit status 128 + n).
  @signals %{
    1 => "SIGHUP",
    2 => "SIGINT",
    3 => "SIGQUIT",
    4 => "SIGILL",
    5 => "SIGTRAP",
    6 => "SIGABRT",
    7 => "SIGBUS",
    8 => "SIGFPE",
    9 => "SIGKILL",
    11 => "SIGSEGV",
    13 => "SIGPIPE",
    14 => "SIGALRM",
    15 => "SIGTERM",
    24 => "SIGXCPU",
    25 => "SIGXFSZ",
    31 => "SIGSYS"
  }

  @doc """
  How a worker's exit status reads: `"killed by SIGSYS (signal 31)"`, `"exited with status 2"`.
  """
  @spec describe_exit(non_neg_integer) :: String.t()
  def describe_exit(status) when status > 128 do
    n = status - 128

    case :os.type() do
      {:unix, :linux} -> "killed by #{Map.get(@signals, n, "signal #{n}")} (signal #{n})"
      _ -> "killed by signal #{n}"
    end
  end

  # native/lua_sandbox_worker/src/lib.rs `PROTOCOL_ERROR`
  def describe_exit(4),
    do: "exited with status 4 (a protocol error: a frame other than :cancel during a run)"

  def describe_exit(status), do: "exited with status #{status}"
end
