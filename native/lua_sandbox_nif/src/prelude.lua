-- The sandbox prelude. It runs once in every fresh state, before any user code, with the
-- host's natives as arguments. Everything a protection depends on is captured here as an
-- upvalue, so a script that replaces `_G`, `pcall`, `setmetatable` or `coroutine.*` only
-- changes its own view, never the protections.
local check, aborted, emit, save_traceback, charge = ...

-- Set per run through `configure` (returned below); the default matches the Elixir default.
local max_source = 1048576

local G = _G
local type, select, error, tostring, rawget = type, select, error, tostring, rawget
local pairs = pairs

-- An allowlist, not a denylist: whatever a future Lua or mlua adds stays out.
local allowed = {
  assert = true, error = true, getmetatable = true, ipairs = true, next = true, pairs = true,
  pcall = true, rawequal = true, rawget = true, rawlen = true, rawset = true, select = true,
  setmetatable = true, tonumber = true, tostring = true, type = true, xpcall = true,
  _G = true, _VERSION = true, load = true, collectgarbage = true, print = true,
  string = true, table = true, math = true, utf8 = true, coroutine = true, os = true,
}
for k in pairs(G) do
  if not allowed[k] then
    G[k] = nil
  end
end
local os = G.os
G.os = { time = os.time, clock = os.clock, date = os.date }
-- Bytecode is not verified by Lua; a script must never get or load any.
string.dump = nil
local raw_pcall, raw_xpcall, raw_load = pcall, xpcall, load
local raw_setmetatable, raw_getmetatable = setmetatable, getmetatable
local raw_collect = collectgarbage
local co_create, co_resume, co_yield = coroutine.create, coroutine.resume, coroutine.yield
local co_status, co_running, co_close = coroutine.status, coroutine.running, coroutine.close
local co_isyieldable = coroutine.isyieldable
local concat, unpack = table.concat, table.unpack

local string_byte, string_format = string.byte, string.format

-- Argument errors for the wrapped functions, worded as Lua's own (luaL_argerror): raised from
-- here, the C originals could not name themselves, as this chunk has no debug information.
-- `level` counts from the wrapper's caller, as a C function's luaL_error would.
local function argerror(n, fname, msg, level)
  error(string_format("bad argument #%d to '%s' (%s)", n, fname, msg), 2 + (level or 1))
end

local function expect(n, fname, tname, count, v)
  if type(v) ~= tname then
    argerror(n, fname, tname .. " expected, got " .. (count < n and "no value" or type(v)), 2)
  end
end

-- Identifies a tool call travelling up through coroutines to the host. Scripts never see it.
local TOOL = {}
local main_co = nil

-- pcall and friends return errors as values; `check` re-raises once the run was aborted
-- (instruction/memory/output limit, kill), so a loop around them cannot outlive the abort.
G.pcall = function(...)
  if select("#", ...) == 0 then
    argerror(1, "pcall", "value expected")
  end
  return check(raw_pcall(...))
end

-- After an abort the user's message handler is skipped: it could only run to be stopped again
-- (the ticker raises at every instruction once aborted), and error handling stays bounded.
G.xpcall = function(f, handler, ...)
  if type(handler) ~= "function" then
    error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
  end
  return check(raw_xpcall(f, function(e)
    if aborted() then
      return e
    end
    return handler(e)
  end, ...))
end

-- A tool call made inside a coroutine the script created has to reach the host: pass it up
-- through every level, then hand the host's answer back down.
local function forward(co, ok, ...)
  if ok and ... == TOOL and co_status(co) == "suspended" then
    return forward(co, co_resume(co, co_yield(...)))
  end
  return ok, ...
end

local coroutine = G.coroutine
coroutine.resume = function(...)
  local co = ...
  if type(co) ~= "thread" then
    expect(1, "resume", "coroutine", select("#", ...), co)
  end
  return check(forward(co, co_resume(...)))
end

local function unwrap(co, ok, ...)
  if ok then
    return ...
  end
  local e = ...
  check(false, e)
  if co_status(co) == "dead" then
    co_close(co)
  end
  if type(e) == "string" then
    error(e, 2)
  end
  error(e, 0)
end

coroutine.wrap = function(...)
  local f = ...
  expect(1, "wrap", "function", select("#", ...), f)
  local co = co_create(f)
  return function(...)
    return unwrap(co, forward(co, co_resume(co, ...)))
  end
end

coroutine.close = function(...)
  local co = ...
  if type(co) ~= "thread" then
    expect(1, "close", "coroutine", select("#", ...), co)
  end
  return check(co_close(co))
end

-- The run itself is a coroutine so tool calls can suspend it; to the script it must still
-- look like the main thread.
coroutine.yield = function(...)
  if co_running() == main_co then
    error("attempt to yield from outside a coroutine", 2)
  end
  return co_yield(...)
end

coroutine.running = function()
  local co, ismain = co_running()
  return co, ismain or co == main_co
end

coroutine.isyieldable = function(...)
  local co = ...
  if select("#", ...) == 0 then
    co = co_running()
  end
  if co == main_co then
    return false
  end
  return co_isyieldable(co)
end

-- Text chunks only, bounded in size, and charged one step per byte: parsing is not covered
-- by the instruction ticker, so a loop of `load` calls would otherwise be nearly free. Errors
-- raised by a reader function cannot hide an abort.
G.load = function(...)
  local chunk = ...
  local n = select("#", ...) - 1
  local name, mode, env = select(2, ...)
  local tchunk = type(chunk)
  if tchunk ~= "string" and tchunk ~= "number" and tchunk ~= "function" then
    expect(1, "load", "function", n + 1, chunk)
  end
  if mode ~= nil and type(mode) == "string" and not mode:find("t", 1, true) then
    return nil, string_format("attempt to load a text chunk (mode is '%s')", mode)
  end
  if type(chunk) == "string" then
    if #chunk > max_source then
      return nil, "chunk is larger than max_source"
    end
    charge(#chunk)
  elseif type(chunk) == "function" then
    local reader, total = chunk, 0
    chunk = function()
      local piece = reader()
      if type(piece) == "string" then
        total = total + #piece
        if total > max_source then
          error("chunk is larger than max_source", 0)
        end
        charge(#piece)
      end
      return piece
    end
  end
  if n >= 3 then
    return check(raw_load(chunk, name, "t", env))
  end
  return check(raw_load(chunk, name, "t"))
end

-- Finalizers also run when the state is closed, after the run, on the pool's thread, where no
-- budget applies: an object with `__gc` could loop there forever. Lua only marks an object for
-- finalization if its metatable has `__gc` when it is set, so refusing that here is enough.
G.setmetatable = function(...)
  local t, mt = ...
  expect(1, "setmetatable", "table", select("#", ...), t)
  if mt ~= nil and type(mt) ~= "table" then
    argerror(2, "setmetatable", "nil or table expected")
  end
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in the sandbox", 2)
  end
  return raw_setmetatable(t, mt)
end

-- Only "count": stopping or retuning the collector would let a script grow past what the
-- memory limit expects, or spend unbudgeted time in a full collection.
G.collectgarbage = function(opt, ...)
  if opt == "count" then
    return raw_collect("count")
  end
  error("collectgarbage: only \"count\" is allowed in the sandbox", 2)
end

G.print = function(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do
    parts[i] = tostring((select(i, ...)))
  end
  emit(concat(parts, "\t", 1, n) .. "\n")
end

local io_table = {}
io_table.write = function(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    local tv = type(v)
    if tv == "string" then
      emit(v)
    elseif tv == "number" then
      emit(tostring(v))
    else
      error(string_format("bad argument #%d to 'write' (string expected, got %s)", i, tv), 2)
    end
  end
  return io_table
end
G.io = io_table

-- One shared string metatable: a script must not be able to reach or modify it.
raw_getmetatable("").__metatable = false

-- Tools: `tools.<name>(...)` suspends the run and asks the host. Where a yield is impossible
-- (inside string.gsub, table.sort, a C-called metamethod) say so instead of Lua's generic
-- "attempt to yield across a C-call boundary".
local function finish_tool(ok, ...)
  if ok then
    return ...
  end
  error((...), 2)
end

local function make_tools(names)
  local impl = {}
  for i = 1, #names do
    local name = names[i]
    impl[name] = function(...)
      if not co_isyieldable() then
        error("tool '" .. name .. "' cannot be called here: the caller cannot yield "
          .. "(string.gsub callback, table.sort comparator or a metamethod called from C)", 2)
      end
      return finish_tool(co_yield(TOOL, name, ...))
    end
  end
  -- An unknown name is an error that lists the tools (the host sends the names sorted):
  -- a model that guessed a tool learns which exist instead of "attempt to call a nil value".
  local known = concat(names, ", ")
  local proxy = raw_setmetatable({}, {
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
    __metatable = false,
  })
  G.tools = proxy
end

-- require: modules come from the host only, are run once per run and cached.
local function make_require(loaders)
  local loaded = {}
  G.require = function(name)
    if type(name) ~= "string" then
      error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
    end
    local cached = loaded[name]
    if cached ~= nil then
      return cached
    end
    local loader = loaders[name]
    if loader == nil then
      error("module '" .. name .. "' not found", 2)
    end
    local result = loader(name)
    if result == nil then
      result = true
    end
    if loaded[name] == nil then
      loaded[name] = result
    end
    return loaded[name]
  end
end

local function run_inner(chunk, call_name, ...)
  if call_name == nil then
    return chunk()
  end
  chunk()
  local f = rawget(G, call_name)
  if type(f) ~= "function" then
    error("global '" .. call_name .. "' is not a function (got " .. type(f) .. ")", 0)
  end
  return f(...)
end

-- The host receives `true, results...` or `false, error_object` as plain values (the error
-- object is not converted to a string on the way), with the traceback saved aside. After an
-- abort nothing of the script's runs, not even the traceback.
local function on_error(e)
  if not aborted() then
    save_traceback()
  end
  return e
end

local function runner(...)
  return raw_xpcall(run_inner, on_error, ...)
end

-- Per run: the run coroutine (so it can look like the main thread) and the `load` bound.
local function configure(co, source_limit)
  main_co = co
  max_source = source_limit
end

make_require({})

return TOOL, runner, configure, make_tools, make_require
