defmodule LuaSandbox.SlotMemoryTest do
  # Slots keep their arena reserved, not resident: after runs that grew the Lua heap, the
  # pages above the pristine snapshot go back to the OS when the slot is restored.
  use ExUnit.Case, async: false

  defp rss_bytes do
    [_size, resident | _] =
      File.read!("/proc/self/statm") |> String.split() |> Enum.map(&String.to_integer/1)

    resident * 4096
  end

  @big "local t = {} for i = 1, 50 do t[i] = string.rep(string.char(64 + i % 26), 1024 * 1024) end return #t"

  test "RSS returns to its baseline after a burst of 50 MiB runs" do
    # Warm up: slots exist, code is loaded.
    for _ <- 1..4, do: {:ok, _} = LuaSandbox.run(@big, max_memory: 128 * 1024 * 1024)
    :erlang.garbage_collect()
    Process.sleep(200)
    baseline = rss_bytes()

    1..8
    |> Task.async_stream(
      fn _ -> LuaSandbox.run(@big, max_memory: 128 * 1024 * 1024) end,
      max_concurrency: System.schedulers_online() * 2,
      timeout: 60_000
    )
    |> Enum.each(fn {:ok, {:ok, r}} -> assert r.stats.memory_peak > 50 * 1024 * 1024 end)

    Process.sleep(1000)
    after_burst = rss_bytes()
    # 10 % of the baseline plus a few MiB of slack for the BEAM's own allocators.
    assert after_burst <= baseline * 1.1 + 8 * 1024 * 1024,
           "baseline #{div(baseline, 1024)} KiB, after #{div(after_burst, 1024)} KiB"
  end
end
