defmodule LuaSandbox.IsolationTest do
  # Runs reuse slots restored from a pristine snapshot (native/lua_sandbox_core): nothing a run
  # changes may be visible to the next run in the same slot.
  use ExUnit.Case, async: false

  # A fingerprint of everything a run could have changed that the next could observe.
  @probe """
  local parts = {}
  local function add(x) parts[#parts + 1] = tostring(x) end
  local function keys(t)
    local ks = {}
    for k, v in pairs(t) do ks[#ks + 1] = tostring(k) .. ':' .. type(v) end
    table.sort(ks)
    return table.concat(ks, ',')
  end
  add(keys(_G)) add(keys(string)) add(keys(table)) add(keys(math)) add(keys(os))
  add(keys(coroutine)) add(keys(utf8)) add(math.pi) add(math.maxinteger)
  add(getmetatable(_G)) add(getmetatable('')) add(("x"):upper())
  add(rawequal(string, _G.string)) add(arg_left_behind)
  return table.concat(parts, '|')
  """

  @vandal """
  for _, lib in ipairs({string, table, math, os, coroutine, utf8}) do
    for k in pairs(lib) do lib[k] = nil end
    lib.planted = function() return 'planted' end
  end
  setmetatable(_G, {__index = function() return 'ghost' end, __newindex = rawset})
  for i = 1, 500 do _G['global' .. i] = {i} end
  arg_left_behind = 'yes'
  print = nil pcall = nil require = nil
  return 'vandalized'
  """

  test "a run that vandalizes every library and the globals leaves nothing behind" do
    {:ok, %{value: pristine}} = LuaSandbox.run(@probe)

    for _ <- 1..20 do
      assert {:ok, %{value: "vandalized"}} = LuaSandbox.run(@vandal)
      assert {:ok, %{value: ^pristine}} = LuaSandbox.run(@probe)
    end

    # Also with concurrent runs, which lease several slots.
    1..40
    |> Task.async_stream(fn i ->
      if rem(i, 2) == 0, do: LuaSandbox.run(@vandal), else: LuaSandbox.run(@probe)
    end)
    |> Enum.each(fn {:ok, {:ok, %{value: v}}} -> assert v in ["vandalized", pristine] end)

    assert {:ok, %{value: ^pristine}} = LuaSandbox.run(@probe)
  end

  test "a run that dies at its limits leaves nothing behind either" do
    {:ok, %{value: pristine}} = LuaSandbox.run(@probe)

    for src <- [
          @vandal <> " while true do end",
          @vandal <> " local t = {} for i = 1, 1e9 do t[i] = i end"
        ] do
      assert {:error, _} =
               LuaSandbox.run(String.replace(src, "return 'vandalized'", ""),
                 max_instructions: 200_000,
                 max_memory: 2_000_000
               )

      assert {:ok, %{value: ^pristine}} = LuaSandbox.run(@probe)
    end
  end

  test "math.random is seeded afresh for every run" do
    firsts =
      for _ <- 1..20 do
        {:ok, %{value: v}} = LuaSandbox.run("return math.random(1, 1 << 50)")
        v
      end

    assert length(Enum.uniq(firsts)) == 20
  end

  test "a seeded sequence is reproducible, as in stock Lua" do
    src = "math.randomseed(42) return math.random(1, 1000000), math.random()"
    {:ok, a} = LuaSandbox.run(src)
    {:ok, b} = LuaSandbox.run(src)
    assert a.values == b.values
  end
end
