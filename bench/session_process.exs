# Run with: make bench-session-process   (= MIX_ENV=test mix run bench/session_process.exs)
#
# Sessions on isolation: :process (issue 18) side by side with the NIF's. Each measure first
# checks its result. Prints a Markdown table.
#
#   * session call: `Session.call(s, "f", [1])` on a NIF session and on a worker session,
#     alternating (the worker's: a hop to the session process, one frame each way)
#   * session call with a tool call: `Session.call(s, "g", [1])`, g calling one tool
#   * caller killed -> next call answered: the caller of a call looping in Lua is killed; from
#     the kill until another caller's `return n` is answered (rolled back: n is 1)
#   * the same with the caller parked at a tool
#   * session start: `Session.start_link/1` (a worker's: Port.open, boot, session_new)
#   * fork start: `Session.fork(s)` of a small session (a worker's: its fork is made in the
#     origin's worker, with the family's process as one more hop), BENCH_FORK_N times (300)
#   * fork call: `Session.call(f, "f", [1])` right after a call of its origin, so each one
#     switches the family's arena (saves the origin's state, loads the fork's), as in the NIF

alias LuaSandbox.Session

Code.require_file("process_helpers.exs", __DIR__)

{:ok, _} = LuaSandbox.Supervisor.start_link(name: :bench_s_nif, max_concurrency: 2)

{:ok, _} =
  LuaSandbox.Supervisor.start_link(name: :bench_s_proc, max_concurrency: 2, isolation: :process)

n = String.to_integer(System.get_env("BENCH_N", "5000"))
me = self()

tools = %{
  id: fn [x] -> x end,
  park: fn _ ->
    send(me, :parked)
    Process.sleep(:infinity)
  end
}

start = fn sup ->
  {:ok, s} = Session.start_link(supervisor: sup, tools: tools)

  {:ok, _} =
    Session.run(s, "n = 1 function f(x) return x end function g(x) return tools.id(x) end")

  s
end

nif = start.(:bench_s_nif)
proc = start.(:bench_s_proc)
{:ok, %{value: 1}} = Session.call(nif, "f", [1])
{:ok, %{value: 1}} = Session.call(proc, "f", [1])
{:ok, %{value: 1}} = Session.call(proc, "g", [1])

call = fn s, name -> fn -> {:ok, %{value: 1}} = Session.call(s, name, [1]) end end
for _ <- 1..500, s <- [nif, proc], do: call.(s, "f").()

{calls_nif, calls_proc} =
  Enum.reduce(1..n, {[], []}, fn _, {a, b} ->
    {[Bench.Process.time_us(call.(nif, "f")) | a], [Bench.Process.time_us(call.(proc, "f")) | b]}
  end)

{tools_nif, tools_proc} =
  Enum.reduce(1..div(n, 5), {[], []}, fn _, {a, b} ->
    {[Bench.Process.time_us(call.(nif, "g")) | a], [Bench.Process.time_us(call.(proc, "g")) | b]}
  end)

killed = fn s, sup, source ->
  for _ <- 1..30 do
    caller = spawn(fn -> Session.run(s, source, max_instructions: 1_000_000_000_000) end)

    if source =~ "park" do
      receive do
        :parked -> :ok
      end
    else
      Bench.Process.until(fn -> LuaSandbox.Supervisor.running(sup) == 1 end)

      Process.sleep(2)
    end

    Bench.Process.time_us(fn ->
      Process.exit(caller, :kill)
      {:ok, %{value: 1}} = Session.run(s, "return n")
    end)
  end
end

kill_nif = killed.(nif, :bench_s_nif, "n = 2 while true do end")
kill_proc = killed.(proc, :bench_s_proc, "n = 2 while true do end")
park_nif = killed.(nif, :bench_s_nif, "n = 2 tools.park()")
park_proc = killed.(proc, :bench_s_proc, "n = 2 tools.park()")

starts = fn sup ->
  for _ <- 1..50 do
    Bench.Process.time_us(fn ->
      {:ok, s} = Session.start_link(supervisor: sup)
      Session.stop(s)
    end)
  end
end

start_nif = starts.(:bench_s_nif)
start_proc = starts.(:bench_s_proc)

fork_n = String.to_integer(System.get_env("BENCH_FORK_N", "300"))

forks = fn s ->
  for _ <- 1..fork_n do
    {us, {:ok, f}} = :timer.tc(fn -> Session.fork(s) end)
    Session.stop(f)
    us
  end
end

fork_calls = fn s ->
  {:ok, f} = Session.fork(s)

  samples =
    for _ <- 1..fork_n do
      {:ok, %{value: 1}} = Session.call(s, "f", [1])
      Bench.Process.time_us(call.(f, "f"))
    end

  Session.stop(f)
  samples
end

{fork_nif, fork_proc} = {forks.(nif), forks.(proc)}
{fork_call_nif, fork_call_proc} = {fork_calls.(nif), fork_calls.(proc)}

p = &Bench.Process.percentiles/1
r = &Bench.Process.row(&1, &2, "µs")

IO.puts("""
sessions on isolation: :process, #{n} alternating samples (2 cores, shared)

| measure | p50 | p99 | samples |
| --- | --- | --- | --- |
#{r.("NIF session call (`f(1)`)", p.(calls_nif))}
#{r.("worker session call (`f(1)`)", p.(calls_proc))}
#{r.("NIF session call making one tool call", p.(tools_nif))}
#{r.("worker session call making one tool call", p.(tools_proc))}
#{r.("NIF: caller killed in Lua -> next call answered", p.(kill_nif))}
#{r.("worker: caller killed in Lua -> next call answered", p.(kill_proc))}
#{r.("NIF: caller killed at a tool -> next call answered", p.(park_nif))}
#{r.("worker: caller killed at a tool -> next call answered", p.(park_proc))}
#{r.("NIF session start and stop", p.(start_nif))}
#{r.("worker session start and stop", p.(start_proc))}
#{r.("NIF fork start (`Session.fork/1`)", p.(fork_nif))}
#{r.("worker fork start (`Session.fork/1`)", p.(fork_proc))}
#{r.("NIF fork call after an origin call (`f(1)`, arena switched)", p.(fork_call_nif))}
#{r.("worker fork call after an origin call (`f(1)`, arena switched)", p.(fork_call_proc))}
""")
