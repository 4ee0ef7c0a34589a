defmodule LuaSandbox.Worker.HandlesTest do
  # The BEAM's half of handles under isolation: :process (LuaSandbox.Worker.Handles): what the
  # swap does to a request's values and to a worker's answer, and a session's rollback rule.
  # The answers themselves are held equal to the NIF's by handle_test.exs under both isolations.
  use ExUnit.Case, async: true

  alias LuaSandbox.Worker.Handles

  defp opts(globals, call \\ nil), do: %{globals: globals, call: call, rollback: true}
  defp h(term), do: LuaSandbox.handle(term)

  test "handles become {:handle, index}; plain data crosses uncopied" do
    input = opts([{"p", %{"a" => [1, 2.5, "x", :y, %{b: [nil]}]}}])
    {{:run, "src", o}, t} = Handles.wire({:run, "src", input}, Handles.new())
    assert [{"p", p}] = o.globals
    assert :erts_debug.same(p, elem(hd(input.globals), 1))
    assert t.next == 0

    {{:run, "src", o}, t} =
      Handles.wire(
        {:run, "src", opts([{"a", h(:a)}, {"b", %{k: [1, h(:b)]}}], {"f", [h(:c)]})},
        Handles.new()
      )

    assert o.globals == [{"a", {:handle, 0}}, {"b", %{k: [1, {:handle, 1}]}}]
    assert o.call == {"f", [{:handle, 2}]}
    assert t.terms == %{0 => :a, 1 => :b, 2 => :c}

    # a tool's reply
    {{:reply, {:ok, [{:handle, 3}]}}, t} = Handles.wire({:reply, {:ok, [h(:d)]}}, t)
    assert t.next == 4
    # other requests are left alone
    assert {:ping, ^t} = Handles.wire(:ping, t)
    assert {{:reply, {:error, "x"}}, ^t} = Handles.wire({:reply, {:error, "x"}}, t)
  end

  test "no user term takes the wire form: a tuple left becomes {}; structs and keys stay" do
    struct = %URI{host: h(:inside)}
    key = h(:key)
    value = [{:handle, 0}, struct, %{key => 1}, [1 | h(:tail)]]
    {{:run, _, o}, t} = Handles.wire({:run, "", opts([{"v", value}])}, Handles.new())
    # the worker refuses `{}` as the tuple it is, a struct whole, a map key that is not a scalar,
    # and an improper list, each as it would the original
    assert o.globals == [{"v", [{}, struct, %{key => 1}, [1 | h(:tail)]]}]
    assert t.next == 0
  end

  test "answers give the terms back; an index the worker does not have, or a tuple, is an error" do
    {_, t} = Handles.wire({:run, "", opts([{"a", h(:a)}])}, Handles.new())
    stats = %{instructions: 1}

    assert {:ok, {:ok, [:a, %{"x" => [:a]}], "out", ^stats}, ^t} =
             Handles.unwire({:ok, [{:handle, 0}, %{"x" => [{:handle, 0}]}], "out", stats}, t)

    assert {:ok, {:tool_call, "t", [:a]}, ^t} =
             Handles.unwire({:tool_call, "t", [{:handle, 0}]}, t)

    assert {:ok, {:error, {:runtime, "m", 1, nil, [:a]}, "", ^stats}, ^t} =
             Handles.unwire({:error, {:runtime, "m", 1, nil, [{:handle, 0}]}, "", stats}, t)

    # a result without handles is not copied
    values = [%{"big" => Enum.to_list(1..100)}]
    {:ok, {:ok, back, _, _}, _} = Handles.unwire({:ok, values, "", stats}, t)
    assert :erts_debug.same(back, values)

    for bad <- [{:handle, 1}, {:handle, -1}, {:handle, :a}, {:a, 0}, {}] do
      assert {:error, "it named " <> _} = Handles.unwire({:ok, [[bad]], "", stats}, t)
      assert {:error, _} = Handles.unwire({:ok, [%{bad => 1}], "", stats}, t)
    end

    assert {:ok, :pong, ^t} = Handles.unwire(:pong, t)
  end

  describe "a session's handles" do
    defp call(t, handles, rollback \\ true) do
      o = %{opts(Enum.map(handles, &{"g", h(&1)})) | rollback: rollback}
      {{:session_run, nil, _}, t} = Handles.wire({:session_run, nil, o}, t)
      t
    end

    defp ok(t), do: elem(Handles.unwire({:ok, [], "", %{}}, t), 2)

    defp failed(t),
      do: elem(Handles.unwire({:error, {:runtime, "", nil, nil, nil}, "", %{}}, t), 2)

    defp parked(t), do: elem(Handles.unwire({:tool_call, "t", []}, t), 2)

    test "a call's handles stay unless it is rolled back; indices are never handed out twice" do
      {{:session_new, _}, t} =
        Handles.wire({:session_new, opts([{"s", h(:start)}])}, Handles.new())

      assert %{start: 1, next: 1} = t

      t = t |> call([:kept]) |> ok()
      assert t.terms == %{0 => :start, 1 => :kept}
      # a failed call with rollback forgets its handles, even parked at a tool first
      t = t |> call([:lost]) |> parked() |> failed()
      assert t.terms == %{0 => :start, 1 => :kept}
      assert %{next: 3, pending: nil} = t
      # without rollback it keeps them
      t = t |> call([:no_rollback], false) |> failed()
      assert t.terms == %{0 => :start, 1 => :kept, 3 => :no_rollback}
      # a call dropped while parked (its caller died) is rolled back
      t = t |> call([:dropped]) |> parked() |> Handles.dropped()
      assert Map.values(t.terms) -- [:start, :kept, :no_rollback] == []
      # so is one still pending when the next starts (the worker drops it first)
      t = t |> call([:superseded]) |> parked() |> call([:next]) |> ok()
      assert Map.values(t.terms) -- [:start, :kept, :no_rollback, :next] == []
      # a restarted worker has the start's only; no index comes back
      t = Handles.restarted(t)
      assert t.terms == %{0 => :start}
      assert t.next == 7
      # dropped with nothing pending: nothing to forget
      assert Handles.dropped(t) == t
    end
  end
end
