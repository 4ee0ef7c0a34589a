defmodule LuaSandbox.Describe do
  @moduledoc false
  # LuaSandbox.describe/1: what a script can use under a set of options, as text for a
  # model's prompt. The inventory of functions and libraries is taken from a fresh sandboxed
  # state itself (the script below), not from a list kept here: a function is listed when a
  # call to it does anything but raise the sandbox's "is not available" (csrc/sb_baselib.c
  # stubs), and listed as refused when it does. Tools come from their specs (LuaSandbox.Tools),
  # limits from the validated options (LuaSandbox.Options).
  #
  # The probe is the library asking itself, not a script's run: it goes to LuaSandbox.Runner
  # directly, under no supervisor, so nothing accounts for it — its ~40 refused calls reach no
  # metrics, telemetry or audit log, and it takes no slot or tenant quota. It is a fixed script
  # under the default limits, and stops like any run if its caller dies.

  alias LuaSandbox.{Options, Runner, Tools}

  # Each function is probed with no arguments inside its own coroutine (so even a yield stays
  # inside the probe); whatever it does happens in a throwaway state.
  @inventory ~S"""
  local fns, libs, refused = {}, {}, {}
  local function works(f)
    local ok, e = coroutine.wrap(function() return pcall(f) end)()
    if ok == false and type(e) == 'string' and e:find(' is not available in this sandbox', 1, true) then
      refused[#refused + 1] = e
      return false
    end
    return true
  end
  for k, v in pairs(_G) do
    if type(v) == 'function' then
      if works(v) then fns[#fns + 1] = k end
    elseif type(v) == 'table' and k ~= '_G' and k ~= 'tools' then
      local names = {}
      for name, f in pairs(v) do
        if type(f) ~= 'function' or works(f) then names[#names + 1] = name end
      end
      table.sort(names)
      libs[#libs + 1] = k .. '.{' .. table.concat(names, ', ') .. '}'
    end
  end
  table.sort(fns) table.sort(libs) table.sort(refused)
  return fns, libs, refused
  """

  def describe(opts) do
    opts = Options.validate!(opts)
    {functions, libraries, refused} = inventory()

    [
      "Lua 5.4 in a sandbox. `return` the script's answer; print output is captured.",
      "Functions: " <> Enum.join(functions, ", "),
      "Libraries: " <> Enum.join(libraries, "; "),
      tools(opts[:tools]),
      modules(opts[:modules]),
      "Limits: " <> limits(opts),
      "Not available (calling one raises an error saying so): " <> refused
    ]
    |> Enum.reject(&is_nil/1)
    |> Enum.join("\n")
  end

  defp inventory do
    {:ok, %{values: [functions, libraries, refused]}} =
      Runner.run(@inventory, Options.validate!(chunk_name: "lua_sandbox.describe"))

    {functions, libraries, refused_text(refused)}
  end

  # "io.read is not available in this sandbox (hint)": the names grouped by their hint.
  defp refused_text(messages) do
    messages
    |> Enum.map(fn m ->
      [name, rest] = String.split(m, " is not available in this sandbox", parts: 2)
      {name, rest |> String.trim() |> String.trim_leading("(") |> String.trim_trailing(")")}
    end)
    |> Enum.group_by(&elem(&1, 1), &elem(&1, 0))
    |> Enum.sort()
    |> Enum.map_join("; ", fn
      {"", names} -> Enum.join(names, ", ")
      {hint, names} -> Enum.join(names, ", ") <> " (#{hint})"
    end)
  end

  defp tools(tools) when map_size(tools) == 0, do: "Tools: none."

  defp tools(tools) do
    "Tools (call as tools.name(...); `pairs(tools)` lists them; a tool returns its value, " <>
      "or nil and an error message):\n" <> Tools.describe(tools)
  end

  defp modules([]), do: nil

  defp modules(modules),
    do: "Modules (load with require(name)): " <> Enum.map_join(modules, ", ", &elem(&1, 0))

  defp limits(opts) do
    [
      "#{opts[:max_instructions]} VM instructions",
      "#{opts[:max_memory]} bytes of memory",
      "#{opts[:max_output]} bytes of output",
      "#{opts[:max_tool_calls]} tool calls",
      "results nested at most #{opts[:max_depth]} deep and #{opts[:max_result_bytes]} bytes",
      if(opts[:timeout] == :infinity, do: nil, else: "#{opts[:timeout]} ms")
    ]
    |> Enum.reject(&is_nil/1)
    |> Enum.join(", ")
  end
end
