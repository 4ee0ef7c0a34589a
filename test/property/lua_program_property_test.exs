defmodule LuaSandbox.LuaProgramPropertyTest do
  use ExUnit.Case, async: true

  import LuaSandbox.Generators, only: [cases: 1]

  alias LuaSandbox.{Error, LuaPrograms}

  @moduletag :property
  @moduletag timeout: :infinity

  # Each run must end on its own, well inside this bound (the kill at @kill_ms turns a hang
  # into :timeout, which fails the property).
  @bound_us 2_000_000
  @kill_ms 5_000

  # Like LuaSandbox.Generators.check/2 with fewer shrinks: a slow counterexample is re-run
  # at every shrink step.
  defp check(prop, n) do
    case :proper.quickcheck(prop, [{:numtests, n}, :quiet, {:max_shrinks, 30}]) do
      true -> true
      _ -> {:counterexample, :proper.counterexample()}
    end
  end

  defp limits(seed) do
    [
      # 20_000..200_000, log-uniform: most runs hit their limit, so small budgets keep the
      # average run around a millisecond.
      max_instructions: round(20_000 * :math.pow(10, rem(seed, 1001) / 1000)),
      max_memory: 2 * 1024 * 1024,
      max_output: 10_000,
      timeout: @kill_ms
    ]
  end

  defp outcome_ok?(src, seed) do
    {us, result} = :timer.tc(fn -> LuaSandbox.run(src, limits(seed)) end)

    clean =
      case result do
        {:ok, %LuaSandbox.Result{}} -> true
        {:error, %Error{kind: :timeout}} -> false
        {:error, %Error{kind: kind, message: m}} when is_binary(m) -> kind in Error.kinds()
        _ -> false
      end

    if clean and us < @bound_us do
      true
    else
      IO.puts(
        "\nbad outcome after #{div(us, 1000)} ms: #{inspect(result, limit: 5, printable_limit: 200)}"
      )

      false
    end
  end

  test "random Lua programs end cleanly (a value or a known error kind) within a bound" do
    prop =
      :proper.forall({LuaPrograms.program(), :proper_types.integer(0, 1_000_000)}, fn {src, seed} ->
        outcome_ok?(src, seed)
      end)

    assert check(prop, cases(10_000)) == true
    assert {:ok, %{value: 2}} = LuaSandbox.run("return 1 + 1")
  end

  test "random patterns in the string library end cleanly within a bound" do
    gen =
      {LuaPrograms.pattern(), :proper_types.integer(0, LuaPrograms.subject_max()),
       :proper_types.elements(["a", "ab", " ", "(a)", "aab"]),
       :proper_types.elements(["find", "match", "gsub", "gmatch"])}

    prop =
      :proper.forall(gen, fn {pat, n, unit, fun} ->
        subject = "string.rep(#{inspect(unit)}, #{n})"

        src =
          case fun do
            "gsub" ->
              "return string.gsub(#{subject}, #{inspect(pat)}, '%0')"

            "gmatch" ->
              "local n = 0 for _ in string.gmatch(#{subject}, #{inspect(pat)}) do n = n + 1 end return n"

            _ ->
              "return string.#{fun}(#{subject}, #{inspect(pat)})"
          end

        outcome_ok?(src, n)
      end)

    assert check(prop, div(cases(10_000), 10)) == true
  end
end
