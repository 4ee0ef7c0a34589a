# An agent-shaped OTP tree to copy: a supervisor with a bounded Lua supervisor and a GenServer
# that runs model-written scripts with a timeout and handles every error kind.
#
#     mix run examples/agent.exs

defmodule AgentExample.Application do
  @moduledoc false
  use Supervisor

  def start_link(opts), do: Supervisor.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(_opts) do
    children = [
      # Our own bounded pool of Lua runs: at most 4 at once, the rest are :overloaded.
      {LuaSandbox.Supervisor, name: AgentExample.Lua, max_concurrency: 4},
      AgentExample.Worker
    ]

    Supervisor.init(children, strategy: :one_for_one)
  end
end

defmodule AgentExample.Worker do
  @moduledoc false
  # Holds the agent's memory and runs one script per request.
  use GenServer

  require Logger

  def start_link(_), do: GenServer.start_link(__MODULE__, %{notes: []}, name: __MODULE__)

  @doc "Runs a model-written script; returns {:ok, value} or {:retry, feedback} for the model."
  def run_script(source), do: GenServer.call(__MODULE__, {:run, source}, 10_000)

  @impl true
  def init(state), do: {:ok, state}

  @impl true
  def handle_call({:run, source}, _from, state) do
    worker = self()

    tools = %{
      # Tools run in the run's task (timeout: is set), so they message the worker.
      remember: fn [note] -> send(worker, {:note, note}) && :ok end,
      notes: fn [] -> state.notes end
    }

    result =
      LuaSandbox.run(source,
        call: {"run", [%{"task" => "summarise", "limit" => 3}]},
        tools: tools,
        supervisor: AgentExample.Lua,
        timeout: 2_000,
        max_instructions: 5_000_000,
        max_memory: 8 * 1024 * 1024
      )

    {:reply, interpret(result), state}
  end

  @impl true
  def handle_info({:note, note}, state), do: {:noreply, %{state | notes: [note | state.notes]}}

  # Every error kind gets an answer the model can act on.
  defp interpret({:ok, %{value: value}}), do: {:ok, value}
  defp interpret({:error, %{kind: :syntax, message: m}}), do: {:retry, "fix the syntax: #{m}"}
  defp interpret({:error, %{kind: :runtime, message: m}}), do: {:retry, "it failed: #{m}"}

  defp interpret({:error, %{kind: kind}})
       when kind in [:instruction_limit, :timeout],
       do: {:retry, "too slow: do less work"}

  defp interpret({:error, %{kind: :memory_limit}}), do: {:retry, "uses too much memory"}
  defp interpret({:error, %{kind: :output_limit}}), do: {:retry, "prints too much"}

  defp interpret({:error, %{kind: kind, message: m}})
       when kind in [:depth_limit, :size_limit, :cycle, :unsupported_value],
       do: {:retry, "return plain data: #{m}"}

  defp interpret({:error, %{kind: :tool_limit}}), do: {:retry, "too many tool calls"}
  defp interpret({:error, %{kind: :overloaded}}), do: {:error, :busy}

  defp interpret({:error, %{kind: kind, message: m}}) do
    Logger.warning("lua run failed (#{kind}): #{m}")
    {:error, kind}
  end
end

defmodule AgentExample do
  @moduledoc false

  @scripts [
    {"a good script",
     """
     function run(ctx)
       tools.remember("started " .. ctx.task)
       local words = {}
       for w in ("one two three four"):gmatch("%a+") do
         if #words < ctx.limit then words[#words + 1] = w end
       end
       return {task = ctx.task, words = words}
     end
     """},
    {"a syntax error", "function run(ctx) return end end"},
    {"a runtime error", "function run(ctx) return ctx.missing.field end"},
    {"an endless loop", "function run(ctx) while true do end end"},
    {"a function in the result", "function run(ctx) return print end"}
  ]

  def main do
    {:ok, sup} = AgentExample.Application.start_link([])

    results =
      for {label, source} <- @scripts do
        answer = AgentExample.Worker.run_script(source)
        IO.puts("#{String.pad_trailing(label, 26)} -> #{inspect(answer)}")
        {label, answer}
      end

    Supervisor.stop(sup)
    results
  end
end

AgentExample.main()
