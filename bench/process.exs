# Run with: make bench-process   (= MIX_ENV=test mix run bench/process.exs: the test env has the
# worker build with probes, whose `spin` request stands for a busy run)
#
# isolation: :process (issue 18), what can be measured before scripts run in the worker: the
# costs of the port and the pool that every run will pay, side by side with a trivial NIF run.
# Each measure first checks its result. Prints a Markdown table.
#
#   * NIF trivial run: LuaSandbox.run("return 1") on a :nif supervisor (the baseline)
#   * worker round trip: checkout + one request/answer (:ping) + checkin, through the pool —
#     the floor of a trivial run via a worker (a run adds the Lua work the NIF does)
#   * frame round trip: one request/answer on a worker already checked out — the floor of a
#     tool call's round trip (a tool call is one frame out and one in)
#   * worker start: Port.open until the boot frame (sandbox built, jail applied)
#   * respawn: a worker killed from outside (SIGKILL) until its replacement has booted
#   * kill -> worker free: a caller holding a busy worker is killed, until the worker's OS
#     process is gone (it sees the port close and exits)
#   * worker RSS: resident set of an idle jailed worker (the sandbox's snapshot built)

alias LuaSandbox.Worker
alias LuaSandbox.Supervisor.Workers

defmodule Bench.Process do
  def percentiles(samples) do
    s = Enum.sort(samples)
    n = length(s)
    at = fn q -> Enum.at(s, min(n - 1, trunc(q * n))) end
    %{p50: at.(0.5), p99: at.(0.99), n: n}
  end

  def time_us(fun) do
    t0 = System.monotonic_time(:nanosecond)
    fun.()
    (System.monotonic_time(:nanosecond) - t0) / 1000
  end

  def until(fun, deadline_ms \\ 5_000) do
    t0 = System.monotonic_time(:millisecond)

    Stream.repeatedly(fn -> fun.() || (Process.sleep(0) && false) end)
    |> Enum.find(fn r -> r || System.monotonic_time(:millisecond) - t0 > deadline_ms end)
  end

  def row(label, %{p50: p50, p99: p99, n: n}, unit),
    do: "| #{label} | #{fmt(p50)} #{unit} | #{fmt(p99)} #{unit} | #{n} |"

  defp fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 1)
  defp fmt(x), do: to_string(x)
end

probes = Path.join(Mix.Project.build_path(), "lua_sandbox_worker_probes")
{:ok, _} = LuaSandbox.Supervisor.start_link(name: :bench_nif, max_concurrency: 2)

{:ok, _} =
  LuaSandbox.Supervisor.start_link(
    name: :bench_proc,
    max_concurrency: 2,
    isolation: :process,
    worker: probes
  )

pool = Workers.whereis(:bench_proc)
n = String.to_integer(System.get_env("BENCH_N", "5000"))

# sanity
{:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: :bench_nif)
{:ok, port} = Workers.checkout(pool)
{:ok, :pong} = Worker.request(port, :ping, 5_000)
Workers.checkin(pool, port, :ok)

warm = fn f -> for _ <- 1..500, do: f.() end

nif = fn -> {:ok, _} = LuaSandbox.run("return 1", supervisor: :bench_nif) end

via_pool = fn ->
  {:ok, port} = Workers.checkout(pool)
  {:ok, :pong} = Worker.request(port, :ping, 5_000)
  Workers.checkin(pool, port, :ok)
end

warm.(nif)
warm.(via_pool)

# alternating rounds
{a, b} =
  Enum.reduce(1..n, {[], []}, fn _, {a, b} ->
    {[Bench.Process.time_us(nif) | a], [Bench.Process.time_us(via_pool) | b]}
  end)

{:ok, port} = Workers.checkout(pool)
ping = fn -> {:ok, :pong} = Worker.request(port, :ping, 5_000) end
warm.(ping)
frames = for _ <- 1..n, do: Bench.Process.time_us(ping)
Workers.checkin(pool, port, :ok)

# worker start: Port.open until the boot frame (what the pool pays to replace one)
starts =
  for _ <- 1..100 do
    t0 = System.monotonic_time(:nanosecond)
    {:ok, port, _os_pid, _layers} = Worker.start(probes, 64 * 1024 * 1024)
    us = (System.monotonic_time(:nanosecond) - t0) / 1000
    Worker.close(port)
    us
  end

# respawn: SIGKILL an idle worker, until a new one has booted
respawn =
  for _ <- 1..30 do
    [%{os_pid: victim} | _] = LuaSandbox.Supervisor.info(:bench_proc).workers
    t0 = System.monotonic_time(:nanosecond)
    {_, 0} = System.cmd("kill", ["-KILL", Integer.to_string(victim)])

    Bench.Process.until(fn ->
      ws = GenServer.call(pool, :info).workers
      length(ws) == 2 and Enum.all?(ws, &(&1.os_pid != victim))
    end)

    # System.cmd's own cost (~1 ms) is inside this figure
    (System.monotonic_time(:nanosecond) - t0) / 1000
  end

# kill -> worker free: a caller busy in a worker is killed
kills =
  for _ <- 1..30 do
    me = self()

    caller =
      spawn(fn ->
        {:ok, port} = Workers.checkout(pool)
        send(me, {:busy, Worker.os_pid(port)})
        Worker.request(port, {:probe, "spin", ""}, :infinity)
      end)

    os_pid =
      receive do
        {:busy, p} -> p
      end

    Process.sleep(5)
    t0 = System.monotonic_time(:nanosecond)
    Process.exit(caller, :kill)
    Bench.Process.until(fn -> not File.exists?("/proc/#{os_pid}") end)
    us = (System.monotonic_time(:nanosecond) - t0) / 1000
    Bench.Process.until(fn -> length(GenServer.call(pool, :info).workers) == 2 end)
    us
  end

rss = for w <- LuaSandbox.Supervisor.info(:bench_proc).workers, do: w.rss / 1024 / 1024

IO.puts("""
isolation: :process, #{n} alternating samples (2 cores, shared)

| measure | p50 | p99 | samples |
| --- | --- | --- | --- |
#{Bench.Process.row("NIF trivial run (`return 1`)", Bench.Process.percentiles(a), "µs")}
#{Bench.Process.row("worker round trip via the pool (checkout, ping, checkin)", Bench.Process.percentiles(b), "µs")}
#{Bench.Process.row("frame round trip on a checked-out worker (tool-call floor)", Bench.Process.percentiles(frames), "µs")}
#{Bench.Process.row("worker start: Port.open until its boot frame", Bench.Process.percentiles(starts), "µs")}
#{Bench.Process.row("respawn after SIGKILL (the `kill` command's ~ms included), until booted", Bench.Process.percentiles(respawn), "µs")}
#{Bench.Process.row("kill -> worker OS process gone (busy worker)", Bench.Process.percentiles(kills), "µs")}

worker RSS (idle, jailed, sandbox built): #{Enum.map_join(rss, ", ", &:erlang.float_to_binary(&1, decimals: 1))} MiB
""")
