defmodule LuaSandbox.WorkerRunTest do
  # Runs in jailed worker processes (`isolation: :process`, issue 18) where they differ from the
  # NIF's: the caller's death stops the run in its worker OS process, which exits and is
  # replaced; a deadline and limits end the run and the worker is reused; a worker that dies
  # mid-run answers :worker_crashed; a big script across the libraries makes no system call
  # the jail's seccomp filter kills. The answers themselves are held equal to the NIF's by the
  # API test modules run under both isolations (LuaSandbox.Isolation).
  use ExUnit.Case, async: true

  import LuaSandbox.TestWait

  alias LuaSandbox.Error

  @big 1_000_000_000_000

  defp start_pool(k) do
    name = :"lua_run_#{System.unique_integer([:positive])}"

    start_supervised!(
      {LuaSandbox.Supervisor, name: name, max_concurrency: k, isolation: :process},
      id: name
    )

    name
  end

  defp os_pids(sup), do: Enum.map(LuaSandbox.Supervisor.info(sup).workers, & &1.os_pid)

  # A pool of one worker and the spare has both booted again, without `old`.
  defp replaced?(sup, old) do
    pids = os_pids(sup)
    length(pids) == 2 and old not in pids
  end

  # The OS pid of the worker that serves `sup`'s next run, seen from inside the run: a tool
  # reports it (by elimination: the one busy worker).
  defp busy_worker(sup) do
    Enum.find(LuaSandbox.Supervisor.info(sup).workers, &(&1.runs > 0))
  end

  describe "the caller's death" do
    test "stops the run: its worker exits and is replaced" do
      sup = start_pool(1)
      me = self()

      caller =
        spawn(fn ->
          LuaSandbox.run("tools.started() while true do end",
            supervisor: sup,
            max_instructions: @big,
            tools: %{started: fn _ -> send(me, :started) && :ok end}
          )
        end)

      assert_receive :started, 5_000
      %{os_pid: os_pid} = busy_worker(sup)
      Process.sleep(20)
      assert os_alive?(os_pid)
      Process.exit(caller, :kill)
      # The guarantee is milliseconds; the bound is wide for a loaded machine.
      assert ms = within(2_000, fn -> not os_alive?(os_pid) end)
      assert ms < 2_000
      assert within(5_000, fn -> replaced?(sup, os_pid) end)
      assert {:ok, %{value: 2}} = LuaSandbox.run("return 1 + 1", supervisor: sup)
    end
  end

  describe "a run that ends on its own" do
    test "a deadline, a limit or an error leaves the worker to the next run" do
      sup = start_pool(1)
      booted = os_pids(sup)

      assert {:error, %Error{kind: :timeout}} =
               LuaSandbox.run("while true do end",
                 supervisor: sup,
                 timeout: 50,
                 max_instructions: @big
               )

      assert {:error, %Error{kind: :instruction_limit}} =
               LuaSandbox.run("while true do end", supervisor: sup, max_instructions: 1000)

      assert {:error, %Error{kind: :memory_limit}} =
               LuaSandbox.run("local s = 'x' while true do s = s .. s end",
                 supervisor: sup,
                 max_memory: 1_000_000
               )

      assert {:error, %Error{kind: :runtime}} = LuaSandbox.run("error('x')", supervisor: sup)
      assert os_pids(sup) == booted
      assert %{runs: 4} = busy_worker(sup)
    end

    test "max_memory above the worker's arena is refused, not silently lowered" do
      sup = start_pool(1)

      assert {:error, %Error{kind: :invalid_input, message: m}} =
               LuaSandbox.run("return 1", supervisor: sup, max_memory: 128 * 1024 * 1024)

      assert m =~ "not yet supported with isolation: :process"

      # a supervisor whose workers are built for more serves it
      big = :"lua_run_big_#{System.unique_integer([:positive])}"

      start_supervised!(
        {LuaSandbox.Supervisor,
         name: big, max_concurrency: 1, isolation: :process, worker_max_memory: 128 * 1024 * 1024},
        id: big
      )

      assert {:ok, %{value: 50_000_000}} =
               LuaSandbox.run("return #string.rep('x', 5e7)",
                 supervisor: big,
                 max_memory: 128 * 1024 * 1024,
                 max_instructions: @big
               )
    end
  end

  describe "a worker that dies mid-run" do
    test "answers :worker_crashed naming the signal, and the pool replaces it" do
      sup = start_pool(1)
      me = self()

      task =
        Task.async(fn ->
          LuaSandbox.run("tools.started() while true do end",
            supervisor: sup,
            max_instructions: @big,
            tools: %{started: fn _ -> send(me, :started) && :ok end}
          )
        end)

      assert_receive :started, 5_000
      %{os_pid: os_pid} = busy_worker(sup)
      {_, 0} = System.cmd("kill", ["-KILL", Integer.to_string(os_pid)])
      assert {:error, %Error{kind: :worker_crashed, message: m}} = Task.await(task)
      assert m =~ "killed by SIGKILL (signal 9)"
      assert within(5_000, fn -> replaced?(sup, os_pid) end)
    end
  end

  describe "the jail" do
    test "a big script across the libraries makes no system call the filter kills" do
      sup = start_pool(1)
      booted = os_pids(sup)

      src = """
      local words = {}
      for i = 1, 100000 do
        words[i] = string.format('%08d-%s', math.random(1, 1e8), string.rep('w', i % 50))
      end
      table.sort(words)
      local doc = json.encode({words = words, at = os.time(), clock = os.clock()})
      local back = json.decode(doc)
      local n = 0
      for w in doc:gmatch('"(%d+)%-') do n = n + 1 end
      local co = coroutine.wrap(function() for i = 1, 1000 do coroutine.yield(i) end end)
      local sum = 0
      for i = 1, 1000 do sum = sum + co() end
      words, doc = nil, nil
      collectgarbage()
      return #back.words, n, sum, os.date('!%Y', 0), utf8.char(228)
      """

      assert {:ok, %{values: [100_000, 100_000, 500_500, "1970", "ä"]}} =
               LuaSandbox.run(src, supervisor: sup, max_instructions: @big)

      assert os_pids(sup) == booted
    end
  end
end
