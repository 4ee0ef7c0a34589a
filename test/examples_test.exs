defmodule LuaSandbox.ExamplesTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureIO

  test "examples/agent.exs runs and handles each kind of script" do
    output =
      capture_io(fn ->
        {results, _} = Code.eval_file("examples/agent.exs")
        send(self(), {:results, results})
      end)

    assert_received {:results, results}
    results = Map.new(results)

    assert {:ok, %{"task" => "summarise", "words" => ["one", "two", "three"]}} =
             results["a good script"]

    assert {:retry, "fix the syntax: " <> _} = results["a syntax error"]
    assert {:retry, "it failed: " <> _} = results["a runtime error"]
    assert {:retry, "too slow: do less work"} = results["an endless loop"]
    assert {:retry, "return plain data: " <> _} = results["a function in the result"]
    assert output =~ "a good script"
  end
end
