defmodule LuaSandbox.StretchFormatter do
  @moduledoc false
  # `make stretch` only: an ExUnit formatter that keeps the name of the test that started last
  # in the file named by LUA_SANDBOX_STRETCH_TEST, which the hole finder's build
  # (native/lua_sandbox_core/src/stretch.rs) copies into each stretch it logs. `make stretch`
  # runs one test module at a time (`--max-cases 1`), so that name is the running test.
  use GenServer

  def init(_opts), do: {:ok, System.fetch_env!("LUA_SANDBOX_STRETCH_TEST")}

  def handle_cast({:test_started, %ExUnit.Test{module: module, name: name}}, path) do
    File.write!(path, "#{inspect(module)} #{name}")
    {:noreply, path}
  end

  def handle_cast(_event, path), do: {:noreply, path}
end
