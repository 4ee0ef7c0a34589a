# Under both isolations (LuaSandbox.Isolation): on :process, a fork's state lives in its
# origin's worker (LuaSandbox.Session.Worker), where the members take turns as in the NIF.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.SessionForkTest, Macro.camelize("#{isolation}")) do
    # Session.fork/2: a new session holding a copy of the state, independent from then on; it
    # shares the arena with its origin (family.rs), so the tests also switch between members
    # many times, with failed calls rolled back on either side.
    @isolation isolation
    use ExUnit.Case, async: true
    import LuaSandbox.TestWait

    alias LuaSandbox.Session

    @state "n = 1 list = {'a'} function bump(k) n = n + k return n end"

    defp start!(opts \\ []) do
      {:ok, s} = Session.start_link(LuaSandbox.Isolation.opts(@isolation, opts))
      {:ok, _} = Session.run(s, @state)
      s
    end

    # `tools.wait()` tells the test it is parked, then waits for `:go`.
    defp waiting_tools do
      me = self()

      %{
        wait: fn _ ->
          send(me, {:parked, self()})
          receive do: (:go -> "went")
        end
      }
    end

    defp state(s) do
      {:ok, %{values: values}} = Session.run(s, "return n, table.concat(list, ',')")
      values
    end

    test "a fork holds a copy of the state: changes on either side stay on that side" do
      s = start!()
      {:ok, f} = Session.fork(s)
      assert state(f) == [1, "a"]

      assert {:ok, %{value: 11}} = Session.call(f, "bump", [10])
      {:ok, _} = Session.run(f, "list[#list + 1] = 'fork'")
      assert state(s) == [1, "a"]
      assert state(f) == [11, "a,fork"]

      assert {:ok, %{value: 101}} = Session.call(s, "bump", [100])
      {:ok, _} = Session.run(s, "list[#list + 1] = 'origin'")
      assert state(f) == [11, "a,fork"]
      assert state(s) == [101, "a,origin"]

      # a fork of a fork; the origin stopped, its forks go on
      {:ok, g} = Session.fork(f)
      Session.stop(s)
      {:ok, _} = Session.run(g, "n = 0")
      assert state(f) == [11, "a,fork"]
      assert state(g) == [0, "a,fork"]
      assert %{calls: 2, rollbacks: 0} = Session.info(g)
    end

    test "failed calls roll back on the member that made them, across switches" do
      s = start!(max_memory: 64 * 1024 * 1024)
      # over 1 MiB: the checkpoints track written pages, and a switch must reset them
      {:ok, _} = Session.run(s, "Blob = string.rep('x', 2 * 1024 * 1024)")
      {:ok, f} = Session.fork(s)

      for i <- 1..20 do
        {member, other} = if rem(i, 2) == 0, do: {s, f}, else: {f, s}
        before = {state(member), state(other)}
        assert {:error, %{kind: :runtime}} = Session.run(member, "n = -1 list = {} error('no')")
        assert {state(member), state(other)} == before
        assert {:ok, _} = Session.call(member, "bump", [i])
      end

      assert state(s) == [1 + Enum.sum(2..20//2), "a"]
      assert state(f) == [1 + Enum.sum(1..19//2), "a"]
      assert {:ok, %{value: true}} = Session.run(f, "return #Blob == 2 * 1024 * 1024")
    end

    # on :process a fork's table of handles starts as a copy of its origin's
    test "handles are copied with the state" do
      me = self()
      tools = %{use: fn [h] -> send(me, {:used, h}) && "done" end}
      {:ok, s} = Session.start_link(LuaSandbox.Isolation.opts(@isolation, tools: tools))
      {:ok, _} = Session.run(s, "function keep(h) kept = h end")
      {:ok, _} = Session.call(s, "keep", [LuaSandbox.handle(:origin)])
      {:ok, f} = Session.fork(s)
      assert {:ok, %{value: :origin}} = Session.run(f, "return kept")
      {:ok, _} = Session.call(f, "keep", [LuaSandbox.handle(:fork)])

      {:ok, _} = Session.run(s, "tools.use(kept)")
      assert_received {:used, :origin}
      {:ok, _} = Session.run(f, "tools.use(kept)")
      assert_received {:used, :fork}
      assert {:ok, %{value: :origin}} = Session.run(s, "return kept")
    end

    test "a fork counts against its supervisor, and waits for a busy session's turn" do
      sup = :"#{__MODULE__}.one"

      start_supervised!(
        {LuaSandbox.Supervisor, name: sup, max_concurrency: 1, isolation: @isolation}
      )

      me = self()
      tools = waiting_tools()

      s = start!(supervisor: sup, tools: tools)
      caller = spawn_link(fn -> send(me, {:done, Session.run(s, "n = 2 tools.wait() n = 3")}) end)
      assert_receive {:parked, tool}, 5_000
      task = Task.async(fn -> Session.fork(s) end)
      # the fork waits for the call (the session's turn), not the other way round
      refute Task.yield(task, 200)
      send(tool, :go)
      assert_receive {:done, {:ok, _}}, 5_000
      assert {:ok, f} = Task.await(task)
      refute Process.alive?(caller)
      # it copied the state as the call left it
      assert state(f) == [3, "a"]

      # the fork's calls count against the supervisor (max_concurrency: 1)
      spawn_link(fn -> Session.run(f, "tools.wait()") end)
      assert_receive {:parked, tool}, 5_000
      assert LuaSandbox.Supervisor.running(sup) == 1
      assert {:error, %{kind: :overloaded}} = Session.run(s, "return 1")
      send(tool, :go)
    end

    test "a member's call waits while another member's call has the arena" do
      me = self()
      tools = waiting_tools()

      s = start!(tools: tools)
      {:ok, f} = Session.fork(s)
      spawn_link(fn -> send(me, {:done, Session.run(s, "n = 5 tools.wait()")}) end)
      assert_receive {:parked, tool}, 5_000
      assert {:error, %{kind: :timeout}} = Session.run(f, "return n", timeout: 100)
      # a member whose state is not in the arena can be forked and asked for its info meanwhile
      assert %{calls: 0} = Session.info(f)
      assert %{busy: true} = Session.info(s)
      {:ok, g} = Session.fork(f)
      task = Task.async(fn -> Session.run(f, "return n") end)
      refute Task.yield(task, 100)
      send(tool, :go)
      assert {:ok, %{value: 1}} = Task.await(task)
      assert_receive {:done, {:ok, _}}
      assert state(s) == [5, "a"]
      assert state(g) == [1, "a"]
    end

    test "concurrent callers on three members: each keeps its own state" do
      s = start!(max_memory: 64 * 1024 * 1024)
      {:ok, _} = Session.run(s, "Blob = string.rep('x', 1536 * 1024)")
      {:ok, f} = Session.fork(s)
      {:ok, _} = Session.run(f, "n = 1000")
      {:ok, g} = Session.fork(f)
      start = %{s => 1, f => 1000, g => 1000}

      kept =
        1..4
        |> Enum.map(fn w ->
          Task.async(fn ->
            :rand.seed(:exsss, {w, w, w})

            Enum.reduce(1..60, %{}, fn _, acc ->
              m = Enum.random(Map.keys(start))

              if :rand.uniform(3) == 1 do
                {:error, _} =
                  Session.run(
                    m,
                    "n = n + 100 local t = {} for i = 1, 5000 do t[i] = i end error('x')"
                  )

                acc
              else
                {:ok, _} =
                  Session.run(m, "n = n + 1 local s = 0 for i = 1, 20000 do s = s + i end")

                Map.update(acc, m, 1, &(&1 + 1))
              end
            end)
          end)
        end)
        |> Enum.map(&Task.await(&1, 60_000))
        |> Enum.reduce(%{}, &Map.merge(&1, &2, fn _, a, b -> a + b end))

      for {m, n0} <- start do
        assert {:ok, %{values: [n, 1_572_864]}} = Session.run(m, "return n, #Blob")
        assert n == n0 + Map.get(kept, m, 0)
      end
    end

    # A tool runs in the caller's process, which holds the session (and the family's arena) for
    # the call: reaching the session or a fork of it from there would wait for itself, forever
    # without a timeout. It raises instead, which the tool reports as a catchable Lua error.
    test "a tool reaching its own session, a fork of it, or forking it fails at once" do
      # with `timeout:` the tool runs in a process of its own, acting for the caller
      for reach <- [:self, :fork, :fork_of], opts <- [[], [timeout: 10_000]] do
        {:ok, box} = Agent.start_link(fn -> nil end)

        s =
          start!(
            tools: %{
              again: fn [] ->
                other = Agent.get(box, & &1)

                case reach do
                  :fork_of -> Session.fork(other)
                  _ -> Session.run(other, "return 1")
                end
              end
            }
          )

        {:ok, f} = Session.fork(s)
        Agent.update(box, fn _ -> if reach == :fork, do: f, else: s end)
        t0 = System.monotonic_time(:millisecond)

        task =
          Task.async(fn ->
            Session.run(s, "local ok, e = pcall(tools.again) return ok, e", opts)
          end)

        assert {:ok, {:ok, %{values: [false, message]}}} =
                 Task.yield(task, 5_000) || Task.shutdown(task),
               "#{reach}"

        assert message =~ "it would wait for itself", "#{reach}: #{message}"
        assert System.monotonic_time(:millisecond) - t0 < 2_000
        # and both stay usable
        assert {:ok, %{values: [1]}} = Session.run(s, "return 1")
        assert {:ok, %{values: [1]}} = Session.run(f, "return 1")
      end
    end

    test "unknown fork options raise; a fork stays in its session's isolation" do
      s = start!()
      assert_raise ArgumentError, ~r/unknown options for a fork/, fn -> Session.fork(s, x: 1) end
      other = LuaSandbox.Isolation.supervisor(if @isolation == :nif, do: :process, else: :nif)

      assert_raise ArgumentError, ~r/a fork runs where its session does/, fn ->
        Session.fork(s, supervisor: other)
      end

      # and the session is served after
      assert state(s) == [1, "a"]
    end

    test "a member's call killed with its caller is rolled back; the others go on" do
      me = self()
      s = start!(tools: waiting_tools())
      {:ok, f} = Session.fork(s)

      for {victim, other} <- [{s, f}, {f, s}], place <- [:in_lua, :at_tool] do
        source =
          if place == :in_lua, do: "n = 99 while true do end", else: "n = 99 tools.wait() n = 100"

        before = {state(victim), state(other)}

        caller =
          spawn(fn ->
            send(me, :calling)
            Session.run(victim, source, max_instructions: 1_000_000_000_000)
          end)

        assert_receive :calling
        if place == :at_tool, do: assert_receive({:parked, _}, 5_000), else: Process.sleep(50)
        Process.exit(caller, :kill)
        # the other member's call waits for the arena until the killed one is rolled back
        assert {:ok, _} = Session.call(other, "bump", [0], timeout: 5_000)
        assert {state(victim), state(other)} == before
      end
    end

    test "timeout: bounds a member's call, and the wait for the arena" do
      me = self()
      s = start!(tools: waiting_tools())
      {:ok, f} = Session.fork(s)

      assert {:error, %{kind: :timeout}} =
               Session.run(f, "n = 7 while true do end",
                 timeout: 200,
                 max_instructions: 1_000_000_000_000
               )

      assert state(f) == [1, "a"]
      spawn_link(fn -> send(me, {:done, Session.run(s, "tools.wait()")}) end)
      assert_receive {:parked, tool}, 5_000
      t0 = System.monotonic_time(:millisecond)
      assert {:error, %{kind: :timeout}} = Session.run(f, "return n", timeout: 200)
      assert System.monotonic_time(:millisecond) - t0 < 3_000
      send(tool, :go)
      assert_receive {:done, {:ok, _}}, 5_000
      assert {:ok, %{value: 1}} = Session.run(f, "return n")
    end

    test "a fork stopping leaves its session as it was; so does the origin its forks" do
      s = start!()
      {:ok, f} = Session.fork(s)
      {:ok, _} = Session.run(f, "n = 50")
      :ok = Session.stop(f)
      assert state(s) == [1, "a"]
      {:ok, g} = Session.fork(s)
      {:ok, _} = Session.run(s, "n = 2")
      :ok = Session.stop(s)
      assert state(g) == [1, "a"]
      {:ok, h} = Session.fork(g)
      assert {:ok, %{value: 11}} = Session.call(h, "bump", [10])
      assert state(g) == [1, "a"]
    end

    if @isolation == :process do
      @tag :capture_log
      test "a worker crash: the call answers :worker_crashed, every member restarts from the start" do
        s = start!(globals: %{n: 1})
        {:ok, f} = Session.fork(s)
        {:ok, _} = Session.run(f, "n = 20")
        %{os_pid: os_pid} = Session.info(s)
        assert %{os_pid: ^os_pid} = Session.info(f)

        task =
          Task.async(fn ->
            Session.run(f, "while true do end", max_instructions: 1_000_000_000_000)
          end)

        wait_until(fn -> Session.info(s)[:busy] == true end)
        System.cmd("kill", ["-KILL", Integer.to_string(os_pid)])
        assert {:error, %{kind: :worker_crashed}} = Task.await(task, 10_000)
        # both in a new worker, from the session's start options (its globals; no @state)
        assert {:ok, %{values: [1, nil]}} = Session.run(s, "return n, list", timeout: 5_000)
        assert {:ok, %{values: [1, nil]}} = Session.run(f, "return n, list", timeout: 5_000)
        assert %{os_pid: new_os_pid} = Session.info(f)
        assert %{os_pid: ^new_os_pid} = Session.info(s)
        assert new_os_pid != os_pid
      end

      test "the family's worker goes with its last member" do
        s = start!()
        {:ok, f} = Session.fork(s)
        %{os_pid: os_pid} = Session.info(s)
        :ok = Session.stop(s)
        assert {:ok, _} = Session.run(f, "return n")
        assert os_alive?(os_pid)
        :ok = Session.stop(f)
        assert within(5_000, fn -> not os_alive?(os_pid) end)
      end
    end
  end
end
