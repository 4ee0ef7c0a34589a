# Measurements behind two cluster choices (not part of `make bench`; the machine's noise
# dominates them). Run with: MIX_ENV=test mix run bench/cluster_extra.exs
#
# 1. What a member's load publication costs: publications sent to one view, and the member's
#    reductions, over 5 s idle and 5 s busy.
# 2. Head-of-line blocking (max_remote_bytes): small remote calls' p50/p99/max while runs with
#    large inputs stream to the same peer at about 64 MiB/s, for several input sizes.

Code.require_file("../test/support/peer.ex", __DIR__)

alias LuaSandbox.{Cluster, TestPeer}

## 1. publication

{:ok, _} = LuaSandbox.Supervisor.start_link(name: PubBench, max_concurrency: 8, cluster: true)
Process.sleep(100)
[member] = :pg.get_members(Cluster.scope(), PubBench)

counter =
  spawn(fn ->
    loop = fn loop, n ->
      receive do
        {:count, from} -> send(from, n) && loop.(loop, 0)
        {:load, _, _, _, _} -> loop.(loop, n + 1)
      end
    end

    loop.(loop, 0)
  end)

:ok = :pg.join(Cluster.scope(), Cluster.views_group(), counter)

count = fn ->
  send(counter, {:count, self()})

  receive do
    n when is_integer(n) -> n
  end
end

reductions = fn -> member |> Process.info(:reductions) |> elem(1) end

window = fn label ->
  count.()
  r0 = reductions.()
  Process.sleep(5000)
  IO.puts("#{label} 5 s: #{count.()} publications, member #{reductions.() - r0} reductions")
end

window.("idle")

workers =
  for _ <- 1..4 do
    spawn(fn ->
      fn -> LuaSandbox.run("return 1", supervisor: PubBench) end
      |> Stream.repeatedly()
      |> Stream.run()
    end)
  end

Process.sleep(200)
window.("busy (4 processes looping `return 1`)")
Enum.each(workers, &Process.exit(&1, :kill))

## 2. head-of-line blocking

{_peer, node} = TestPeer.start()
small = fn -> {:ok, _} = LuaSandbox.run("return 1", node: node) end

measure = fn ->
  for _ <- 1..50, do: small.()

  lat =
    for _ <- 1..400 do
      {us, _} = :timer.tc(small)
      Process.sleep(2)
      us
    end
    |> Enum.sort()

  "p50 #{Enum.at(lat, 200)} µs, p99 #{Enum.at(lat, 396)} µs, max #{List.last(lat)} µs"
end

IO.puts("small remote calls, quiet: " <> measure.())

for mib <- [1, 4, 16, 64, 1] do
  blob = :binary.copy("x", mib * 1024 * 1024)

  streamer =
    spawn(fn ->
      fn ->
        LuaSandbox.run("return 1",
          node: node,
          globals: %{blob: blob},
          max_memory: 512 * 1024 * 1024,
          max_remote_bytes: 1024 * 1024 * 1024
        )

        # about 64 MiB/s whatever the size
        Process.sleep(mib * 16)
      end
      |> Stream.repeatedly()
      |> Stream.run()
    end)

  Process.sleep(300)
  IO.puts("while #{mib} MiB inputs stream: " <> measure.())
  Process.exit(streamer, :kill)
  Process.sleep(500)
end
