defmodule LuaSandbox.CollectorShapes do
  @moduledoc false
  # Lua setups that make the collector and table scans do work no instruction pays for
  # (issue 16): each defines locals for a loop body (`collectgarbage()`, an allocation, a
  # `next`). One place, used by the generated bounded-ops suite (kill latency, charge rate)
  # and by test/adversarial/collector_test.exs.

  @doc """
  `m` weak-keyed (ephemeron) tables holding one chain `k1 -> k2 -> ... -> k(m+1)`, link `i`
  in table `perm[i]` for a random `perm`: the ephemeron list is walked in table order, in
  alternating directions, so the atomic phase's convergence marks about one link per pass
  over all `m` tables: one collection is O(m²) with no instruction running. `root` holds
  the chain's head; `chain_ok()` walks it (true when all `m` links survived).
  """
  def ephemeron_chain(m) do
    """
    local m = #{m}
    local perm = {}
    for i = 1, m do perm[i] = i end
    for i = m, 2, -1 do local j = math.random(i) perm[i], perm[j] = perm[j], perm[i] end
    eph = {}
    for i = 1, m do eph[i] = setmetatable({}, {__mode = 'k'}) end
    local keys = {}
    for i = 1, m + 1 do keys[i] = {} end
    for i = 1, m do eph[perm[i]][keys[i]] = keys[i + 1] end
    root, where = keys[1], {}
    for i = 1, m do where[i] = perm[i] end
    keys = nil
    function chain_ok()
      local k = root
      for i = 1, m do
        k = eph[where[i]][k]
        if k == nil then return false end
      end
      return true
    end
    """
  end

  @doc "A table of `n` entries in weak mode `mode` ('k', 'v', 'kv'), keys and values collectable."
  def weak_table(mode, n) do
    """
    local w = setmetatable({}, {__mode = '#{mode}'})
    for i = 1, #{n} do w[{}] = {} w[i] = {} end
    """
  end

  @doc "`n` entries set then removed: the slots stay, empty, in the array or the hash part."
  def emptied_table(part, n) do
    key = if part == :array, do: "i", else: "i + 0.5"

    """
    local t = {}
    for i = 1, #{n} do t[#{key}] = true end
    for i = 1, #{n} do t[#{key}] = nil end
    """
  end

  @doc """
  Collector shapes for the generated bounded-ops suite: `{label, setup, loop body}`, `n` the
  suite's table size.
  """
  def vm_ops(n) do
    m = div(n, 4)

    ([
       {"ephemeron chain: full collections", ephemeron_chain(m), "collectgarbage()"},
       {"ephemeron chain: collections driven by allocation", ephemeron_chain(m),
        "local x = {{}, {}, {}}"},
       {"ephemeron chain: a collection inside pcall", ephemeron_chain(m),
        "pcall(collectgarbage)"},
       {"ephemeron chain: collection steps", ephemeron_chain(m), "collectgarbage('step', 0)"}
     ] ++
       for mode <- ~w(k v kv) do
         {"weak table ('#{mode}'): full collections", weak_table(mode, n), "collectgarbage()"}
       end ++
       [
         {"long string table: grown and shrunk", "local t = {} local n = #{n}",
          "for i = 1, n do t[i] = 'k' .. i end t = {} collectgarbage()"}
       ] ++
       for part <- [:array, :hash], size <- [n, 4 * n] do
         setup = emptied_table(part, size)

         [
           {"emptied table (#{part}, #{size}): next", setup, "local k = next(t)"},
           {"emptied table (#{part}, #{size}): a restarted pairs", setup,
            "for k in pairs(t) do end"},
           {"emptied table (#{part}, #{size}): json.encode", setup,
            "local s = pcall(json.encode, t)"}
         ]
       end)
    |> List.flatten()
  end

  @doc """
  On a peer with one dirty CPU scheduler: kills a run of `source` once it is under way,
  then times `LuaSandbox.TestRemote.dirty_probe!/0`, which cannot finish on a normal
  scheduler, so it waits for the dirty scheduler the killed run held.
  """
  def kill_then_probe(source, opts) do
    pid = spawn(fn -> LuaSandbox.run(source, opts) end)
    Process.sleep(200)
    t0 = System.monotonic_time(:microsecond)
    Process.exit(pid, :kill)
    probe!()
    System.monotonic_time(:microsecond) - t0
  end

  @doc "As `kill_then_probe/2`, the run ended by a 300 ms deadline instead of a kill."
  def timeout_then_probe(source, opts) do
    {:error, %LuaSandbox.Error{kind: :timeout}} = LuaSandbox.run(source, [timeout: 300] ++ opts)
    t0 = System.monotonic_time(:microsecond)
    probe!()
    System.monotonic_time(:microsecond) - t0
  end

  defp probe!, do: LuaSandbox.TestRemote.dirty_probe!()
end
