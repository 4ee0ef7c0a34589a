defmodule LuaSandbox.TestStream do
  @moduledoc false

  @doc "Everything streamed to this process so far (`{:lua_print, chunk}`), in order."
  def streamed(acc \\ "") do
    receive do
      {:lua_print, chunk} -> streamed(acc <> chunk)
    after
      0 -> acc
    end
  end
end
