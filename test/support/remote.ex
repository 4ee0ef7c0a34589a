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
    {:ok, %{value: 2}} = LuaSandbox.run("return 1 + 1")
    elapsed = System.monotonic_time(:microsecond) - t0

    finished? =
      receive do
        :finished -> true
      after
        0 -> false
      end

    {elapsed, finished?}
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
