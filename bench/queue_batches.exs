# Run alone with: MIX_ENV=prod mix run -e 'Code.require_file("bench/queue_batches.exs"); Bench.QueueBatches.main()'
# (bench/run.exs section 9 uses measure/1). Works on any version of the library, so the same
# file measures before and after the queue.
#
# Issue 20's queueing scenario: a saturated supervisor (max_concurrency 4) kept busy by 4
# callers that retry at once whenever they are refused, while batches of 16 scripts of
# ≤ 5 ms of CPU go through LuaSandbox.async_stream/2 (max_concurrency 16). Prints the mean,
# p50 and worst batch time, the items that timed out waiting, and the retriers' runs. Runs on any version of the library: with
# the queue (queue_timeout:) the retriers pass queue_timeout: 0; without it (the polling
# async_stream) they just call run/2, which answered :overloaded at once.

defmodule Bench.QueueBatches do
  @moduledoc false

  @batches String.to_integer(System.get_env("BATCHES", "20"))
  # each item's timeout (async_stream's, queueing included): a starved item gives :timeout
  @item_timeout String.to_integer(System.get_env("ITEM_TIMEOUT", "10000"))
  @work "local t = os.clock() while os.clock() - t < 0.004 do end return n"

  def main do
    r = measure(@batches)

    IO.puts(
      "#{r.mode}: #{@batches} batches of 16, mean #{ms(r.mean)}, p50 #{ms(r.p50)}, " <>
        "worst #{ms(r.worst)}; items starved (:timeout after #{@item_timeout} ms): " <>
        "#{r.starved} of #{16 * @batches}; retriers ran #{r.retried} scripts"
    )
  end

  @doc "`batches` timed batches: `%{mode, times (µs), mean, p50, worst, starved, retried}`."
  def measure(batches) do
    sup = Bench.QueueSup
    {:ok, _} = LuaSandbox.Supervisor.start_link(name: sup, max_concurrency: 4)
    queue? = Keyword.has_key?(LuaSandbox.Options.defaults(), :queue_timeout)
    retry_opts = [supervisor: sup] ++ if(queue?, do: [queue_timeout: 0], else: [])
    # sanity: a batch computes what it should
    expected = Enum.to_list(1..16)
    ^expected = batch(sup) |> Enum.map(fn {:ok, r} -> r.value end)

    runs = :counters.new(1, [])
    retriers = for _ <- 1..4, do: spawn(fn -> retry(retry_opts, runs) end)
    Process.sleep(200)

    {times, starved} =
      for _ <- 1..batches, reduce: {[], 0} do
        {times, starved} ->
          {us, results} = :timer.tc(fn -> batch(sup) end)
          # only a run that never got a slot fails here
          bad = Enum.reject(results, &match?({:ok, _}, &1))
          [] = Enum.reject(bad, &match?({:error, %{kind: :timeout}}, &1))
          {[us | times], starved + length(bad)}
      end

    Enum.each(retriers, &Process.exit(&1, :kill))
    sorted = Enum.sort(times)

    %{
      mode: if(queue?, do: "queue", else: "polling"),
      times: times,
      mean: Enum.sum(times) / length(times),
      p50: Enum.at(sorted, div(length(sorted), 2)),
      worst: List.last(sorted),
      starved: starved,
      retried: :counters.get(runs, 1)
    }
  end

  defp batch(sup) do
    1..16
    |> Enum.map(&{@work, globals: %{n: &1}})
    |> LuaSandbox.async_stream(supervisor: sup, max_concurrency: 16, timeout: @item_timeout)
    |> Enum.to_list()
  end

  defp retry(opts, runs) do
    case LuaSandbox.run(@work, [globals: %{n: 0}] ++ opts) do
      {:ok, _} -> :counters.add(runs, 1, 1)
      {:error, %{kind: :overloaded}} -> :ok
    end

    retry(opts, runs)
  end

  defp ms(us), do: "#{Float.round(us / 1000, 1)} ms"
end
