defmodule LuaSandbox.SessionWorkerTest do
  # Sessions on an `isolation: :process` supervisor where they differ from the NIF's: the
  # state lives in a worker OS process of the session's own; the caller's death cancels the
  # call in that worker (rolled back, the worker kept); a worker killed mid-call answers
  # :worker_crashed and the session restarts from its start options; the worker goes with the
  # session. The answers themselves are held equal to the NIF's by session_test.exs and
  # session_caller_test.exs, run under both isolations (LuaSandbox.Isolation).
  use ExUnit.Case, async: true

  import LuaSandbox.TestWait

  alias LuaSandbox.Session

  @big 1_000_000_000_000

  setup do
    sup = :"lua_session_#{System.unique_integer([:positive])}"

    start_supervised!(
      {LuaSandbox.Supervisor, name: sup, max_concurrency: 2, isolation: :process},
      id: sup
    )

    %{sup: sup}
  end

  defp start!(sup, opts \\ []) do
    tools = parking_tools(self())
    {:ok, s} = Session.start_link([supervisor: sup, tools: tools, globals: %{n: 1}] ++ opts)
    s
  end

  defp pool_os_pids(sup), do: Enum.map(LuaSandbox.Supervisor.info(sup).workers, & &1.os_pid)

  test "the state lives in a worker of the session's own, not one of the pool's", %{sup: sup} do
    s = start!(sup)
    assert %{os_pid: os_pid, calls: 0} = Session.info(s)
    assert os_alive?(os_pid)
    refute os_pid in pool_os_pids(sup)
    assert {:ok, %{value: 2}} = Session.run(s, "n = n + 1 return n")
    assert %{os_pid: ^os_pid, calls: 1} = Session.info(s)
    # the pool's workers served nothing
    assert Enum.all?(LuaSandbox.Supervisor.info(sup).workers, &(&1.runs == 0))
  end

  for place <- [:in_lua, :at_tool], timeout <- [:infinity, 60_000] do
    test "a caller killed #{place} (timeout: #{timeout}): the call is cancelled in the same worker",
         %{sup: sup} do
      s = start!(sup)
      %{os_pid: os_pid} = Session.info(s)
      me = self()

      source =
        if unquote(place) == :in_lua,
          do: "n = 2 while true do end",
          else: "n = 2 tools.wait() n = 3"

      caller =
        spawn(fn ->
          send(me, :calling)
          Session.run(s, source, timeout: unquote(timeout), max_instructions: @big)
        end)

      assert_receive :calling

      if unquote(place) == :at_tool,
        do: assert_receive({:parked, _}, 5_000),
        else: wait_until(fn -> LuaSandbox.Supervisor.running(sup) == 1 end)

      Process.exit(caller, :kill)
      # the worker ends the call (rolled back) by itself, with no other call to prompt it,
      # and is the same worker
      wait_until(fn -> match?(%{rollbacks: 1}, Session.info(s)) end)
      assert %{os_pid: ^os_pid, calls: 1} = Session.info(s)
      {us, answer} = :timer.tc(fn -> Session.run(s, "return n") end)
      assert {:ok, %{value: 1}} = answer
      # "within milliseconds" (wide for a loaded machine)
      assert us < 1_000_000
    end
  end

  @tag :capture_log
  test "a worker killed mid-call: :worker_crashed, then the session restarts from its start",
       %{sup: sup} do
    s = start!(sup)
    {:ok, _} = Session.run(s, "n = 5 kept = true")
    %{os_pid: os_pid} = Session.info(s)
    task = Task.async(fn -> Session.run(s, "while true do end", max_instructions: @big) end)
    wait_until(fn -> LuaSandbox.Supervisor.running(sup) == 1 end)
    System.cmd("kill", ["-KILL", Integer.to_string(os_pid)])

    assert {:error, %{kind: :worker_crashed, message: message}} = Task.await(task, 10_000)
    assert message =~ "os pid #{os_pid}"
    assert message =~ "SIGKILL"
    refute os_alive?(os_pid)
    # its start options (globals, tools) again, in a new worker; what the calls did is lost
    assert {:ok, %{values: [1, nil]}} = Session.run(s, "return n, kept")
    assert %{os_pid: new_os_pid, calls: 1} = Session.info(s)
    assert new_os_pid != os_pid
  end

  @tag :capture_log
  test "a worker killed between calls is replaced at once, from the session's start", %{sup: sup} do
    s = start!(sup)
    {:ok, _} = Session.run(s, "n = 5")
    %{os_pid: os_pid} = Session.info(s)
    System.cmd("kill", ["-KILL", Integer.to_string(os_pid)])
    wait_until(fn -> Session.info(s)[:os_pid] not in [nil, os_pid] end)
    assert {:ok, %{value: 1}} = Session.run(s, "return n", timeout: 2_000)
  end

  @tag :capture_log
  test "a restarted worker has the start's handles, not the calls'", %{sup: sup} do
    {:ok, s} = Session.start_link(supervisor: sup, globals: %{db: LuaSandbox.handle(:db)})
    :ok = Session.set(s, "kept", LuaSandbox.handle(:kept))
    assert {:ok, %{values: [:db, :kept]}} = Session.run(s, "return db, kept")
    %{os_pid: os_pid} = Session.info(s)
    System.cmd("kill", ["-KILL", Integer.to_string(os_pid)])
    wait_until(fn -> Session.info(s)[:os_pid] not in [nil, os_pid] end)
    assert {:ok, %{values: [:db, nil]}} = Session.run(s, "return db, kept")
    :ok = Session.set(s, "kept", LuaSandbox.handle(:again))
    assert {:ok, %{values: [:db, :again]}} = Session.run(s, "return db, kept")
  end

  test "a call that ends well as its caller dies keeps its handles, as its state", %{sup: sup} do
    me = self()
    {:ok, s} = Session.start_link(supervisor: sup, tools: %{ping: fn _ -> send(me, :pinged) end})

    {:ok, _} =
      Session.run(s, """
      function keep_slowly(h) kept = h tools.ping() for i = 1, 3e7 do end return true end
      """)

    caller =
      spawn(fn ->
        Session.call(s, "keep_slowly", [LuaSandbox.handle(:kept)], max_instructions: @big)
      end)

    assert_receive :pinged, 5_000
    # the tool's reply is with the worker, which loops on: the caller dies meanwhile, and the
    # family's process (the port's owner) takes the session's release of the call before the
    # call's answer (which has no cancel to see): the answer is an orphan's
    family = :sys.get_state(s).worker.family
    wait_until(fn -> match?(%{parked: false}, :sys.get_state(family).active) end)
    :sys.suspend(family)
    # (on a machine fast enough to end the loop before the suspend, the answer came first)
    racing = :sys.get_state(family).active != nil
    Process.exit(caller, :kill)
    # the release, then the answer
    queued = if racing, do: 2, else: 1

    wait_until(
      fn -> Process.info(family, :message_queue_len) == {:message_queue_len, queued} end,
      30_000
    )

    :sys.resume(family)
    assert {:ok, %{value: :kept}} = Session.run(s, "return kept")
    assert %{calls: 3, rollbacks: 0} = Session.info(s)
  end

  @tag :capture_log
  test "its port closing abnormally restarts the worker; another link's exit stops the session",
       %{sup: sup} do
    s = start!(sup)
    {:ok, _} = Session.run(s, "n = 5")
    %{os_pid: os_pid} = Session.info(s)
    # what a write to a dead worker does (:epipe); the session is not killed with its port
    Process.exit(:sys.get_state(:sys.get_state(s).worker.family).port, :epipe)
    assert {:ok, %{value: 1}} = Session.run(s, "return n", timeout: 5_000)
    assert %{os_pid: new_os_pid} = Session.info(s)
    assert new_os_pid != os_pid
    assert within(5_000, fn -> not os_alive?(os_pid) end)

    # a linked process's abnormal exit still stops it, as without trapping exits
    Process.flag(:trap_exit, true)
    ref = Process.monitor(s)
    other = spawn(fn -> Process.sleep(:infinity) end)
    :sys.replace_state(s, fn st -> Process.link(other) && st end)
    Process.exit(other, :boom)
    assert_receive {:DOWN, ^ref, :process, ^s, :boom}, 5_000
    assert within(5_000, fn -> not os_alive?(new_os_pid) end)
  end

  @tag :capture_log
  test "a frame other than :cancel during a call ends the worker as a protocol error",
       %{sup: sup} do
    s = start!(sup)
    %{os_pid: os_pid} = Session.info(s)
    task = Task.async(fn -> Session.run(s, "while true do end", max_instructions: @big) end)
    wait_until(fn -> LuaSandbox.Supervisor.running(sup) == 1 end)
    port = :sys.get_state(:sys.get_state(s).worker.family).port
    Port.command(port, :erlang.term_to_binary({1, :ping}))

    assert {:error, %{kind: :worker_crashed, message: message}} = Task.await(task, 10_000)
    assert message =~ "os pid #{os_pid}"
    assert message =~ "protocol error"
    # and the session restarts, as after any crash
    assert {:ok, %{value: 1}} = Session.run(s, "return n", timeout: 5_000)
  end

  test "the worker goes with the session", %{sup: sup} do
    s = start!(sup)
    %{os_pid: os_pid} = Session.info(s)
    :ok = Session.stop(s)
    assert within(5_000, fn -> not os_alive?(os_pid) end)

    # and with the process that started it (the session is linked to it)
    me = self()

    starter =
      spawn(fn ->
        send(me, {:session, start!(sup)})
        Process.sleep(:infinity)
      end)

    assert_receive {:session, s}
    %{os_pid: os_pid} = Session.info(s)
    Process.exit(starter, :kill)
    assert within(5_000, fn -> not os_alive?(os_pid) end)
  end

  test "max_memory is bounded by the supervisor's worker_max_memory", %{sup: sup} do
    assert {:error, %{kind: :invalid_input, message: message}} =
             Session.start_link(supervisor: sup, max_memory: 65 * 1024 * 1024)

    assert message =~ "not yet supported with isolation: :process"
  end

  test "the supervisor's info lists the session workers: os pid, calls served, RSS, sessions",
       %{sup: sup} do
    assert LuaSandbox.Supervisor.info(sup).session_workers == []
    s = start!(sup)
    {:ok, _} = Session.run(s, "n = 2")
    {:ok, f} = Session.fork(s)
    {:ok, _} = Session.run(f, "return n")
    %{os_pid: os_pid} = Session.info(s)

    assert [%{os_pid: ^os_pid, runs: 2, rss: rss, sessions: sessions}] =
             LuaSandbox.Supervisor.info(sup).session_workers

    assert rss > 0
    assert Enum.sort(sessions) == Enum.sort([s, f])
    # the pool's own workers are listed apart
    refute os_pid in pool_os_pids(sup)

    # a second session, in a worker of its own
    t = start!(sup)
    %{os_pid: other} = Session.info(t)
    infos = LuaSandbox.Supervisor.info(sup).session_workers
    assert Enum.sort(Enum.map(infos, & &1.os_pid)) == Enum.sort([os_pid, other])

    :ok = Session.stop(s)
    :ok = Session.stop(f)
    wait_until(fn -> length(LuaSandbox.Supervisor.info(sup).session_workers) == 1 end)
    assert [%{os_pid: ^other, sessions: [^t]}] = LuaSandbox.Supervisor.info(sup).session_workers
  end

  test "compiled chunks as modules and print: {:send, ...} work in a session's worker",
       %{sup: sup} do
    util = LuaSandbox.compile!("return {inc = function(x) return x + 1 end}", chunk_name: "util")

    {:ok, s} =
      Session.start_link(supervisor: sup, modules: %{"util" => util}, print: {:send, self()})

    assert {:ok, %{value: 2}} = Session.run(s, "print('a') return require('util').inc(1)")
    assert_receive {:lua_print, "a\n"}, 5_000
  end
end
