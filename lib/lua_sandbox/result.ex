defmodule LuaSandbox.Result do
  @moduledoc """
  A finished run.

    * `value` — the first value the chunk (or the `call:` function) returned, `nil` if none
    * `values` — all returned values
    * `output` — what `print`/`io.write` produced (empty with `print: :discard`)
    * `stats` — `%{instructions: n, memory_peak: bytes, duration_us: n, tool_calls: n, cpu_us: n,
      denied: %{name => n}}` (`cpu_us`: the run's own CPU time, what `os.clock()` reports; tool
      time not included; `denied`: each capability the script called that the sandbox does not
      offer, "os.getenv is not available in this sandbox" giving `%{"os.getenv" => 1}`, also
      when the script caught the error)
  """

  @type stats :: %{
          instructions: non_neg_integer,
          memory_peak: non_neg_integer,
          duration_us: non_neg_integer,
          tool_calls: non_neg_integer,
          cpu_us: non_neg_integer,
          denied: %{optional(String.t()) => pos_integer}
        }

  @type t :: %__MODULE__{value: term, values: [term], output: binary, stats: stats}

  defstruct value: nil, values: [], output: "", stats: %{}
end
