defmodule LuaSandbox.TestRemote do
  @moduledoc false
  # Functions the tests call on peer nodes (test modules themselves exist only on the runner).

  @doc """
  Starts `source` in a process, kills it after `delay_ms`, and times a fresh run from the kill
  to its result. Returns `{elapsed_us, finished_before_kill?}`.
  """
  def kill_then_run(source, opts, delay_ms \\ 50) do
    parent = self()

    pid =
      spawn(fn ->
        send(parent, :started)
        LuaSandbox.run(source, opts)
        send(parent, :finished)
      end)

    receive do
      :started -> :ok
    end

    Process.sleep(delay_ms)
    t0 = System.monotonic_time(:microsecond)
    Process.exit(pid, :kill)
    dirty_probe!()
    elapsed = System.monotonic_time(:microsecond) - t0

    finished? =
      receive do
        :finished -> true
      after
        0 -> false
      end

    {elapsed, finished?}
  end

  @doc """
  A run that can only finish on a dirty CPU scheduler, the probe of every "kill frees the
  scheduler" measurement: it is given a tool and calls it. A run with tools never takes the
  first attempt on the caller's normal scheduler, and a first attempt cannot call a tool, so
  `stats.tool_calls == 1` asserts the run went the dirty path (started and resumed there).
  `kill_test.exs` checks that it cannot finish while the only dirty CPU scheduler is held.
  """
  def dirty_probe! do
    {:ok, %{value: 2, stats: %{tool_calls: 1}}} =
      LuaSandbox.run("tools.noop() return 1 + 1", tools: %{noop: fn _ -> nil end})

    :ok
  end

  @doc """
  Holds the only dirty CPU scheduler with an endless run, starts `dirty_probe!/0` beside it
  and reports `{finished_while_held?, finished_after_release?}`: a probe that can fail gives
  `{false, true}`.
  """
  def probe_while_held(wait_ms) do
    parent = self()
    endless = "while true do end"
    holder = spawn(fn -> LuaSandbox.run(endless, max_instructions: 1_000_000_000_000_000) end)
    Process.sleep(100)

    prober =
      spawn(fn ->
        dirty_probe!()
        send(parent, {:probed, self()})
      end)

    early? =
      receive do
        {:probed, ^prober} -> true
      after
        wait_ms -> false
      end

    Process.exit(holder, :kill)

    late? =
      receive do
        {:probed, ^prober} -> true
      after
        10_000 -> false
      end

    {early?, early? or late?}
  end

  @doc "Kills `n` runs of `source` in a row; returns the OS process's RSS before and after (KiB)."
  def kill_many(source, opts, n) do
    run_kills(source, opts, div(n, 10))
    :erlang.garbage_collect()
    before = rss_kib()
    run_kills(source, opts, n)
    for p <- Process.list(), do: :erlang.garbage_collect(p)
    {before, rss_kib()}
  end

  defp run_kills(source, opts, n) do
    for _ <- 1..n do
      {pid, ref} = spawn_monitor(fn -> LuaSandbox.run(source, opts) end)
      Process.sleep(1)
      Process.exit(pid, :kill)

      receive do
        {:DOWN, ^ref, _, _, _} -> :ok
      end
    end
  end

  @doc "A tool for tests: sleeps `ms` milliseconds."
  def sleep_tool([ms]), do: Process.sleep(ms)

  @doc """
  A tool for tests: tells the process registered as `:cluster_probe` on node `runner` that a run
  started here (`{:cluster_probe, node()}`), then sleeps `ms` milliseconds.
  """
  def probe([runner, ms]) do
    send({:cluster_probe, String.to_atom(runner)}, {:cluster_probe, node()})
    Process.sleep(ms)
  end

  @doc "A tool for tests: the node the tool runs on."
  def whereami(_args), do: Atom.to_string(node())

  def rss_kib do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      case String.split(line) do
        ["VmRSS:", kib, "kB"] -> String.to_integer(kib)
        _ -> nil
      end
    end)
  end
end
