defmodule LuaSandbox.SessionMemoryTest do
  # Measures the whole VM's resident set: synchronous, so that no async test (big session
  # states, fork images, slot pools) allocates beside it while it measures.
  use ExUnit.Case, async: false

  alias LuaSandbox.Session

  test "10 000 sessions started and stopped leave memory flat" do
    rss = fn ->
      [_, r | _] =
        File.read!("/proc/self/statm") |> String.split() |> Enum.map(&String.to_integer/1)

      r * 4096
    end

    cycle = fn n ->
      for _ <- 1..n do
        {:ok, s} = Session.start_link(globals: %{x: 1})
        {:ok, _} = Session.run(s, "y = string.rep('z', 1000)")
        Session.stop(s)
      end
    end

    cycle.(500)
    :erlang.garbage_collect()
    before = rss.()
    cycle.(10_000)
    :erlang.garbage_collect()
    Process.sleep(100)
    after_ = rss.()

    assert after_ <= before * 1.1 + 8 * 1024 * 1024,
           "#{div(before, 1024)} KiB -> #{div(after_, 1024)} KiB"
  end
end
