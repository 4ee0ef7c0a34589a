-- The sandbox prelude. It runs once in every fresh state, before any user code, after
-- csrc/sb_baselib.c installed the sandbox's C versions of print, io.write, load, pcall,
-- xpcall, collectgarbage, require, coroutine.*, debug.traceback and the stubs of removed
-- functions. It defines no function a script can call in place of a builtin: it only trims
-- the globals and builds the `tools` table. Its argument is the C constructor of one tool.
local make_tool = ...

local G = _G
local pairs, next, error, setmetatable, getmetatable, type = pairs, next, error, setmetatable, getmetatable, type
local concat = table.concat

-- An allowlist, not a denylist: whatever a future Lua or mlua adds stays out.
local allowed = {
  assert = true, error = true, getmetatable = true, ipairs = true, next = true, pairs = true,
  pcall = true, rawequal = true, rawget = true, rawlen = true, rawset = true, select = true,
  setmetatable = true, tonumber = true, tostring = true, type = true, xpcall = true,
  _G = true, _VERSION = true, load = true, collectgarbage = true, print = true,
  require = true, dofile = true, loadfile = true,
  string = true, table = true, math = true, utf8 = true, coroutine = true, os = true,
  io = true, debug = true, package = true,
}
for k in pairs(G) do
  if not allowed[k] then
    G[k] = nil
  end
end

-- One shared string metatable: a script must not be able to reach or modify it.
getmetatable("").__metatable = false

-- Tools: `tools.<name>(...)` suspends the run and asks the host (csrc/sb_baselib.c).
local function make_tools(names)
  local impl = {}
  for i = 1, #names do
    impl[names[i]] = make_tool(names[i])
  end
  -- An unknown name is an error that lists the tools (the host sends the names sorted):
  -- a model that guessed a tool learns which exist instead of "attempt to call a nil value".
  local known = concat(names, ", ")
  G.tools = setmetatable({}, {
    __index = function(_, k)
      local f = impl[k]
      if f == nil then
        local shown = type(k) == "string" and ("'" .. k .. "'") or ("a " .. type(k) .. " key")
        error("unknown tool " .. shown .. "; the tools are: " .. known, 2)
      end
      return f
    end,
    __newindex = function()
      error("tools is read-only", 2)
    end,
    -- `pairs(tools)` lists the tools (name, function).
    __pairs = function()
      return next, impl, nil
    end,
    __metatable = false,
  })
  -- A tool's name used as a global (the `tools.` prefix forgotten) is an error that says so,
  -- where it would otherwise be nil ("attempt to call a nil value"). Only for those names,
  -- and only until the script sets a metatable of its own on _G.
  setmetatable(G, {
    __index = function(_, k)
      if impl[k] ~= nil then
        error("'" .. k .. "' is a tool: call it as tools." .. k .. "(...)", 2)
      end
    end,
  })
end

return make_tools
