defmodule LuaSandbox.WorkersTest do
  # `isolation: :process` (issue 18): the pool of jailed worker OS processes, `info/1`, and
  # `:worker_crashed` naming the signal, with the pool replacing a worker that died or that a
  # dead caller held. The crash and the wall are driven with the test-only worker build
  # (`wall-probes`, installed outside priv/ by the Mix compiler in MIX_ENV=test): it performs
  # raw system calls from inside the jail on request, or spins forever.
  use ExUnit.Case, async: true

  import LuaSandbox.TestWait

  import ExUnit.CaptureLog

  alias LuaSandbox.{Error, Worker}
  alias LuaSandbox.Supervisor.Workers

  @probes Path.join(Mix.Project.build_path(), "lua_sandbox_worker_probes")

  defp start_pool(k, extra \\ []) do
    name = :"lua_proc_#{System.unique_integer([:positive])}"

    start_supervised!(
      {LuaSandbox.Supervisor, [name: name, max_concurrency: k, isolation: :process] ++ extra},
      id: name
    )

    name
  end

  defp probe(port, name, operand \\ ""),
    do: Worker.request(port, {:probe, name, operand}, 10_000)

  # Every worker of `sup` (`k` and the spare) booted again after a replacement, none of them
  # `old`.
  defp replaced?(sup, k, old) do
    workers = LuaSandbox.Supervisor.info(sup).workers
    length(workers) == k + 1 and Enum.all?(workers, &(&1.os_pid != old))
  end

  describe "info/1" do
    test "a NIF supervisor says so" do
      name = :"lua_nif_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: 3}, id: name)
      assert LuaSandbox.Supervisor.info(name) == %{isolation: :nif, capacity: 3}
    end

    test "a :process supervisor: its workers and the spare, alive, and the jail's layers" do
      sup = start_pool(2)
      info = LuaSandbox.Supervisor.info(sup)
      assert %{isolation: :process, capacity: 2, workers: [w1, w2, w3]} = info
      assert length(Enum.uniq([w1.os_pid, w2.os_pid, w3.os_pid])) == 3

      for w <- [w1, w2, w3] do
        assert os_alive?(w.os_pid)
        assert w.runs == 0
        # a jailed worker with its snapshot built: a few MiB (the target is ≤ 16 MiB)
        assert w.rss > 0 and w.rss < 64 * 1024 * 1024, inspect(w)
      end

      assert Keyword.keys(info.layers) == Worker.layers()
      layers = Map.new(info.layers)

      for required <- [:fds_closed, :no_new_privs, :rlimits, :seccomp],
          do: assert(layers[required] == :on, "#{required}: #{inspect(layers)}")

      # the arena for the default 64 MiB max_memory (4×, as the NIF reserves) + 64 MiB headroom
      # the arena for 64 MiB, 4 x 64 MiB of run buffers, 64 MiB of headroom
      assert layers[:address_space] == (256 + 256 + 64) * 1024 * 1024
      assert info.missing_layers == Worker.missing(info.layers)
    end

    test "runs served are counted per worker" do
      sup = start_pool(1)
      pool = Workers.whereis(sup)

      for _ <- 1..3 do
        {:ok, port} = Workers.checkout(pool)
        assert {:ok, :pong} = Worker.request(port, :ping, 5_000)
        Workers.checkin(pool, port, :ok)
      end

      # the last worker given back is the next one lent
      assert [0, 3] = Enum.sort(for w <- LuaSandbox.Supervisor.info(sup).workers, do: w.runs)
    end

    test "a worker that dies costs the next run no boot: the spare serves it" do
      sup = start_pool(1)
      pool = Workers.whereis(sup)
      booted = MapSet.new(LuaSandbox.Supervisor.info(sup).workers, & &1.os_pid)
      assert MapSet.size(booted) == 2

      {:ok, port} = Workers.checkout(pool)
      victim = Worker.os_pid(port)
      {_, 0} = System.cmd("kill", ["-KILL", Integer.to_string(victim)])
      assert_receive {^port, {:exit_status, _}}, 5_000
      Workers.checkin(pool, port, :broken)

      # booted and idle at once, whether or not the replacement has booted yet: the spare,
      # booted at the start (without it, the pool's one worker was the victim)
      idle = for w <- LuaSandbox.Supervisor.info(sup).workers, do: w.os_pid
      assert [spare] = MapSet.to_list(MapSet.delete(booted, victim))
      assert spare in idle
      {:ok, port} = Workers.checkout(pool)
      assert {:ok, :pong} = Worker.request(port, :ping, 5_000)
      Workers.checkin(pool, port, :ok)
    end
  end

  describe "start_link/1" do
    test "isolation: and worker: are checked" do
      assert_raise ArgumentError, ~r/isolation must be :nif or :process/, fn ->
        LuaSandbox.Supervisor.start_link(name: :bad_isolation, isolation: :vm)
      end

      assert_raise ArgumentError, ~r/worker must be a path/, fn ->
        LuaSandbox.Supervisor.start_link(name: :bad_worker, isolation: :process, worker: 1)
      end
    end

    test "a missing worker binary fails the start with the reason" do
      Process.flag(:trap_exit, true)

      assert {:error, {:shutdown, {:failed_to_start_child, _, reason}}} =
               LuaSandbox.Supervisor.start_link(
                 name: :"lua_missing_#{System.unique_integer([:positive])}",
                 isolation: :process,
                 worker: "/nonexistent/lua_sandbox_worker"
               )

      assert {:worker_boot_failed, message} = reason
      assert message =~ "the worker binary /nonexistent/lua_sandbox_worker is missing"
    end

    test "a worker that cannot apply its jail fails the start (never a silent downgrade)" do
      # `false` exits with status 1 without a boot frame, as a worker whose jail failed does.
      Process.flag(:trap_exit, true)

      assert {:error, {:shutdown, {:failed_to_start_child, _, {:worker_boot_failed, message}}}} =
               LuaSandbox.Supervisor.start_link(
                 name: :"lua_nojail_#{System.unique_integer([:positive])}",
                 isolation: :process,
                 worker: System.find_executable("false")
               )

      assert message =~ "the worker exited at boot: exited with status 1"
    end
  end

  describe "a worker's earlier callers" do
    # A caller that checked a worker out used to stay linked to its port after giving it back
    # (Port.connect/2 links the new owner; the old one stays linked): when that caller later
    # exited abnormally (an ExUnit test process ends with :shutdown), the exit went through
    # the port to the run using the worker then, which died with the same reason ("run
    # crashed: :shutdown" in the adversarial suite under :process).
    test "exiting abnormally later does not touch a run that uses the worker now" do
      sup = start_pool(1)
      parent = self()

      earlier =
        spawn(fn ->
          send(parent, {:earlier, LuaSandbox.run("return 1", supervisor: sup)})
          receive do: (:never -> :ok)
        end)

      assert_receive {:earlier, {:ok, %{value: 1}}}, 10_000
      booted = LuaSandbox.Supervisor.info(sup).workers |> Enum.map(& &1.os_pid) |> Enum.sort()

      tools = %{wait: fn _ -> send(parent, :running) && receive(do: (:go -> :ok)) end}

      {now, mref} =
        spawn_monitor(fn ->
          exit({:done, LuaSandbox.run("tools.wait() return 2", supervisor: sup, tools: tools)})
        end)

      assert_receive :running, 10_000
      Process.exit(earlier, :shutdown)
      # the exit signal, if any, has reached the port and the run's process by now
      Process.sleep(100)
      # the tool runs in the run's process (no timeout:)
      send(now, :go)
      assert_receive {:DOWN, ^mref, :process, ^now, reason}, 10_000
      assert {:done, {:ok, %{value: 2}}} = reason
      # and no worker was lost
      assert booted ==
               LuaSandbox.Supervisor.info(sup).workers |> Enum.map(& &1.os_pid) |> Enum.sort()
    end

    test "are not linked to its port, while they hold it or after" do
      sup = start_pool(1)
      pool = Workers.whereis(sup)
      {:ok, port} = Workers.checkout(pool)
      assert {:ok, :pong} = Worker.request(port, :ping, 5_000)
      assert linked_ports() == []
      Workers.checkin(pool, port, :ok)
      assert linked_ports() == []
    end
  end

  defp linked_ports do
    {:links, links} = Process.info(self(), :links)
    Enum.filter(links, &is_port/1)
  end

  describe "handles" do
    # A stand-in for a worker: `cat` sends every frame back, so the request sent is the answer.
    defp echo_port, do: Port.open({:spawn, "cat"}, [{:packet, 4}, :binary])

    defp native_opts(opts),
      do: opts |> LuaSandbox.Options.validate!() |> LuaSandbox.Options.to_native()

    test "a worker is sent indices only; the terms stay in the BEAM" do
      ref = make_ref()
      h = LuaSandbox.handle({:secret, ref})
      port = echo_port()

      # what the worker got is what came back
      {:worker, ^port, _context, {:broken, %Error{message: m}}} =
        Worker.run(port, "return h", native_opts(globals: %{h: h}, call: {"f", [[h]]}), nil)

      Port.close(port)
      assert m =~ "{\"h\", {:handle,"
      assert m =~ "{\"f\", [[handle: 1]]}"
      refute m =~ inspect(ref)
      refute m =~ "secret"
    end

    test "a worker naming a handle it was not given is broken (:worker_crashed)" do
      port = echo_port()
      h = LuaSandbox.handle(:given)

      {:worker, ^port, context, {:broken, _}} =
        Worker.run(port, "return h", native_opts(globals: %{h: h}), nil)

      stats = Error.empty_stats()

      assert {:worker, ^port, context, {:ok, [:given, [%{"k" => :given}]], "", ^stats}} =
               Worker.step(
                 port,
                 {:ok, [{:handle, 0}, [%{"k" => {:handle, 0}}]], "", stats},
                 context
               )

      for bad <- [{:handle, 1}, {:handle, -1}, {:handle, "0"}, {:other, 0}, {}] do
        assert {:worker, ^port, ^context, {:broken, %Error{kind: :worker_crashed, message: m}}} =
                 Worker.step(port, {:ok, [1, %{"x" => [bad]}], "", stats}, context)

        assert m =~ "the worker broke: it named"
      end

      # in a tool call's arguments and an error's value too
      assert {:worker, ^port, _, {:broken, %Error{kind: :worker_crashed}}} =
               Worker.step(port, {:tool_call, "t", [{:handle, 7}]}, context)

      assert {:worker, ^port, _, {:broken, %Error{kind: :worker_crashed}}} =
               Worker.step(
                 port,
                 {:error, {:runtime, "x", nil, nil, {:handle, 7}}, "", stats},
                 context
               )

      Port.close(port)
    end

    @tag :capture_log
    test "a session's worker naming a handle the session does not have is replaced" do
      sup = start_pool(1)

      {:ok, s} =
        LuaSandbox.Session.start_link(supervisor: sup, globals: %{db: LuaSandbox.handle(:db)})

      :ok = LuaSandbox.Session.set(s, "kept", LuaSandbox.handle(:kept))
      %{os_pid: os_pid} = LuaSandbox.Session.info(s)
      # the session forgets the handle its worker still has
      family = :sys.get_state(s).worker.family
      :sys.replace_state(family, fn st -> update_in(st.handles[0].terms, &Map.delete(&1, 1)) end)

      assert {:error, %Error{kind: :worker_crashed, message: m}} =
               LuaSandbox.Session.run(s, "return kept")

      assert m =~ "os pid #{os_pid}"
      assert m =~ "it named handle 1, which it does not have"
      # a new worker from the session's start: its handles with it
      assert {:ok, %{values: [:db, nil]}} = LuaSandbox.Session.run(s, "return db, kept")
      assert %{os_pid: new} = LuaSandbox.Session.info(s)
      assert new != os_pid
    end
  end

  describe ":worker_crashed" do
    test "a signal from outside mid-request names the signal; the pool replaces the worker" do
      sup = start_pool(1, worker: @probes)
      pool = Workers.whereis(sup)
      me = self()

      task =
        Task.async(fn ->
          {:ok, port} = Workers.checkout(pool)
          send(me, {:worker, Worker.os_pid(port)})
          probe(port, "spin")
        end)

      assert_receive {:worker, os_pid}, 5_000
      Process.sleep(20)
      {_, 0} = System.cmd("kill", ["-TERM", Integer.to_string(os_pid)])

      assert {:error, %Error{kind: :worker_crashed, message: message}} = Task.await(task)
      assert message =~ "os pid #{os_pid}"
      assert message =~ "killed by SIGTERM (signal 15)"

      assert within(5_000, fn -> replaced?(sup, 1, os_pid) end),
             inspect(LuaSandbox.Supervisor.info(sup))

      # the new worker serves
      {:ok, port} = Workers.checkout(pool)
      assert {:ok, :pong} = Worker.request(port, :ping, 5_000)
    end

    test "the jail's seccomp kill is :worker_crashed with SIGSYS" do
      sup = start_pool(1, worker: @probes)
      pool = Workers.whereis(sup)
      {:ok, port} = Workers.checkout(pool)
      os_pid = Worker.os_pid(port)

      assert {:error, %Error{kind: :worker_crashed, message: message}} = probe(port, "socket")
      assert message =~ "killed by SIGSYS (signal 31)"
      # given back after the crash: the pool replaces it all the same
      Workers.checkin(pool, port, :ok)
      assert within(5_000, fn -> replaced?(sup, 1, os_pid) end)
    end

    test "an idle worker killed from outside is replaced, with a warning" do
      sup = start_pool(2)
      [%{os_pid: victim} | _] = LuaSandbox.Supervisor.info(sup).workers

      log =
        capture_log(fn ->
          {_, 0} = System.cmd("kill", ["-KILL", Integer.to_string(victim)])
          assert within(5_000, fn -> replaced?(sup, 2, victim) end)
        end)

      assert log =~ "worker os pid #{victim} killed by SIGKILL (signal 9)"
    end
  end

  describe "a caller that dies holding a worker" do
    test "its worker, mid-request, exits and is replaced" do
      sup = start_pool(1, worker: @probes)
      pool = Workers.whereis(sup)
      me = self()

      caller =
        spawn(fn ->
          {:ok, port} = Workers.checkout(pool)
          send(me, {:worker, Worker.os_pid(port)})
          probe(port, "spin")
        end)

      assert_receive {:worker, os_pid}, 5_000
      Process.sleep(20)
      Process.exit(caller, :kill)
      # the spinning OS process is gone (the test's bound is wide: a loaded machine)
      assert ms = within(2_000, fn -> not os_alive?(os_pid) end)
      assert ms < 2_000
      assert within(5_000, fn -> replaced?(sup, 1, os_pid) end)
    end
  end

  describe "the wall, through the pool" do
    test "each probe ends in EPERM or SIGSYS, and the node goes on" do
      sup = start_pool(1, worker: @probes)
      pool = Workers.whereis(sup)
      marker = Path.join(System.tmp_dir!(), "lua_wall_#{System.unique_integer([:positive])}")

      for {name, operand} <- [
            {"create", marker},
            {"open", "/etc/hostname"},
            {"socket", ""},
            {"execve", marker},
            {"fork", ""},
            {"kill", Integer.to_string(String.to_integer(System.pid()))},
            {"ptrace", System.pid()},
            {"mmap_exec", ""},
            {"io_uring", ""}
          ] do
        assert within(5_000, fn -> LuaSandbox.Supervisor.info(sup).workers != [] end)
        {:ok, port} = Workers.checkout(pool)

        case probe(port, name, operand) do
          {:ok, {:errno, 1}} -> Workers.checkin(pool, port, :ok)
          {:error, %Error{kind: :worker_crashed, message: m}} -> assert m =~ "SIGSYS", name
          other -> flunk("#{name}: #{inspect(other)}")
        end
      end

      refute File.exists?(marker)
      # the jail does not stop ordinary Lua work
      assert within(5_000, fn -> LuaSandbox.Supervisor.info(sup).workers != [] end)
      {:ok, port} = Workers.checkout(pool)
      assert {:ok, {:ok, "42"}} = probe(port, "lua", "return 6 * 7")
    end
  end
end
