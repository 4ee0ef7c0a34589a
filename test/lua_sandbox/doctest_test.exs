defmodule LuaSandbox.DocTest do
  # The examples in the docs of the modules besides LuaSandbox (doctested in lua_sandbox_test.exs).
  use ExUnit.Case, async: true

  doctest LuaSandbox.Error
  doctest LuaSandbox.Encoder
  doctest LuaSandbox.Session
end
