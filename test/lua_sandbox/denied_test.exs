defmodule LuaSandbox.DeniedTest do
  # Every "X is not available in this sandbox" a script hits is counted by name: in the run's
  # stats.denied, in LuaSandbox.metrics/1, in telemetry (telemetry_test.exs) and, opted in, in
  # the audit log. The names probed are not a list kept here: they are every global, every
  # library field and every file method that stock Lua 5.4.9 offers (asked of the unpatched
  # build in test/support/stock_lua.ex), so a capability the sandbox removes later is covered.
  use ExUnit.Case, async: true

  alias LuaSandbox.StockLua

  @stock_names ~S"""
  local names = {}
  for k, v in pairs(_G) do
    if type(v) == 'table' and k ~= '_G' then
      for name in pairs(v) do names[#names + 1] = k .. '.' .. name end
    else
      names[#names + 1] = k
    end
  end
  for name in pairs(getmetatable(io.stdout).__index) do names[#names + 1] = 'file:' .. name end
  table.sort(names)
  return table.concat(names, ' ')
  """

  # Touches every name (reads it; calls it with no arguments if it is a function, a file
  # method on io.stdout), each in its own protected coroutine; returns the messages that say
  # "not available", one per name that gave one.
  @probe ~S"""
  local messages = {}
  for _, path in ipairs(names) do
    local ok, e = coroutine.wrap(function()
      return pcall(function()
        local lib, sep, name = path:match('^([^.:]+)([.:])(.+)$')
        if not lib then
          local f = _G[path]
          if type(f) == 'function' and path ~= 'print' then return f() end
        elseif sep == ':' then
          return io.stdout[name](io.stdout)
        elseif type(_G[lib]) == 'table' then
          local f = _G[lib][name]
          if type(f) == 'function' then return f() end
        end
      end)
    end)()
    if ok == false and type(e) == 'string' and e:find(' is not available in this sandbox', 1, true) then
      messages[#messages + 1] = e
    end
  end
  return messages
  """

  defp stock_names do
    port = StockLua.open()
    %{result: {:ok, [names]}} = StockLua.run_stock(port, @stock_names)
    String.split(names, " ")
  end

  test "every capability a script is denied is counted once per call, by the name it was given" do
    names = stock_names()
    assert "os.getenv" in names and "package.path" in names and "file:read" in names

    assert {:ok, %{value: messages, stats: %{denied: denied}}} =
             LuaSandbox.run(@probe, globals: %{names: names})

    # the name each message gives, e.g. "io.read" from "io.read is not available in ..."
    said =
      Enum.map(messages, fn m ->
        [name | _] = String.split(m, " is not available in this sandbox")
        name |> String.split(": ") |> List.last()
      end)

    assert length(said) > 30
    assert denied == Map.new(said, &{&1, 1})
  end

  test "a denial caught by the script is still counted; none is counted for a clean run" do
    src =
      "for i = 1, 3 do pcall(os.getenv, 'HOME') end return pcall(function() return package.path end)"

    assert {:ok, %{values: [false, _], stats: %{denied: denied}}} = LuaSandbox.run(src)
    assert denied == %{"os.getenv" => 3, "package.path" => 1}
    assert {:ok, %{stats: %{denied: empty}}} = LuaSandbox.run("return 1")
    assert empty == %{}

    # and in an error's stats
    assert {:error, %{kind: :runtime, stats: %{denied: %{"io.read" => 1}}}} =
             LuaSandbox.run("io.read()")
  end

  test "a session call counts its own denials" do
    {:ok, s} = LuaSandbox.Session.start_link()

    assert {:ok, %{stats: %{denied: %{"os.exit" => 1}}}} =
             LuaSandbox.Session.run(s, "pcall(os.exit)")

    assert {:ok, %{stats: %{denied: none}}} = LuaSandbox.Session.run(s, "return 1")
    assert none == %{}
  end

  describe "metrics and the audit log" do
    defmodule Capture do
      # a :logger handler that sends every event to the test process
      def log(event, %{config: %{pid: pid}}), do: send(pid, {:logged, event})
    end

    test "metrics count denials by name; audit_log: logs each with tenant, chunk, capability" do
      name = :"lua_denied_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name, audit_log: :warning})
      handler = :"denied_#{System.unique_integer([:positive])}"
      :ok = :logger.add_handler(handler, Capture, %{config: %{pid: self()}})
      on_exit(fn -> :logger.remove_handler(handler) end)

      opts = [supervisor: name, tenant: "acme", chunk_name: "agent"]

      ExUnit.CaptureLog.capture_log(fn ->
        assert {:ok, _} = LuaSandbox.run("pcall(os.getenv) pcall(os.getenv) pcall(dofile)", opts)
        assert {:ok, _} = LuaSandbox.run("return 1", opts)
      end)

      assert LuaSandbox.metrics(name).denied == %{"os.getenv" => 2, "dofile" => 1}

      logged =
        for _ <- 1..2 do
          assert_receive {:logged, %{level: :warning, meta: meta}}, 1_000
          assert %{lua_tenant: "acme", lua_chunk: "agent", lua_supervisor: ^name} = meta
          {meta.lua_capability, meta.lua_count}
        end

      assert Enum.sort(logged) == [{"dofile", 1}, {"os.getenv", 2}]
      refute_receive {:logged, %{meta: %{lua_capability: _}}}, 100
    end

    test "without audit_log nothing is logged" do
      name = :"lua_denied_#{System.unique_integer([:positive])}"
      start_supervised!({LuaSandbox.Supervisor, name: name})
      handler = :"denied_#{System.unique_integer([:positive])}"
      :ok = :logger.add_handler(handler, Capture, %{config: %{pid: self()}})
      on_exit(fn -> :logger.remove_handler(handler) end)
      assert {:ok, _} = LuaSandbox.run("pcall(os.getenv)", supervisor: name)
      assert LuaSandbox.metrics(name).denied == %{"os.getenv" => 1}
      refute_receive {:logged, %{meta: %{lua_capability: _}}}, 100
    end
  end
end
