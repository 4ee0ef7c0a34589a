defmodule LuaSandbox.ReadmeTest do
  # The README's Elixir examples must run as shown: each ```elixir block is evaluated, and its
  # pattern matches are its assertions.
  use ExUnit.Case, async: true

  @readme Path.expand("../README.md", __DIR__)
  @external_resource @readme

  blocks =
    Regex.scan(~r/```elixir\n(.*?)```/s, File.read!(@readme), capture: :all_but_first)
    |> List.flatten()

  test "the README has runnable examples" do
    assert length(unquote(blocks)) >= 2
  end

  for {block, i} <- Enum.with_index(blocks, 1) do
    test "README example #{i} runs" do
      Code.eval_string(unquote(block), [], file: "README.md")
    end
  end
end
