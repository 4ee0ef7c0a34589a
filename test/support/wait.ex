defmodule LuaSandbox.TestWait do
  @moduledoc false
  # The one polling helper of the test suites: `import LuaSandbox.TestWait`.

  import ExUnit.Assertions, only: [flunk: 1]

  @doc """
  A tool `wait` that parks the script calling it for good, telling `pid` `{:parked, tool_pid}`
  first (the tests of a call killed while parked at a tool).
  """
  def parking_tools(pid) do
    %{
      wait: fn _ ->
        send(pid, {:parked, self()})
        Process.sleep(:infinity)
      end
    }
  end

  @doc """
  Polls `fun` every millisecond or so until it returns truthy (then `true`, so `assert
  wait_until(...)` reads well) or `timeout_ms` has passed (then the test fails). The timeout only
  matters when something is broken, so it is wide for a loaded machine.
  """
  def wait_until(fun, timeout_ms \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    poll(fun, deadline, timeout_ms)
  end

  defp poll(fun, deadline, timeout_ms) do
    cond do
      fun.() ->
        true

      System.monotonic_time(:millisecond) > deadline ->
        flunk("condition never became true within #{timeout_ms} ms")

      true ->
        Process.sleep(2)
        poll(fun, deadline, timeout_ms)
    end
  end

  @doc """
  Polls `fun` every millisecond or so until it returns truthy: the milliseconds that took, or
  `nil` once `ms` have passed (for tests that measure how long something took).
  """
  def within(ms, fun, started \\ System.monotonic_time(:millisecond)) do
    now = System.monotonic_time(:millisecond)

    cond do
      fun.() -> now - started
      now - started > ms -> nil
      true -> Process.sleep(1) && within(ms, fun, started)
    end
  end

  @doc "Whether the OS process `os_pid` is running (not gone, not a zombie)."
  def os_alive?(os_pid) do
    case File.read("/proc/#{os_pid}/status") do
      {:ok, s} -> not (s =~ ~r/^State:\s+Z/m)
      _ -> false
    end
  end
end
