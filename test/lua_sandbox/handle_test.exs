# Under both isolations (LuaSandbox.Isolation): LuaSandbox.HandleTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.HandleTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation
    if isolation == :nif, do: doctest(LuaSandbox.Handle)

    defp lua_run(source, opts),
      do: LuaSandbox.run(source, LuaSandbox.Isolation.opts(@isolation, opts))

    defp start_session(opts),
      do: LuaSandbox.Session.start_link(LuaSandbox.Isolation.opts(@isolation, opts))

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
        lua_run("local rows = tools.query(db, 'select 1') return rows, db, {inner = db}",
          globals: %{db: LuaSandbox.handle({:conn, ref})},
          tools: tools
        )

      assert r.values == ["rows for select 1", {:conn, ref}, %{"inner" => {:conn, ref}}]
      assert_received {:got, {:conn, ^ref}}
    end

    test "a handle survives tool-call suspensions and comes from tool results too" do
      {:ok, r} =
        lua_run(
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
        case lua_run(src, globals: %{h: h}) do
          {:error, %{kind: :runtime}} -> :ok
          {:ok, %{values: values}} -> refute inspect(values) =~ "s3cret", src
        end
      end

      assert {:ok, %{value: false}} = lua_run("return getmetatable(h)", globals: %{h: h})
    end

    test "a handle kept in a session stays valid for the session's life; rolled back with a call" do
      me = self()
      tools = %{use: fn [h] -> send(me, {:used, h}) && :ok end}
      {:ok, s} = start_session(tools: tools)

      {:ok, _} =
        LuaSandbox.Session.run(s, """
        function keep(h) kept = h return h end
        function keep_then_fail(h) lost = h error('no') end
        """)

      assert {:ok, %{value: :mine}} =
               LuaSandbox.Session.call(s, "keep", [LuaSandbox.handle(:mine)])

      assert {:ok, %{value: :mine}} = LuaSandbox.Session.run(s, "return kept")
      assert {:ok, _} = LuaSandbox.Session.run(s, "tools.use(kept)")
      assert_received {:used, :mine}
      assert {:ok, %{value: "userdata"}} = LuaSandbox.Session.run(s, "return type(kept)")

      assert {:error, %{kind: :runtime}} =
               LuaSandbox.Session.call(s, "keep_then_fail", [LuaSandbox.handle(:lost)])

      assert {:ok, %{values: [nil, :mine]}} = LuaSandbox.Session.run(s, "return lost, kept")
      # a handle made after the rollback reuses nothing of the lost one's
      assert {:ok, %{value: :new}} = LuaSandbox.Session.call(s, "keep", [LuaSandbox.handle(:new)])
      assert {:ok, %{value: :new}} = LuaSandbox.Session.run(s, "return kept")
    end

    test "a userdata that is not one of the run's handles is a Lua error at the tool call" do
      me = self()
      tools = %{use: fn args -> send(me, {:used, args}) && "done" end}

      src = """
      local ok, err = pcall(tools.use, 1, {io.stdout})
      return ok, err, tools.use(h)
      """

      assert {:ok, %{values: [false, message, "done"]}} =
               lua_run(src, tools: tools, globals: %{h: LuaSandbox.handle(:mine)})

      assert message =~ "tool 'use': userdata cannot be passed to a tool (at tools.use[2][1])"
      # the refused call never reached the tool; the next one did, and counted
      refute_received {:used, [1 | _]}
      assert_received {:used, [:mine]}

      # uncaught, it ends the run as a runtime error naming the tool
      assert {:error, %{kind: :runtime, message: m}} =
               lua_run("tools.use(io.stdout)", tools: tools)

      assert m =~ "script:1: tool 'use': userdata cannot be passed to a tool (at tools.use[1])"
    end

    test "a handle in a session's start_link globals is valid for the session's life" do
      me = self()
      tools = %{use: fn [h] -> send(me, {:used, h}) && "done" end}
      {:ok, s} = start_session(tools: tools, globals: %{db: LuaSandbox.handle(:db)})
      assert {:ok, %{value: :db}} = LuaSandbox.Session.run(s, "return db")
      assert {:ok, %{value: "done"}} = LuaSandbox.Session.run(s, "return tools.use(db)")
      assert_received {:used, :db}
    end

    test "an ordinary tuple stays an ordinary value (a list), never a handle" do
      # the shape a handle crosses to a worker in (LuaSandbox.Worker.Handles), as user data
      {:ok, r} =
        lua_run("return type(t), t[1], t[2], h, tools.t()[1]",
          globals: %{t: {:handle, 0}, h: LuaSandbox.handle(:real)},
          tools: %{t: fn [] -> {:handle, 0} end}
        )

      assert r.values == ["table", "handle", 0, :real, "handle"]
    end

    test "handles deep in globals, call arguments and tool results; each is its own" do
      h = LuaSandbox.handle(%{conn: 1})

      tools = %{
        echo: fn args -> args end,
        make: fn [] -> %{"x" => [LuaSandbox.handle(:made)]} end
      }

      src = """
      function f(a, b) return a, b end
      local e = tools.echo(deep.list[2], deep.list[2].inner)
      return deep.list[2].inner == again, e, tools.make().x[1], deep.list[2].inner == deep.list[2].inner
      """

      {:ok, r} =
        lua_run(src,
          globals: %{deep: %{list: [1, %{inner: h}]}, again: h},
          tools: tools
        )

      # the same %Handle{} passed twice is two handles, as two calls of LuaSandbox.handle/1
      # (echo gives back the terms it received, not handles: they come back as tables)
      assert r.values == [false, [%{"inner" => %{"conn" => 1}}, %{"conn" => 1}], :made, true]

      {:ok, s} = start_session([])
      {:ok, _} = LuaSandbox.Session.run(s, "function f(a, b) return {b, a} end")

      assert {:ok, %{value: [[:two], :one]}} =
               LuaSandbox.Session.call(s, "f", [
                 LuaSandbox.handle(:one),
                 [LuaSandbox.handle(:two)]
               ])
    end

    test "handles count against max_memory and max_instructions as values" do
      many = List.duplicate(LuaSandbox.handle(:x), 60_000)

      assert {:error, %{kind: :memory_limit}} =
               lua_run("return #h", globals: %{h: many}, max_memory: 2_000_000)

      assert {:error, %{kind: :instruction_limit}} =
               lua_run("return #h", globals: %{h: Enum.take(many, 5_000)}, max_instructions: 1_000)

      assert {:ok, %{value: 5_000}} =
               lua_run("return #h", globals: %{h: Enum.take(many, 5_000)}, max_memory: 2_000_000)
    end

    test "an error's value gives the term back" do
      h = LuaSandbox.handle({:secret, 1})

      assert {:error, %{kind: :runtime, value: {:secret, 1}}} =
               lua_run("error(h)", globals: %{h: h})

      assert {:error, %{kind: :runtime, value: %{"h" => {:secret, 1}}}} =
               lua_run("error({h = h})", globals: %{h: h})
    end

    test "a failed session call without rollback keeps its handles" do
      {:ok, s} = start_session([])
      {:ok, _} = LuaSandbox.Session.run(s, "function keep_then_fail(h) lost = h error('no') end")

      assert {:error, %{kind: :runtime}} =
               LuaSandbox.Session.call(s, "keep_then_fail", [LuaSandbox.handle(:kept)],
                 rollback: false
               )

      assert {:ok, %{value: :kept}} = LuaSandbox.Session.run(s, "return lost")

      assert :ok = LuaSandbox.Session.set(s, "n", LuaSandbox.handle(:next))

      assert {:ok, %{values: [:kept, :next]}} = LuaSandbox.Session.run(s, "return lost, n")
    end

    for rollback <- [true, false], place <- [:at_tool, :in_lua] do
      test "a call whose caller dies #{place} (rollback: #{rollback}) keeps its handles as its state" do
        me = self()

        tools =
          Map.put(LuaSandbox.TestWait.parking_tools(me), :ping, fn _ -> send(me, :spinning) end)

        {:ok, s} = start_session(tools: tools)

        {:ok, _} =
          LuaSandbox.Session.run(s, """
          function park(h) lost = h tools.wait() end
          function spin(h) lost = h tools.ping() while true do end end
          """)

        :ok = LuaSandbox.Session.set(s, "before", LuaSandbox.handle(:before))

        caller =
          spawn(fn ->
            LuaSandbox.Session.call(
              s,
              if(unquote(place) == :at_tool, do: "park", else: "spin"),
              [LuaSandbox.handle(:parked)],
              rollback: unquote(rollback),
              max_instructions: 1_000_000_000_000
            )
          end)

        if unquote(place) == :at_tool,
          do: assert_receive({:parked, _}, 5_000),
          else: assert_receive(:spinning, 5_000)

        Process.exit(caller, :kill)

        LuaSandbox.TestWait.wait_until(fn ->
          match?(%{calls: 3}, LuaSandbox.Session.info(s))
        end)

        lost = if unquote(rollback), do: nil, else: :parked

        assert {:ok, %{values: [^lost, :before]}} =
                 LuaSandbox.Session.run(s, "return lost, before")

        # a handle made next is its own, whether or not the lost one's place was freed
        :ok = LuaSandbox.Session.set(s, "next", LuaSandbox.handle(:next))

        assert {:ok, %{values: [^lost, :before, :next]}} =
                 LuaSandbox.Session.run(s, "return lost, before, next")
      end
    end
  end
end
