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

  # Every worker of `sup` booted again after a replacement, none of them `old`.
  defp replaced?(sup, k, old) do
    workers = LuaSandbox.Supervisor.info(sup).workers
    length(workers) == k and Enum.all?(workers, &(&1.os_pid != old))
  end

  describe "info/1" do
    test "a NIF supervisor says so" do
      name = :"lua_nif_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, max_concurrency: 3}, id: name)
      assert LuaSandbox.Supervisor.info(name) == %{isolation: :nif, capacity: 3}
    end

    test "a :process supervisor: its workers, alive, and the jail's layers" do
      sup = start_pool(2)
      info = LuaSandbox.Supervisor.info(sup)
      assert %{isolation: :process, capacity: 2, workers: [w1, w2]} = info
      assert w1.os_pid != w2.os_pid

      for w <- [w1, w2] do
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

      assert [%{runs: 3}] = LuaSandbox.Supervisor.info(sup).workers
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

  describe "not yet supported" do
    # (a session's forks: session_worker_test.exs)
    test "compiled chunks and print: {:send, ...} on a :process supervisor say so" do
      sup = start_pool(1)
      chunk = LuaSandbox.compile!("return 1")

      assert_raise ArgumentError, ~r/^not yet supported .*: compiled chunks/, fn ->
        LuaSandbox.run(chunk, supervisor: sup)
      end

      assert_raise ArgumentError, ~r/^not yet supported .*: compiled chunks/, fn ->
        LuaSandbox.run("return 1", supervisor: sup, modules: %{"m" => chunk}, timeout: 1_000)
      end

      assert_raise ArgumentError, ~r/^not yet supported .*: print: \{:send/, fn ->
        LuaSandbox.run("return 1", supervisor: sup, print: {:send, self()})
      end

      # and runs are served
      assert {:ok, %{value: 1}} = LuaSandbox.run("return 1", supervisor: sup)
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
