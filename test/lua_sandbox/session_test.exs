# Under both isolations (LuaSandbox.Isolation).
for isolation <- LuaSandbox.Isolation.all() do
  defmodule Module.concat(LuaSandbox.SessionTest, Macro.camelize("#{isolation}")) do
    @isolation isolation
    use ExUnit.Case, async: true

    alias LuaSandbox.Session

    # Every global the scripts set, serialized deterministically: the session's state as the
    # tests compare it "byte for byte".
    @dump """
    local function ser(v, seen)
      local t = type(v)
      if t == 'table' then
        if seen[v] then return '<cycle>' end
        seen[v] = true
        local ks = {}
        for k in pairs(v) do ks[#ks + 1] = k end
        table.sort(ks, function(a, b) return tostring(a) < tostring(b) end)
        local parts = {}
        for _, k in ipairs(ks) do parts[#parts + 1] = tostring(k) .. '=' .. ser(v[k], seen) end
        seen[v] = nil
        return '{' .. table.concat(parts, ',') .. '}'
      elseif t == 'string' then return string.format('%q', v)
      else return tostring(v) end
    end
    local names = {}
    for k, v in pairs(_G) do
      if type(v) ~= 'function' and type(k) == 'string' and k:match('^[a-z]') and
         not ({string=1, table=1, math=1, os=1, coroutine=1, utf8=1, io=1, tools=1})[k] then
        names[#names + 1] = k
      end
    end
    table.sort(names)
    local out = {}
    for _, k in ipairs(names) do out[#out + 1] = k .. '=' .. ser(_G[k], {}) end
    return table.concat(out, ';')
    """

    defp dump(s) do
      {:ok, %{value: v}} = Session.run(s, @dump)
      v
    end

    defp start!(opts \\ []) do
      {:ok, s} = Session.start_link(LuaSandbox.Isolation.opts(@isolation, opts))
      s
    end

    test "state persists across calls; call/4 calls a global function" do
      s = start!()
      {:ok, _} = Session.run(s, "count = 0 function bump(n) count = count + n return count end")
      assert {:ok, %{value: 5}} = Session.call(s, "bump", [5])
      assert {:ok, %{value: 12}} = Session.call(s, :bump, [7])
      assert {:ok, %{value: 12}} = Session.run(s, "return count")
      assert %{calls: 4, rollbacks: 0} = Session.info(s)
    end

    test "a failed call is rolled back: script error, instruction limit, memory limit, timeout" do
      s = start!(max_memory: 8 * 1024 * 1024)
      {:ok, _} = Session.run(s, "data = {list = {1, 2, 3}, name = 'x'} n = 1")
      before = dump(s)

      assert {:error, %{kind: :runtime}} =
               Session.run(s, "n = 2 data.list[4] = 4 data.extra = {} error('halfway')")

      assert dump(s) == before

      assert {:error, %{kind: :instruction_limit}} =
               Session.run(s, "n = 3 data.name = 'y' while true do end", max_instructions: 10_000)

      assert dump(s) == before

      assert {:error, %{kind: :memory_limit}} =
               Session.run(s, "n = 4 big = {} for i = 1, 1e8 do big[i] = i end")

      assert dump(s) == before

      assert {:error, %{kind: :timeout}} =
               Session.run(s, "n = 5 while true do end",
                 timeout: 100,
                 max_instructions: 100_000_000_000
               )

      assert dump(s) == before
      assert %{rollbacks: 4} = Session.info(s)
    end

    test "a session over 1 MiB (checkpoints from the pages written) rolls back the same way" do
      s = start!(max_memory: 64 * 1024 * 1024)

      {:ok, _} = Session.run(s, "Blob = string.rep('b', 4 * 1024 * 1024) data = {} n = 0")

      for i <- 1..12 do
        {:ok, _} = Session.run(s, "n = n + 1 data[#data + 1] = string.rep('d', #{i * 97})")
        before = dump(s)

        assert {:error, %{kind: :runtime}} =
                 Session.run(s, """
                 n = -1 data[1] = 'changed' data[#data + 1] = {}
                 grown = {} for i = 1, #{i * 5000} do grown[i] = i end
                 #{if rem(i, 3) == 0, do: "collectgarbage()", else: ""}
                 error('halfway')
                 """)

        assert dump(s) == before
      end

      assert {:ok, %{value: 12}} = Session.run(s, "return n")
      assert %{rollbacks: 12} = Session.info(s)
    end

    test "passing arguments does not start a collection step on every call" do
      # Marshaling pauses the collector; stock LUA_GCRESTART would reset its debt, so each call
      # would pay a step of marking over the whole heap (charged as instructions).
      s = start!()

      {:ok, _} =
        Session.run(
          s,
          "keep = {} for i = 1, 5000 do keep[i] = {i} end function f(x) return x end"
        )

      counts =
        for _ <- 1..41 do
          {:ok, %{stats: %{instructions: n}}} = Session.call(s, "f", [1])
          n
        end

      assert Enum.at(Enum.sort(counts), 20) < 200, inspect(counts)
    end

    test "a caller killed mid-call leaves the session as it was" do
      s = start!()
      {:ok, _} = Session.run(s, "n = 1")
      before = dump(s)

      pid =
        spawn(fn ->
          Session.run(s, "n = 2 while true do end", max_instructions: 100_000_000_000)
        end)

      Process.sleep(50)
      Process.exit(pid, :kill)
      assert dump(s) == before
      assert {:ok, %{value: 1}} = Session.run(s, "return n")
    end

    test "a caller killed while parked at a tool call leaves the session as it was" do
      me = self()

      s =
        start!(
          tools: %{
            wait: fn _ ->
              send(me, {:parked, self()})
              Process.sleep(:infinity)
            end
          }
        )

      {:ok, _} = Session.run(s, "n = 1")
      before = dump(s)
      pid = spawn(fn -> Session.run(s, "n = 2 tools.wait() n = 3") end)
      assert_receive {:parked, ^pid}, 2_000
      Process.exit(pid, :kill)
      assert dump(s) == before
    end

    describe "per-call globals:, get/2 and set/3" do
      test "globals: are set for the call, kept after it, rolled back with a failed one" do
        s = start!()
        {:ok, _} = Session.run(s, "function greet(who) return greeting .. ', ' .. who end")

        assert {:ok, %{value: "hi, ann"}} =
                 Session.call(s, "greet", ["ann"], globals: %{greeting: "hi"})

        assert {:ok, "hi"} = Session.get(s, :greeting)

        assert {:error, %{kind: :runtime}} =
                 Session.run(s, "error('no')", globals: [greeting: "bye", other: 1])

        assert {:ok, %{value: "hi, bob"}} = Session.call(s, "greet", ["bob"])
        assert {:ok, nil} = Session.get(s, "other")
      end

      test "set/3 and get/2 go through the same conversions as globals and results" do
        s = start!()
        assert :ok = Session.set(s, "cfg", %{limits: [1, 2], on: true, at: ~D[2026-12-01]})

        assert {:ok, %{"limits" => [1, 2], "on" => true, "at" => "2026-12-01"}} =
                 Session.get(s, "cfg")

        assert {:ok, %{value: 3}} = Session.run(s, "return cfg.limits[1] + cfg.limits[2]")
        assert {:error, %{kind: :invalid_input}} = Session.set(s, "cfg", self())
        assert {:ok, %{"on" => true}} = Session.get(s, "cfg")
        {:ok, _} = Session.run(s, "function f() end")
        assert {:error, %{kind: :unsupported_value}} = Session.get(s, "f")
        assert {:ok, nil} = Session.get(s, "__lua_sandbox_get")
      end
    end

    test "rollback: false keeps what a failed call changed, as Lua would" do
      s = start!()
      {:ok, _} = Session.run(s, "n = 1")
      assert {:error, _} = Session.run(s, "n = 2 error('x')", rollback: false)
      assert {:ok, %{value: 2}} = Session.run(s, "return n")
    end

    test "the budget is per call; memory spans the session" do
      s = start!(max_memory: 16 * 1024 * 1024)

      for _ <- 1..5,
          do:
            assert({:ok, _} = Session.run(s, "for i = 1, 5000 do end", max_instructions: 20_000))

      {:ok, _} = Session.run(s, "keep = string.rep('x', 3 * 1024 * 1024)")

      assert {:error, %{kind: :memory_limit}} =
               Session.run(s, "more = string.rep('y', 12 * 1024 * 1024)")

      assert {:ok, %{value: 3_145_728}} = Session.run(s, "return #keep")
    end

    test "tools, modules and globals are state-wide" do
      s =
        start!(
          globals: %{base: 10},
          tools: %{double: fn [x] -> x * 2 end},
          modules: %{"util" => "return {inc = function(x) return x + 1 end}"}
        )

      {:ok, _} =
        Session.run(
          s,
          "util = require('util') function go(x) return tools.double(util.inc(x)) + base end"
        )

      assert {:ok, %{value: 18, stats: %{tool_calls: 1}}} = Session.call(s, "go", [3])
      assert {:ok, %{value: 20}} = Session.call(s, "go", [4])
    end

    test "concurrent callers are serialized" do
      s = start!()

      {:ok, _} =
        Session.run(
          s,
          "count = 0 function bump() local c = count for i = 1, 100 do end count = c + 1 return count end"
        )

      1..50
      |> Task.async_stream(fn _ -> Session.call(s, "bump", []) end, max_concurrency: 10)
      |> Enum.each(fn {:ok, {:ok, _}} -> :ok end)

      assert {:ok, %{value: 50}} = Session.run(s, "return count")
    end

    test "a compiled chunk as a call's source: run in the state, under its own name" do
      s = start!(chunk_name: "session")
      {:ok, _} = Session.run(s, "n = 1")
      bump = LuaSandbox.compile!("n = n + 1 return n", chunk_name: "bump")
      assert {:ok, %{value: 2}} = Session.run(s, bump)
      assert {:ok, %{value: 3}} = Session.run(s, bump, max_instructions: 1_000)
      # a failed one rolls back, its message under the chunk's name
      boom = LuaSandbox.compile!("n = 100 error('boom')", chunk_name: "boom")
      assert {:error, %{kind: :runtime, message: message}} = Session.run(s, boom)
      assert message =~ ~r/^boom:1: boom/
      assert {:ok, %{value: 3}} = Session.run(s, "return n")
      assert %{calls: 5, rollbacks: 1} = Session.info(s)
    end

    test "setup errors are returned from start_link" do
      assert {:error, %LuaSandbox.Error{kind: :syntax}} =
               Session.start_link(
                 LuaSandbox.Isolation.opts(@isolation, modules: %{"bad" => "return +"})
               )

      assert {:error, %LuaSandbox.Error{kind: :invalid_input}} =
               Session.start_link(LuaSandbox.Isolation.opts(@isolation, globals: %{x: self()}))
    end
  end
end
