defmodule LuaSandbox.Error do
  # The one list of error kinds: the moduledoc, the `kind` type and `kinds/0` are built from it,
  # and test/lua_sandbox/error_kinds_test.exs checks the README table and the native kind names
  # (SandboxError::kind_name in native/lua_sandbox_core/src/error.rs) against it.
  @kinds [
    syntax: "the source (or a module) does not parse",
    runtime: "the script raised an error, or Lua did (`line` and `traceback` when known)",
    instruction_limit: "`max_instructions` used up",
    memory_limit: "the Lua heap reached `max_memory`",
    output_limit: "printed output exceeded `max_output`",
    depth_limit: "a value nested deeper than `max_depth`, either direction",
    size_limit: "a result or tool argument larger than `max_result_bytes`",
    cycle: "a returned table contains itself (the message names the path)",
    unsupported_value:
      "a function, coroutine or userdata (or a table/function key) in a result or tool arguments (a userdata passed to a tool that is not one of the run's handles — `io.stdout`, a handle from elsewhere — is a Lua error the script can catch)",
    invalid_input:
      "globals or args that cannot become Lua values (the message names the path, e.g. " <>
        "`globals.ctx.items[3]`; such a tool result is a Lua error the script can catch), " <>
        "source over `max_source`, binary chunks, more `call:` arguments than the limit, a " <>
        "chunk sent to another node, input over `max_remote_bytes` for another node",
    tool_limit: "more than `max_tool_calls` tool calls",
    timeout:
      "the run passed its `timeout:` deadline (output and stats kept), or was killed in a tool",
    overloaded:
      "the supervisor was at `max_concurrency` for the run's whole `queue_timeout` (at once " <>
        "with `queue_timeout: 0`)",
    rate_limited:
      "the run's `tenant:` is over its `rate` or `concurrency` quota (`retry_after_ms` set)",
    quota_exceeded:
      "the run's `tenant:` has no CPU-time balance left (`retry_after_ms` set), or used it up " <>
        "during the run",
    node_down:
      "the node running the script went down or was unreachable, or its supervisor stopped " <>
        "mid-run; `node: :any` found no member",
    worker_crashed:
      "the worker OS process running the script (`isolation: :process`) died mid-run: a " <>
        "crash, its jail's seccomp kill, a signal from outside (the message names the signal); " <>
        "the pool replaces it (a session's worker: the session restarts from its start options)"
  ]

  # Kinds made on the Elixir side only: the NIF never returns them.
  @elixir_only [:overloaded, :rate_limited, :quota_exceeded, :node_down, :worker_crashed]

  @moduledoc """
  Why a run failed. Returned as `{:error, %LuaSandbox.Error{}}` and raised by the `!` functions.

  ## Kinds

  The `kind` field is one of a closed list (`kinds/0`):

  #{Enum.map_join(@kinds, "\n", fn {k, doc} -> "  * `#{inspect(k)}` — #{doc}" end)}

  ## Fields

    * `message` — Lua's message (`script:3: attempt to ...`) or ours for a limit
    * `line` — the script line when the message names one, else `nil`
    * `traceback` — Lua's traceback for `:runtime` errors, when known
    * `value` — the error object when the script raised a non-string
      (`error({code = 1})` gives `%{"code" => 1}`)
    * `output` — what was printed before the failure
    * `retry_after_ms` — for a refused `:rate_limited` or `:quota_exceeded`: when the tenant
      may try again; else `nil`
    * `stats` — always every key of `t:LuaSandbox.Result.stats/0` (zeros when unknown,
      e.g. for a `:timeout` the Elixir side had to enforce)
  """

  @type kind ::
          unquote(
            @kinds
            |> Keyword.keys()
            |> Enum.reverse()
            |> Enum.reduce(fn k, acc -> {:|, [], [k, acc]} end)
          )

  @type t :: %__MODULE__{
          kind: kind,
          message: String.t(),
          line: pos_integer | nil,
          traceback: String.t() | nil,
          value: term,
          output: binary,
          retry_after_ms: non_neg_integer | nil,
          stats: LuaSandbox.Result.stats()
        }

  @empty_stats %{
    instructions: 0,
    memory_peak: 0,
    duration_us: 0,
    tool_calls: 0,
    cpu_us: 0,
    denied: %{}
  }

  defexception kind: :runtime,
               message: "",
               line: nil,
               traceback: nil,
               value: nil,
               output: "",
               retry_after_ms: nil,
               stats: @empty_stats

  @doc """
  Every error kind a run can return, in the documented order.

      iex> :instruction_limit in LuaSandbox.Error.kinds()
      true
  """
  @spec kinds() :: [kind]
  def kinds, do: Keyword.keys(@kinds)

  @doc false
  # The kinds only the Elixir side produces (for the test against the core's list).
  @spec elixir_only_kinds() :: [kind]
  def elixir_only_kinds, do: @elixir_only

  @doc false
  @spec describe_kinds() :: [{kind, String.t()}]
  def describe_kinds, do: @kinds

  @doc false
  # The README's table of kinds (test/lua_sandbox/error_kinds_test.exs checks it is there).
  @spec kinds_table() :: String.t()
  def kinds_table do
    "| kind | when |\n| --- | --- |\n" <>
      Enum.map_join(@kinds, "\n", fn {k, doc} -> "| `#{inspect(k)}` | #{doc} |" end)
  end

  @doc false
  # Stats with every key, for errors built on the Elixir side.
  @spec empty_stats() :: LuaSandbox.Result.stats()
  def empty_stats, do: @empty_stats

  @doc false
  # The constructors: every `%LuaSandbox.Error{}` in lib/ is built by one of these, so the
  # shared messages (timeout, crash) are worded here once.
  @spec new(kind, String.t(), keyword) :: t
  def new(kind, message, fields \\ []) do
    struct!(__MODULE__, [kind: kind, message: message] ++ fields)
  end

  @doc false
  # `what` ("run", "call") passed its deadline of `ms` milliseconds.
  @spec timeout(String.t(), timeout, LuaSandbox.Result.stats()) :: t
  def timeout(what, ms, stats \\ @empty_stats),
    do: new(:timeout, timeout_message(what, ms), stats: stats)

  @doc false
  @spec timeout_message(String.t(), timeout) :: String.t()
  def timeout_message(what, ms), do: "#{what} exceeded its timeout of #{ms} ms"

  @doc false
  # `what` ("run", "session call") died: `reason` is an exit reason or a rescued exception.
  @spec crashed(String.t(), term, LuaSandbox.Result.stats()) :: t
  def crashed(what, reason, stats \\ @empty_stats),
    do: new(:runtime, "#{what} crashed: #{crash_detail(reason)}", stats: stats)

  @doc false
  # The worker `os_pid` died mid-request; `how` is LuaSandbox.Worker.describe_exit/1's text.
  @spec worker_crashed(pos_integer | nil, String.t(), LuaSandbox.Result.stats()) :: t
  def worker_crashed(os_pid, how, stats \\ @empty_stats),
    do: new(:worker_crashed, "the worker process (os pid #{os_pid}) died: #{how}", stats: stats)

  defp crash_detail(%{__exception__: true} = e), do: Exception.message(e)
  defp crash_detail(reason), do: inspect(reason)

  @doc false
  # A failure as the NIF answers it (`{kind, message, line, traceback, value}` plus the
  # output and stats of the run).
  @spec from_native({kind, String.t(), pos_integer | nil, String.t() | nil, term}, binary, map) ::
          t
  def from_native({kind, message, line, traceback, value}, output, stats) do
    new(kind, message,
      line: line,
      traceback: traceback,
      value: value,
      output: output,
      stats: stats
    )
  end

  @impl true
  def message(%__MODULE__{kind: kind, message: message}), do: "#{kind}: #{message}"
end
