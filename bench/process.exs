# Run with: make bench-process   (= MIX_ENV=test mix run bench/process.exs)
#
# isolation: :process (issue 18): runs via a jailed worker side by side with the NIF. Each
# measure first checks its result. Prints a Markdown table.
#
#   * trivial run: LuaSandbox.run("return 1") on a :nif and on a :process supervisor,
#     alternating
#   * tool round trip: a run making 200 tool calls minus a run making none, per call, both
#     isolations
#   * 1 MB term in and out: `return t` with t a ~1 MB list of maps as a global, both isolations
#   * compiled chunk: a ~12 KB chunk compiled once, run on each isolation (the worker is sent
#     its bytecode every run)
#   * worker round trip: checkout + one request/answer (:ping) + checkin, through the pool
#   * frame round trip: one request/answer on a worker already checked out (the floor of a
#     tool call's round trip: one frame out and one in)
#   * the host's floor: the ping frame echoed by `cat` through a {:packet, 4} port (no worker
#     code: what two pipe writes and two process wakeups cost on this machine)
#   * worker start: Port.open until the boot frame (sandbox built, jail applied)
#   * respawn: a worker killed from outside (SIGKILL) until its replacement has booted
#   * runs right after a death: once the pool has seen a worker killed from outside, as many
#     concurrent runs as its capacity, until all answered (the pool keeps a spare booted, so
#     none waits for the replacement's boot)
#   * kill -> worker free: the caller of a run looping in a worker is killed, until the
#     worker's OS process is gone (the run sees the port close at its next budget tick, ends
#     :killed and the worker exits), then until the pool has a new worker booted
#   * worker RSS: resident set of an idle jailed worker (the sandbox's snapshot built)

alias LuaSandbox.Worker
alias LuaSandbox.Supervisor.Workers

# the measuring helpers (percentiles, time_us, until, row), shared with session_process.exs
Code.require_file("process_helpers.exs", __DIR__)

{:ok, _} = LuaSandbox.Supervisor.start_link(name: :bench_nif, max_concurrency: 2)

{:ok, _} =
  LuaSandbox.Supervisor.start_link(name: :bench_proc, max_concurrency: 2, isolation: :process)

pool = Workers.whereis(:bench_proc)
n = String.to_integer(System.get_env("BENCH_N", "5000"))

# sanity
{:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: :bench_nif)
{:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: :bench_proc)
{:ok, port} = Workers.checkout(pool)
{:ok, :pong} = Worker.request(port, :ping, 5_000)
Workers.checkin(pool, port, :ok)

warm = fn f -> for _ <- 1..500, do: f.() end

nif = fn -> {:ok, _} = LuaSandbox.run("return 1", supervisor: :bench_nif) end
proc = fn -> {:ok, _} = LuaSandbox.run("return 1", supervisor: :bench_proc) end

via_pool = fn ->
  {:ok, port} = Workers.checkout(pool)
  {:ok, :pong} = Worker.request(port, :ping, 5_000)
  Workers.checkin(pool, port, :ok)
end

warm.(nif)
warm.(proc)
warm.(via_pool)

# alternating rounds
{a, c, b} =
  Enum.reduce(1..n, {[], [], []}, fn _, {a, c, b} ->
    {[Bench.Process.time_us(nif) | a], [Bench.Process.time_us(proc) | c],
     [Bench.Process.time_us(via_pool) | b]}
  end)

# tool round trip: (200 calls - 0 calls) / 200, per isolation
tools = %{t: fn [x] -> x end}
calls = "local s = 0 for i = 1, 200 do s = s + tools.t(i) end return s"
none = "local s = 0 for i = 1, 200 do s = s + i end return s"

per_call = fn sup ->
  {:ok, %{value: 20100}} = LuaSandbox.run(calls, supervisor: sup, tools: tools)
  {:ok, %{value: 20100}} = LuaSandbox.run(none, supervisor: sup, tools: tools)

  for _ <- 1..200 do
    with_calls =
      Bench.Process.time_us(fn -> LuaSandbox.run(calls, supervisor: sup, tools: tools) end)

    without = Bench.Process.time_us(fn -> LuaSandbox.run(none, supervisor: sup, tools: tools) end)
    (with_calls - without) / 200
  end
end

tool_nif = per_call.(:bench_nif)
tool_proc = per_call.(:bench_proc)

# 1 MB term in and out
big = Enum.map(1..20_000, &%{"id" => &1, "name" => "item #{&1}", "tags" => ["a", "b"]})
{:ok, %{value: ^big}} = LuaSandbox.run("return t", supervisor: :bench_proc, globals: %{t: big})
{:ok, %{value: ^big}} = LuaSandbox.run("return t", supervisor: :bench_nif, globals: %{t: big})

mb = fn sup ->
  fn -> {:ok, _} = LuaSandbox.run("return t", supervisor: sup, globals: %{t: big}) end
end

{mb_nif, mb_proc} =
  Enum.reduce(1..100, {[], []}, fn _, {x, y} ->
    {[Bench.Process.time_us(mb.(:bench_nif)) | x], [Bench.Process.time_us(mb.(:bench_proc)) | y]}
  end)

# compiled chunk: ~12 KB of source (300 functions) compiled once, its bytecode run by each
# isolation (the worker is sent the bytecode every run)
chunk_src =
  "local M = {}\n" <>
    Enum.map_join(1..300, "\n", &"M.f#{&1} = function(x) return x + #{&1} end") <>
    "\nreturn M.f300(1)"

chunk = LuaSandbox.compile!(chunk_src)
{:ok, %{value: 301}} = LuaSandbox.run(chunk, supervisor: :bench_nif)
{:ok, %{value: 301}} = LuaSandbox.run(chunk, supervisor: :bench_proc)
run_chunk = fn sup -> fn -> {:ok, %{value: 301}} = LuaSandbox.run(chunk, supervisor: sup) end end
warm.(run_chunk.(:bench_nif))
warm.(run_chunk.(:bench_proc))

{chunk_nif, chunk_proc} =
  Enum.reduce(1..div(n, 3), {[], []}, fn _, {x, y} ->
    {[Bench.Process.time_us(run_chunk.(:bench_nif)) | x],
     [Bench.Process.time_us(run_chunk.(:bench_proc)) | y]}
  end)

{:ok, port} = Workers.checkout(pool)
ping = fn -> {:ok, :pong} = Worker.request(port, :ping, 5_000) end
warm.(ping)
frames = for _ <- 1..n, do: Bench.Process.time_us(ping)
Workers.checkin(pool, port, :ok)

# the host's floor: the same-sized frame echoed by `cat` through a {:packet, 4} port (no
# worker code at all: two pipe writes, two wakeups), alternating with the worker's ping
cat = Port.open({:spawn_executable, System.find_executable("cat")}, [{:packet, 4}, :binary])
ping_frame = :erlang.term_to_binary({1, :ping})

echo = fn ->
  Port.command(cat, ping_frame)

  receive do
    {^cat, {:data, ^ping_frame}} -> :ok
  end
end

warm.(echo)
echoes = for _ <- 1..n, do: Bench.Process.time_us(echo)
Port.close(cat)

# worker start: Port.open until the boot frame (what the pool pays to replace one)
starts =
  for _ <- 1..100 do
    t0 = System.monotonic_time(:nanosecond)
    {:ok, port, _os_pid, _layers} = Worker.start(Worker.default_path(), 64 * 1024 * 1024)
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
      length(ws) == 3 and Enum.all?(ws, &(&1.os_pid != victim))
    end)

    # System.cmd's own cost (~1 ms) is inside this figure
    (System.monotonic_time(:nanosecond) - t0) / 1000
  end

# runs right after a death: the pool (capacity 2 and a spare) has seen a worker die, then two
# concurrent runs at once
after_death =
  for _ <- 1..30 do
    Bench.Process.until(fn -> length(GenServer.call(pool, :info).workers) == 3 end)
    [%{os_pid: victim} | _] = LuaSandbox.Supervisor.info(:bench_proc).workers
    {_, 0} = System.cmd("kill", ["-KILL", Integer.to_string(victim)])

    Bench.Process.until(fn ->
      Enum.all?(GenServer.call(pool, :info).workers, &(&1.os_pid != victim))
    end)

    Bench.Process.time_us(fn ->
      [{:ok, %{value: 1}}, {:ok, %{value: 1}}] =
        for(
          _ <- 1..2,
          do: Task.async(fn -> LuaSandbox.run("return 1", supervisor: :bench_proc) end)
        )
        |> Task.await_many()
    end)
  end

# kill -> worker free: the caller of a run looping in a worker is killed (150 samples: the
# p99 of 30 was their maximum)
{kills, refills} =
  Enum.unzip(
    for _ <- 1..150 do
      me = self()
      before = Map.new(GenServer.call(pool, :info).workers, &{&1.os_pid, &1.runs})

      caller =
        spawn(fn ->
          LuaSandbox.run("tools.busy() while true do end",
            supervisor: :bench_proc,
            max_instructions: 1_000_000_000_000,
            tools: %{busy: fn _ -> send(me, :busy) && :ok end}
          )
        end)

      receive do
        :busy -> :ok
      end

      Process.sleep(5)
      # the worker whose run count went up
      [os_pid] =
        for w <- GenServer.call(pool, :info).workers,
            w.runs > Map.get(before, w.os_pid, 0),
            do: w.os_pid

      t0 = System.monotonic_time(:nanosecond)
      Process.exit(caller, :kill)

      Bench.Process.until(fn ->
        case File.read("/proc/#{os_pid}/status") do
          {:ok, status} -> status =~ ~r/^State:\s+Z/m
          {:error, _} -> true
        end
      end)

      gone = (System.monotonic_time(:nanosecond) - t0) / 1000

      Bench.Process.until(fn ->
        ws = GenServer.call(pool, :info).workers
        length(ws) == 3 and Enum.all?(ws, &(&1.os_pid != os_pid))
      end)

      {gone, (System.monotonic_time(:nanosecond) - t0) / 1000}
    end
  )

rss = for w <- LuaSandbox.Supervisor.info(:bench_proc).workers, do: w.rss / 1024 / 1024

IO.puts("""
isolation: :process, #{n} alternating samples (2 cores, shared)

| measure | p50 | p99 | samples |
| --- | --- | --- | --- |
#{Bench.Process.row("NIF trivial run (`return 1`)", Bench.Process.percentiles(a), "µs")}
#{Bench.Process.row("worker trivial run (`return 1`)", Bench.Process.percentiles(c), "µs")}
#{Bench.Process.row("NIF tool round trip (per call, 200 calls)", Bench.Process.percentiles(tool_nif), "µs")}
#{Bench.Process.row("worker tool round trip (per call, 200 calls)", Bench.Process.percentiles(tool_proc), "µs")}
#{Bench.Process.row("NIF 1 MB term in and out", Bench.Process.percentiles(mb_nif), "µs")}
#{Bench.Process.row("worker 1 MB term in and out", Bench.Process.percentiles(mb_proc), "µs")}
#{Bench.Process.row("NIF compiled chunk (#{byte_size(chunk_src)} B source, 300 functions)", Bench.Process.percentiles(chunk_nif), "µs")}
#{Bench.Process.row("worker compiled chunk (the same, bytecode sent)", Bench.Process.percentiles(chunk_proc), "µs")}
#{Bench.Process.row("worker round trip via the pool (checkout, ping, checkin)", Bench.Process.percentiles(b), "µs")}
#{Bench.Process.row("frame round trip on a checked-out worker (tool-call floor)", Bench.Process.percentiles(frames), "µs")}
#{Bench.Process.row("the host's floor: a frame echoed by `cat` through a port", Bench.Process.percentiles(echoes), "µs")}
#{Bench.Process.row("worker start: Port.open until its boot frame", Bench.Process.percentiles(starts), "µs")}
#{Bench.Process.row("respawn after SIGKILL (the `kill` command's ~ms included), until booted", Bench.Process.percentiles(respawn), "µs")}
#{Bench.Process.row("2 concurrent runs right after the pool saw a worker die (spare serves)", Bench.Process.percentiles(after_death), "µs")}
#{Bench.Process.row("kill -> worker OS process gone (caller of a looping run killed)", Bench.Process.percentiles(kills), "µs")}
#{Bench.Process.row("kill -> replacement worker booted", Bench.Process.percentiles(refills), "µs")}

worker RSS (idle, jailed, sandbox built): #{Enum.map_join(rss, ", ", &:erlang.float_to_binary(&1, decimals: 1))} MiB
""")
