defmodule LuaSandbox.TestWait do
  @moduledoc false
  # The one polling helper of the test suites: `import LuaSandbox.TestWait`.

  import ExUnit.Assertions, only: [flunk: 1]

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
end
