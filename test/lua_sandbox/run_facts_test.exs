defmodule LuaSandbox.RunFactsTest.Handler do
  @moduledoc false
  # A :logger handler sending the events to the test process.
  def log(event, %{config: %{pid: pid}}), do: send(pid, {:log_event, event})
end

# Per-run facts (issue 9 item 4), print tags and in-run timeouts (issue 12), under both
# isolations (LuaSandbox.Isolation): LuaSandbox.RunFactsTest.Nif and .Process.
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.RunFactsTest, Macro.camelize("#{isolation}")) do
    use ExUnit.Case, async: true
    @isolation isolation

    alias LuaSandbox.{Error, Isolation}

    defp run(source, opts \\ []), do: LuaSandbox.run(source, Isolation.opts(@isolation, opts))

    defp drain(acc \\ []) do
      receive do
        {:lua_print, _} = m -> drain([m | acc])
        {:lua_print, _, _} = m -> drain([m | acc])
      after
        0 -> Enum.reverse(acc)
      end
    end

    defp burn_cpu(ms) do
      t0 = System.monotonic_time(:millisecond)

      Stream.repeatedly(fn -> :erlang.phash2(make_ref()) end)
      |> Enum.find(fn _ -> over?(t0, ms) end)
    end

    defp over?(t0, ms), do: System.monotonic_time(:millisecond) - t0 >= ms

    describe "os.clock" do
      test "is the run's own CPU time, not the BEAM's" do
        # Give the BEAM CPU time of its own that a process-wide clock would report.
        burn_cpu(300)
        {:ok, r} = run("return os.clock()")
        assert r.value < 0.05

        {:ok, r} = run("local x = 0 for i = 1, 3e6 do x = x + i end return os.clock()")
        assert r.value > 0 and r.value < 5
        # stats.cpu_us is the same clock, read at the end
        assert r.stats.cpu_us >= trunc(r.value * 1_000_000)
        assert r.stats.cpu_us <= r.stats.duration_us + 1_000
      end

      test "does not count the time spent in tools" do
        tools = %{busy: fn [ms] -> burn_cpu(ms) && :ok end}
        src = "local a = os.clock() tools.busy(300) return os.clock() - a"
        assert {:ok, r} = run(src, tools: tools)
        assert r.value < 0.1
      end
    end

    test "fresh states seed math.random from a real random source" do
      firsts =
        for _ <- 1..10 do
          {:ok, r} = run("return math.random(1 << 40)")
          r.value
        end

      # Lua's own seed (time and an address) gave 1-2 distinct values for 10 runs.
      assert length(Enum.uniq(firsts)) >= 9
    end

    describe "max_output" do
      test "counts every call, so empty writes end at the limit" do
        src = "for i = 1, 1e6 do io.write('') end return 1"
        opts = [max_output: 1000, print: {:send, self()}]
        assert {:error, %Error{kind: :output_limit}} = run(src, opts)
        # empty chunks are never streamed (71 428 messages before)
        assert drain() == []
      end
    end

    describe "print: {:send, pid}" do
      test "streamed output is coalesced into a bounded number of messages" do
        src = "for i = 1, 20000 do print(i) end"
        {t_us, {:ok, r}} = :timer.tc(fn -> run(src, print: {:send, self()}) end)
        msgs = drain()
        assert Enum.map_join(msgs, fn {:lua_print, chunk} -> chunk end) == r.output
        bound = div(byte_size(r.output), 4096) + div(t_us, 100_000) + 2
        assert length(msgs) <= bound, "#{length(msgs)} messages, bound #{bound}"
      end

      test "the first chunk arrives while the run is still going" do
        parent = self()
        src = "print('early') local t = os.time() while os.time() - t < 2 do end"
        opts = [print: {:send, parent}, max_instructions: 1_000_000_000_000]
        task = Task.async(fn -> run(src, opts) end)
        assert_receive {:lua_print, "early\n"}, 1_500
        assert {:ok, _} = Task.await(task, 10_000)
      end

      test "pending output is sent before a tool call" do
        parent = self()
        tools = %{ask: fn _ -> send(parent, :tool) && :ok end}
        src = "for i = 1, 3 do print(i) end tools.ask() print('end')"
        assert {:ok, r} = run(src, tools: tools, print: {:send, parent})
        assert r.output == "1\n2\n3\nend\n"
        {:messages, msgs} = Process.info(self(), :messages)
        {before, [:tool | after_tool]} = Enum.split_while(msgs, &(&1 != :tool))
        assert Enum.map_join(before, fn {:lua_print, c} -> c end) == "1\n2\n3\n"
        assert Enum.map_join(after_tool, fn {:lua_print, c} -> c end) == "end\n"
        drain()
        assert_received :tool
      end
    end

    describe "print: {:send, pid, tag}" do
      test "sends {:lua_print, tag, chunk}" do
        tag = {:run, make_ref()}
        assert {:ok, r} = run("print('a') io.write('b')", print: {:send, self(), tag})
        assert r.output == "a\nb"
        msgs = drain()
        assert Enum.all?(msgs, &match?({:lua_print, ^tag, _}, &1))
        assert Enum.map_join(msgs, fn {:lua_print, _, c} -> c end) == "a\nb"
      end

      test "two runs streaming to one process can be told apart" do
        parent = self()

        for tag <- [:one, :two] do
          src = "for i = 1, 100 do print('#{tag}') end"
          Task.async(fn -> run(src, print: {:send, parent, tag}) end)
        end
        |> Task.await_many(10_000)

        msgs = drain()
        assert length(msgs) >= 2

        for {:lua_print, tag, chunk} <- msgs do
          assert chunk |> String.split("\n", trim: true) |> Enum.uniq() == [Atom.to_string(tag)]
        end
      end

      test "is validated" do
        assert_raise ArgumentError, ~r/print must be/, fn ->
          run("return 1", print: {:send, :not_a_pid, :tag})
        end
      end
    end

    describe "print: :log" do
      setup do
        id = :"lua_log_#{System.unique_integer([:positive])}"
        me = self()

        :ok =
          :logger.add_handler(id, LuaSandbox.RunFactsTest.Handler, %{
            config: %{pid: me},
            filter_default: :stop,
            filters: [mine: {fn e, _ -> if e.meta[:pid] == me, do: e, else: :stop end, nil}]
          })

        on_exit(fn -> :logger.remove_handler(id) end)
      end

      defp log_events(acc \\ []) do
        receive do
          {:log_event, e} -> log_events([e | acc])
        after
          100 -> Enum.reverse(acc)
        end
      end

      test "is coalesced into a bounded number of Logger calls with metadata" do
        src = "io.write(string.rep('\\n', 100000)) print('last')"

        ExUnit.CaptureLog.capture_log(fn ->
          assert {:ok, r} = run(src, print: :log, chunk_name: "agent")
          send(self(), {:output, r.output})
        end)

        assert_received {:output, output}
        events = log_events()
        # 100 001 lines were 100 001 Logger calls before
        assert length(events) <= div(byte_size(output), 4096) + 1
        assert Enum.all?(events, &(&1.meta[:lua_chunk] == "agent"))
        assert [run_id] = events |> Enum.map(& &1.meta[:lua_run]) |> Enum.uniq()
        assert is_integer(run_id)
        assert List.last(events).msg |> elem(1) |> IO.chardata_to_string() =~ "last"
      end

      test "a compiled chunk logs under its own name" do
        {:ok, chunk} = LuaSandbox.compile("print('hi')", chunk_name: "tool_script")

        ExUnit.CaptureLog.capture_log(fn ->
          assert {:ok, _} = run(chunk, print: :log)
        end)

        assert [%{meta: %{lua_chunk: "tool_script"}}] = log_events()
      end
    end

    describe "log pieces" do
      test "cut after a newline, or before a character, never inside one" do
        alias LuaSandbox.Runner
        lines = String.duplicate("line\n", 2000)
        pieces = Runner.log_pieces(lines, [])
        assert length(pieces) == 3
        assert Enum.join(pieces, "\n") <> "\n" == lines

        long = String.duplicate("é", 5000)
        pieces = Runner.log_pieces(long, [])
        assert Enum.all?(pieces, &String.valid?/1)
        assert Enum.join(pieces) == long
      end
    end

    describe "timeout:" do
      test "ends the run inside the NIF with its output and full stats" do
        src = "print('a') while true do end"
        opts = [timeout: 500, max_instructions: 1_000_000_000_000_000]
        {us, result} = :timer.tc(fn -> run(src, opts) end)
        assert {:error, %Error{kind: :timeout} = e} = result
        assert e.message == "run exceeded its timeout of 500 ms"
        assert e.output == "a\n"
        assert e.stats.instructions > 0
        # The deadline counts from the call: time queued for a scheduler is part of it. It is
        # whole milliseconds of the monotonic clock (`Options.native_timeout/2`), so the run can
        # end up to 1 ms before 500 ms of the caller's microseconds (499 906 µs, seen once).
        assert us >= 499_000
        assert us < 5_000_000
      end

      test "the deadline includes time spent in tools" do
        tools = %{wait: fn [ms] -> Process.sleep(ms) end}
        # The tool returns after the deadline but before the backstop kill (timeout + 100 ms):
        # the resumed run times out at once instead of finishing.
        src = "print('x') tools.wait(250) return 1"

        assert {:error, %Error{kind: :timeout}} = run(src, tools: tools, timeout: 200)
      end

      test "a deadline that passed before the script starts still counts" do
        # (without the check before the first resume it returned {:ok, 1})
        assert {:error, %Error{kind: :timeout}} = run("return 1", timeout: 0)
      end

      test "a run that ends in time is unaffected" do
        assert {:ok, %{value: 3}} = run("return 1 + 2", timeout: 5_000)
      end
    end
  end
end
