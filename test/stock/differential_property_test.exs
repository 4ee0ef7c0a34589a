defmodule LuaSandbox.Stock.DifferentialPropertyTest do
  # Generated programs (LuaSandbox.StockLua.Programs) return the same values, print the same
  # output and raise the same error messages in the sandbox as in an unpatched Lua 5.4.9.
  use ExUnit.Case, async: true

  import LuaSandbox.Generators, only: [cases: 1]

  alias LuaSandbox.StockLua
  alias LuaSandbox.StockLua.Programs

  @moduletag :property
  @moduletag timeout: :infinity

  test "the sandbox behaves as stock Lua 5.4.9 on generated programs" do
    port = StockLua.open()

    prop =
      :proper.forall(Programs.program(), fn prog ->
        {stock, sandbox} = StockLua.compare(port, Programs.render(prog))
        # a program stock Lua cannot finish in time (an unbounded C loop) proves nothing
        match?(%{result: {:stock_failed, _}}, stock) or stock == sandbox
      end)

    n = cases(10_000)

    case :proper.quickcheck(prop, [{:numtests, n}, :quiet, {:max_shrinks, 100}]) do
      true ->
        :ok

      _ ->
        [prog] = :proper.counterexample()
        src = Programs.render(prog)
        {stock, sandbox} = StockLua.compare(port, src)

        flunk(
          "program:\n#{src}\nstock:   #{inspect(stock, printable_limit: :infinity)}" <>
            "\nsandbox: #{inspect(sandbox, printable_limit: :infinity)}"
        )
    end
  end
end
