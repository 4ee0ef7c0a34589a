defmodule LuaSandbox.Error do
  @moduledoc """
  Why a run failed. Returned as `{:error, %LuaSandbox.Error{}}` and raised by the `!` functions.

  ## Kinds

  The `kind` field is one of a closed list:

    * `:syntax` — the source (or a module) does not parse
    * `:runtime` — the script raised an error, or Lua did
    * `:instruction_limit` — `max_instructions` used up
    * `:memory_limit` — the Lua heap reached `max_memory`
    * `:output_limit` — printed output exceeded `max_output`
    * `:depth_limit` — a value nested deeper than `max_depth` (either direction)
    * `:size_limit` — a result larger than `max_result_bytes`
    * `:cycle` — a returned table contains itself
    * `:unsupported_value` — a function, coroutine or userdata in a result
    * `:invalid_input` — globals/args that cannot become Lua values, source over
      `max_source`, binary chunks, a forged chunk
    * `:tool_limit` — more than `max_tool_calls` tool calls
    * `:timeout` — the run passed its `timeout:` deadline (or, stuck in a tool, was killed)
    * `:overloaded` — the supervisor was at `max_concurrency`
    * `:node_down` — the node running the script went down

  `value` holds the error object when the script raised a non-string
  (`error({code = 1})` gives `%{"code" => 1}`); `output` what was printed before the failure;
  `line` the script line when the message names one.
  """

  @kinds [
    :syntax,
    :runtime,
    :instruction_limit,
    :memory_limit,
    :output_limit,
    :depth_limit,
    :size_limit,
    :cycle,
    :unsupported_value,
    :invalid_input,
    :tool_limit,
    :timeout,
    :overloaded,
    :node_down
  ]

  @type kind ::
          :syntax
          | :runtime
          | :instruction_limit
          | :memory_limit
          | :output_limit
          | :depth_limit
          | :size_limit
          | :cycle
          | :unsupported_value
          | :invalid_input
          | :tool_limit
          | :timeout
          | :overloaded
          | :node_down

  @type t :: %__MODULE__{
          kind: kind,
          message: String.t(),
          line: pos_integer | nil,
          traceback: String.t() | nil,
          value: term,
          output: binary,
          stats: map
        }

  defexception kind: :runtime,
               message: "",
               line: nil,
               traceback: nil,
               value: nil,
               output: "",
               stats: %{}

  @doc "Every error kind a run can return."
  @spec kinds() :: [kind]
  def kinds, do: @kinds

  @impl true
  def message(%__MODULE__{kind: kind, message: message}), do: "#{kind}: #{message}"
end
