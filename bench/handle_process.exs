# Run with: make bench-handle-process   (= MIX_ENV=test mix run bench/handle_process.exs)
#
# Handles on isolation: :process (issue 18): a run passing one handle through a tool and back
# (`return tools.t(h)`: the tool gets the term and returns it as a handle again), via a worker
# and via the NIF,
# alternating; and the same run with a plain string in place of the handle, to see what the
# handle itself costs on each (on :process: the swap both ways, in the caller). Each measure
# first checks its result. Prints a Markdown table. BENCH_N runs of each (default 3000).

Code.require_file("process_helpers.exs", __DIR__)

{:ok, _} = LuaSandbox.Supervisor.start_link(name: :bench_nif, max_concurrency: 2)

{:ok, _} =
  LuaSandbox.Supervisor.start_link(name: :bench_proc, max_concurrency: 2, isolation: :process)

n = String.to_integer(System.get_env("BENCH_N", "3000"))
term = {:conn, make_ref()}
tools = %{t: fn [x] -> if is_binary(x), do: x, else: LuaSandbox.handle(x) end}

run = fn sup, value, expected ->
  fn ->
    {:ok, %{value: ^expected}} =
      LuaSandbox.run("return tools.t(h)", supervisor: sup, tools: tools, globals: %{h: value})
  end
end

cases = [
  {"handle through a tool, NIF", run.(:bench_nif, LuaSandbox.handle(term), term)},
  {"handle through a tool, worker", run.(:bench_proc, LuaSandbox.handle(term), term)},
  {"string through a tool, NIF", run.(:bench_nif, "conn", "conn")},
  {"string through a tool, worker", run.(:bench_proc, "conn", "conn")}
]

for {_, f} <- cases, _ <- 1..300, do: f.()

samples =
  Enum.reduce(1..n, Map.new(cases, fn {label, _} -> {label, []} end), fn _, acc ->
    Enum.reduce(cases, acc, fn {label, f}, acc ->
      Map.update!(acc, label, &[Bench.Process.time_us(f) | &1])
    end)
  end)

IO.puts("| measure (#{n} runs each, alternating) | p50 | p99 | n |")
IO.puts("|---|---|---|---|")

for {label, _} <- cases do
  IO.puts(Bench.Process.row(label, Bench.Process.percentiles(samples[label]), "µs"))
end
