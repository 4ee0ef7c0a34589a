defmodule LuaSandbox.HostWalkTest do
  # Host data is walked in O(what the run's limits let in), never in O(the tree a term stands
  # for) (issue 16 item 5). `Enum.reduce(1..40, [], fn _, a -> [a, a] end)` is 40 cells that
  # stand for 2^40 values: every walk on the Elixir side (LuaSandbox.Encoding, the remote-size
  # check) and every copy to another process used to expand it, which never ended. Each entry
  # here hands such a term to a run and must get the run's usual error within seconds.
  use ExUnit.Case, async: true

  alias LuaSandbox.{Cluster, Error, Session}

  # ~0.2 s each on a quiet machine; the margin is for a loaded one.
  @within_ms 10_000

  defp shared(n), do: Enum.reduce(1..n, [], fn _, a -> [a, a] end)

  # Runs `fun` in a fresh process that builds the term itself: handing a shared term to
  # another process copies it expanded, so the test must not do that either.
  defp within(fun) do
    me = self()
    pid = spawn(fn -> send(me, {:walked, fun.()}) end)

    receive do
      {:walked, result} -> result
    after
      @within_ms ->
        Process.exit(pid, :kill)
        flunk("no answer within #{@within_ms} ms")
    end
  end

  defp session_with(opts, fun) do
    {:ok, s} = Session.start_link(opts)

    try do
      fun.(s)
    after
      Session.stop(s)
    end
  end

  # name => fn make -> the result of a run (or session call) that hands the term `make.()`
  # builds to the heap. A tool builds the term itself: a fun that closed over it would be
  # copied, expanded, to the process that runs the tool or holds the session.
  defp entries do
    %{
      globals: &LuaSandbox.run("return 1", globals: %{d: &1.()}),
      globals_in_a_task: &LuaSandbox.run("return 1", globals: %{d: &1.()}, timeout: 60_000),
      call_args: &LuaSandbox.run("function f() end", call: {"f", [&1.()]}),
      async: &(LuaSandbox.async("return 1", globals: %{d: &1.()}) |> LuaSandbox.await(60_000)),
      async_stream: fn make ->
        [r] = Enum.to_list(LuaSandbox.async_stream(["return 1"], globals: %{d: make.()}))
        r
      end,
      tool_result: &LuaSandbox.run("return tools.t()", tools: %{t: fn _ -> &1.() end}),
      tool_result_with_deadline:
        &LuaSandbox.run("return tools.t()", tools: %{t: fn _ -> &1.() end}, timeout: 60_000),
      session_start: fn make ->
        case Session.start_link(globals: %{d: make.()}) do
          {:ok, s} -> Session.stop(s)
          other -> other
        end
      end,
      session_globals: fn make ->
        session_with([], &Session.run(&1, "return 1", globals: %{d: make.()}))
      end,
      session_call: fn make ->
        session_with([], fn s ->
          {:ok, _} = Session.run(s, "function f() end")
          Session.call(s, "f", [make.()])
        end)
      end,
      session_set: fn make -> session_with([], &Session.set(&1, "d", make.())) end,
      session_tool_result: fn make ->
        session_with([tools: %{t: fn _ -> make.() end}], &Session.run(&1, "return tools.t()"))
      end
    }
  end

  test "every entry: a term standing for 2^40 values is refused at the memory limit, quickly" do
    for {name, entry} <- entries() do
      assert {:ok, _} = within(fn -> entry.(fn -> shared(4) end) end) |> ok_or_stopped(),
             "#{name}"

      assert {:error, %Error{kind: :memory_limit}} =
               within(fn -> entry.(fn -> shared(40) end) end),
             "#{name}"
    end
  end

  defp ok_or_stopped(:ok), do: {:ok, :stopped}
  defp ok_or_stopped(other), do: other

  test "the walk stops at max_instructions when that is the smaller bound" do
    assert {:error, %Error{kind: :instruction_limit, message: message}} =
             within(fn ->
               LuaSandbox.run("return 1", globals: %{d: shared(40)}, max_instructions: 10_000)
             end)

    assert message =~ "globals"
  end

  test "the walk stops at the deadline" do
    # A 1 GiB heap lets 64 M values in: longer than the deadline to walk.
    {us, result} =
      :timer.tc(fn ->
        within(fn ->
          LuaSandbox.run("return 1",
            globals: %{d: shared(40)},
            max_memory: 1024 * 1024 * 1024,
            timeout: 100
          )
        end)
      end)

    assert {:error, %Error{kind: :timeout}} = result
    assert us < 5_000_000, "took #{div(us, 1000)} ms"
  end

  test "values made by encoding count: tuples become lists" do
    assert {:error, :memory_limit} =
             LuaSandbox.Encoding.encode(
               {[1], %{a: {2, 3}}} |> List.duplicate(2) |> List.to_tuple(),
               LuaSandbox.Encoding.bound(16 * 4, nil, nil)
             )
  end

  test "the size check before sending to another node is bounded too" do
    assert %Error{kind: :invalid_input, message: message} =
             within(fn ->
               opts = LuaSandbox.Options.validate!(globals: %{d: shared(40)})
               Cluster.too_large("return 1", opts)
             end)

    assert message =~ "max_remote_bytes"
  end
end
