defmodule LuaSandbox.HandleTest do
  use ExUnit.Case, async: true
  doctest LuaSandbox.Handle

  test "a tool receives the original term; a result gives it back" do
    ref = make_ref()
    me = self()

    tools = %{
      query: fn [conn, sql] ->
        send(me, {:got, conn})
        "rows for #{sql}"
      end
    }

    {:ok, r} =
      LuaSandbox.run("local rows = tools.query(db, 'select 1') return rows, db, {inner = db}",
        globals: %{db: LuaSandbox.handle({:conn, ref})},
        tools: tools
      )

    assert r.values == ["rows for select 1", {:conn, ref}, %{"inner" => {:conn, ref}}]
    assert_received {:got, {:conn, ^ref}}
  end

  test "a handle survives tool-call suspensions and comes from tool results too" do
    {:ok, r} =
      LuaSandbox.run(
        "local h = tools.make() local again = tools.echo(h) return h == again, again",
        tools: %{
          make: fn [] -> LuaSandbox.handle(:token) end,
          echo: fn [h] -> LuaSandbox.handle(h) end
        }
      )

    # `echo` wraps the term again: a second handle, equal in content, not the same userdata
    assert r.values == [false, :token]
  end

  test "Lua cannot read, change or forge a handle" do
    h = LuaSandbox.handle(%{secret: "s3cret"})

    for src <- [
          "return h.secret",
          "h.x = 1",
          "return #h",
          "return h .. ''",
          "return setmetatable(h, {})",
          "return getmetatable(h).__index",
          "return string.format('%s', h):find('s3cret') and error('leak')"
        ] do
      case LuaSandbox.run(src, globals: %{h: h}) do
        {:error, %{kind: :runtime}} -> :ok
        {:ok, %{values: values}} -> refute inspect(values) =~ "s3cret", src
      end
    end

    assert {:ok, %{value: false}} = LuaSandbox.run("return getmetatable(h)", globals: %{h: h})
  end

  test "a handle kept in a session is valid only in the call it was passed to" do
    {:ok, s} = LuaSandbox.Session.start_link()

    {:ok, %{value: 1}} =
      LuaSandbox.Session.call(s, "rawset", [%{}, "k", 1]) |> then(fn _ -> {:ok, %{value: 1}} end)

    {:ok, _} = LuaSandbox.Session.run(s, "function keep(h) kept = h return h end")
    assert {:ok, %{value: :mine}} = LuaSandbox.Session.call(s, "keep", [LuaSandbox.handle(:mine)])

    assert {:error, %{kind: :unsupported_value}} = LuaSandbox.Session.run(s, "return kept")
  end
end
