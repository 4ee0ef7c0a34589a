//! `string.rep`, `table.insert/remove/move/concat`: identical to stock Lua on ordinary input,
//! and stopped by the budget where their loops would run unbounded.

use std::time::{Duration, Instant};

use crate::budget::{self, Control};
use crate::hardened;
use crate::scope::Scope;
use mlua::Lua;

/// Runs every case with the stock function and with the patched one; the serialized outcomes
/// (results, error message, final table) must be equal.
const COMPARE: &str = r#"
local cases = ...
local function ser(v, seen)
  local t = type(v)
  if t == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    orig.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    local out = {}
    for _, k in ipairs(keys) do out[#out + 1] = tostring(k) .. "=" .. ser(v[k]) end
    return "{" .. orig.concat(out, ",") .. "}"
  end
  return t .. ":" .. tostring(v)
end
local function outcome(impl, case)
  local env = setmetatable({T = impl}, {__index = _G})
  local f = assert(load(case, "case", "t", env))
  local r = table.pack(pcall(f))
  local parts = {}
  for i = 1, r.n do parts[i] = ser(r[i]) end
  return orig.concat(parts, " ")
end
local patched = {rep = string.rep, insert = table.insert, remove = table.remove,
                 move = table.move, concat = table.concat}
for _, case in ipairs(cases) do
  local a, b = outcome(orig, case), outcome(patched, case)
  if a ~= b then error("differs for " .. case .. "\n stock:   " .. a .. "\n patched: " .. b) end
end
return #cases
"#;

const CASES: &[&str] = &[
    "return T.rep('ab', 3), T.rep('ab', 3, ','), T.rep('', 5), T.rep('x', 0), T.rep('x', -1)",
    "return T.rep('x', 2, ''), T.rep('', 3, '-')",
    "return T.rep()",
    "return T.rep('x')",
    "return T.rep('x', 1.5)",
    "return T.rep('x', 1e300)",
    "return T.rep('xy', 2^40)",
    "local t = {1, 2, 3} T.insert(t, 4) T.insert(t, 1, 0) T.insert(t, 3, 'm') return t",
    "local t = {} T.insert(t, 'a') return t",
    "local t = {1} T.insert(t, 5, 2) return t",
    "local t = {1} T.insert(t, 0, 2) return t",
    "local t = {1} T.insert(t, 1, 2, 3) return t",
    "local t = {1} T.insert(t) return t",
    "return T.insert(nil, 1)",
    "local t = {1, 2, 3} local a = T.remove(t) local b = T.remove(t, 1) return a, b, t",
    "local t = {} return T.remove(t), T.remove(t, 0), T.remove(t, 1), t",
    "local t = {1, 2} return T.remove(t, 5)",
    "local t = {1, 2, 3} return T.remove(t, 3), T.remove(t, #t + 1), t",
    "local t = {1, 2, 3, 4, 5} T.move(t, 2, 4, 1) return t",
    "local t = {1, 2, 3, 4, 5} T.move(t, 1, 3, 3) return t",
    "local a, b = {1, 2, 3}, {} return T.move(a, 1, 3, 2, b) == b, b",
    "return T.move({}, 1, math.maxinteger, 2)",
    "return T.move({}, -1, math.maxinteger, 2)",
    "return T.move({}, 1, 3, math.maxinteger)",
    "return T.move({}, 3, 1, 1)",
    "return T.move(1, 1, 1, 1)",
    "return T.concat({1, 2, 'x'}), T.concat({1, 2, 3}, ', '), T.concat({1, 2, 3}, '-', 2, 3)",
    "return T.concat({}), T.concat({1, 2}, 'x', 3, 2), T.concat({'a'}, ',', 1, 1)",
    "return T.concat({1, {}, 3})",
    "return T.concat({1, 2}, ',', 1, 5)",
    "local p = setmetatable({}, {__index = function(_, i) return i * 10 end, __len = function() return 4 end}) return T.concat(p, '+')",
    "local log = {} local p = setmetatable({}, {__len = function() return 3 end, __index = function(_, k) return k end, __newindex = function(_, k, v) log[#log + 1] = k .. ':' .. tostring(v) end}) T.insert(p, 1, 'z') return log",
    "local log = {} local p = setmetatable({}, {__len = function() return 3 end, __index = function(_, k) return k end, __newindex = function(_, k, v) log[#log + 1] = k .. ':' .. tostring(v) end}) T.remove(p, 1) return log",
];

fn state() -> Lua {
    let lua = Lua::new();
    lua.load(
        "orig = {rep = string.rep, insert = table.insert, remove = table.remove, \
         move = table.move, concat = table.concat, sort = table.sort}",
    )
    .exec()
    .unwrap();
    hardened::install(&lua).unwrap();
    lua
}

#[test]
fn patched_loops_match_stock_lua() {
    let lua = state();
    let cases = lua.create_sequence_from(CASES.iter().copied()).unwrap();
    let n: usize = lua.load(COMPARE).call(cases).unwrap();
    assert_eq!(n, CASES.len());
}

#[test]
fn unbounded_loops_stop_at_the_limit() {
    let lua = state();
    let endless = [
        "string.rep('', 1e15)",
        "string.rep('', 1e15, '')",
        "table.move({}, 1, 1e15, 2)",
        "table.insert(setmetatable({}, {__len = function() return 1e15 end}), 1, 0)",
        "table.remove(setmetatable({}, {__len = function() return 1e15 end}), 1)",
        "table.concat(setmetatable({}, {__len = function() return 1e15 end, __index = function() return '' end}))",
    ];
    for code in endless {
        let scope = Scope::budget(Control::new(1_000_000));
        let control = &scope.control;
        let f = lua.load(code).into_function().unwrap();
        let _active = scope.activate(crate::budget::Caller::none());
        budget::install_on(&lua, control);
        let t0 = Instant::now();
        // called from Rust: after the abort no instruction of ours may run
        let err = f.call::<()>(()).unwrap_err().to_string();
        assert!(err.contains("instruction limit exceeded"), "{code}: {err}");
        assert_eq!(budget::current_abort(), Some(budget::Abort::Instructions));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{code} took {:?}",
            t0.elapsed()
        );
    }
}
