defmodule LuaSandbox.DescribeTest do
  use ExUnit.Case, async: true

  defp tools do
    [
      search: {fn [q | _] -> [q] end, args: [query: :string, limit: {:integer, :optional}]},
      now: fn [] -> 0 end
    ]
  end

  test "describe/1 lists what a fresh state offers, the tools, modules, limits and what is refused" do
    text = LuaSandbox.describe(tools: tools(), modules: %{"util" => "return {}"}, timeout: 1234)

    # Every global function and library function a script can call is named, found by asking
    # a state (so this check is not a second list): each one listed works, each refused raises.
    {:ok, %{value: names}} =
      LuaSandbox.run("""
      local out = {}
      for k, v in pairs(_G) do
        if type(v) == 'function' then out[#out + 1] = k
        elseif type(v) == 'table' and k ~= '_G' and k ~= 'tools' then
          for n, f in pairs(v) do
            if type(f) == 'function' then out[#out + 1] = k .. '.' .. n end
          end
        end
      end
      return out
      """)

    for name <- names do
      described =
        case String.split(name, ".") do
          [f] -> text =~ ~r/\b#{f}\b/
          [lib, f] -> text =~ ~r/\b#{lib}\.\{[^}]*\b#{f}\b/ or text =~ name
        end

      assert described, "#{name} is not described"
    end

    assert text =~ "json.{array, decode, encode, null}"
    assert text =~ "tools.search(query: string, limit?: integer)"
    assert text =~ "tools.now(...)"
    assert text =~ "Modules (load with require(name)): util"
    assert text =~ "1234 ms"
    assert text =~ "io.open"
    assert text =~ "os.execute"
    refute text =~ ~r/Functions:.*\bdofile\b/
    assert LuaSandbox.describe() =~ "Tools: none."
    assert_raise ArgumentError, fn -> LuaSandbox.describe(nope: 1) end
  end

  test "pairs(tools) lists the tools" do
    src =
      "local t = {} for k, v in pairs(tools) do t[#t + 1] = k .. ':' .. type(v) end " <>
        "table.sort(t) return t"

    assert LuaSandbox.run!(src, tools: tools()).value == ["now:function", "search:function"]
  end

  test "a tool called without the tools. prefix says how to call it; other globals are nil" do
    assert {:error, %{kind: :runtime, message: msg}} =
             LuaSandbox.run("return search('x')", tools: tools())

    assert msg =~ "'search' is a tool: call it as tools.search(...)"
    assert LuaSandbox.run!("return nothing_here", tools: tools()).value == nil
    # a script's own metatable on _G replaces the hint
    assert LuaSandbox.run!("setmetatable(_G, {}) return search", tools: tools()).value == nil
  end
end

defmodule LuaSandbox.DescribeAccountingTest do
  # Not async: it reads the default supervisor's counters, which async tests move meanwhile
  # (ExUnit runs the synchronous modules after the async ones, one at a time).
  use ExUnit.Case, async: false

  test "describe/1 finds the refused functions without counting a run or a denial" do
    before = LuaSandbox.metrics()
    text = LuaSandbox.describe()
    # the probe did call the refused functions
    assert text =~ "os.getenv" and text =~ "io.open"
    now = LuaSandbox.metrics()
    assert now.denied == before.denied
    assert now.runs == before.runs
  end
end
