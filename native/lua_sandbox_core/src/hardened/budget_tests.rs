//! The patched builtins charge their work and stop once the budget is used up.

use std::time::{Duration, Instant};

use crate::budget::{self, Control};
use crate::hardened;
use crate::scope::Scope;
use mlua::{IntoLuaMulti, Lua};

const LIMIT: u64 = 1_000_000;
const MSG: &str = "instruction limit exceeded";

/// Catastrophic calls: each one would run for minutes to hours on stock Lua.
const PATHOLOGICAL: &[(&str, &str)] = &[
    (
        "backtracking find",
        "return string.find(string.rep('a', 3000), '.-.-.-b')",
    ),
    (
        "backtracking match",
        "return string.match(string.rep('a', 3000), '(.-)(.-)(.-)b')",
    ),
    (
        "backtracking gmatch",
        "for _ in string.gmatch(string.rep('a', 3000), '.-.-.-b') do end",
    ),
    (
        "backtracking gsub",
        "return string.gsub(string.rep('a', 3000), '.-.-.-b', 'x')",
    ),
    (
        "method syntax",
        "return (string.rep('a', 3000)):find('a*a*a*b')",
    ),
    (
        "plain find",
        "return string.find(string.rep('a', 1000000), string.rep('a', 10000) .. 'b', 1, true)",
    ),
    (
        "find without specials",
        "return string.find(string.rep('a', 1000000), string.rep('a', 10000) .. 'b')",
    ),
    (
        "balanced",
        "return string.find(string.rep('(', 200000), '%b()')",
    ),
    (
        "back reference",
        "return string.find(string.rep('a', 100000), '(a*)%1b')",
    ),
    (
        "long set",
        "return string.find(string.rep('a', 1000000), '[' .. string.rep('b', 100000) .. ']')",
    ),
    (
        "sort",
        "local t = {} for i = 1, 1000000 do t[i] = (i * 7919) % 1000003 end table.sort(t)",
    ),
    (
        "sort with comparator",
        "local t = {} for i = 1, 1000000 do t[i] = (i * 7919) % 1000003 end \
         table.sort(t, function(a, b) return a > b end)",
    ),
    (
        "sort long strings",
        "local s, v, t = string.rep('x', 1000000), {}, {} \
         for i = 1, 7 do v[i] = s .. i end \
         for i = 1, 2000 do t[i] = v[i % 7 + 1] end table.sort(t)",
    ),
];

fn state() -> Lua {
    let lua = Lua::new();
    hardened::install(&lua).unwrap();
    lua
}

/// Calls `f` from Rust (so no VM instruction of ours runs after an abort) and returns
/// `(ok, message)`.
fn call(f: &mlua::Function) -> (bool, String) {
    match f.call::<mlua::MultiValue>(()) {
        Ok(_) => (true, String::new()),
        Err(e) => (false, e.to_string()),
    }
}

#[test]
fn pathological_calls_stop_at_the_limit() {
    for (name, code) in PATHOLOGICAL {
        let lua = state();
        let scope = Scope::budget(Control::new(LIMIT));
        let control = &scope.control;
        let f = lua.load(*code).into_function().unwrap();
        let started = Instant::now();
        let (ok, err) = {
            let _active = scope.activate(crate::budget::Caller::none());
            budget::install_on(&lua, control);
            call(&f)
        };
        let elapsed = started.elapsed();
        assert!(!ok, "{name}: did not fail");
        assert!(err.contains(MSG), "{name}: {err}");
        assert_eq!(control.abort(), Some(budget::Abort::Instructions), "{name}");
        assert!(
            elapsed < Duration::from_secs(5),
            "{name}: took {elapsed:?} to stop"
        );
        eprintln!("{name}: stopped after {elapsed:?}");
    }
}

#[test]
fn abort_is_sticky_in_builtins() {
    let lua = state();
    let scope = Scope::budget(Control::new(LIMIT));
    let control = &scope.control;
    let f = lua.load(PATHOLOGICAL[0].1).into_function().unwrap();
    let string: mlua::Table = lua.globals().get("string").unwrap();
    let table: mlua::Table = lua.globals().get("table").unwrap();
    let get = |t: &mlua::Table, k: &str| t.get::<mlua::Function>(k).unwrap();
    let calls: Vec<(&str, mlua::Function, mlua::MultiValue)> = vec![
        (
            "find",
            get(&string, "find"),
            ("abc", "b").into_lua_multi(&lua).unwrap(),
        ),
        (
            "find plain",
            get(&string, "find"),
            ("abc", "b", 1, true).into_lua_multi(&lua).unwrap(),
        ),
        (
            "match",
            get(&string, "match"),
            ("abc", "b").into_lua_multi(&lua).unwrap(),
        ),
        (
            "gsub",
            get(&string, "gsub"),
            ("abc", "b", "x").into_lua_multi(&lua).unwrap(),
        ),
        (
            "upper",
            get(&string, "upper"),
            ("abc",).into_lua_multi(&lua).unwrap(),
        ),
        (
            "format",
            get(&string, "format"),
            ("%d", 1).into_lua_multi(&lua).unwrap(),
        ),
        (
            "sort",
            get(&table, "sort"),
            (lua.create_sequence_from([3, 2, 1]).unwrap(),)
                .into_lua_multi(&lua)
                .unwrap(),
        ),
        (
            "unpack",
            get(&table, "unpack"),
            (lua.create_sequence_from([3, 2, 1]).unwrap(),)
                .into_lua_multi(&lua)
                .unwrap(),
        ),
    ];
    let _active = scope.activate(crate::budget::Caller::none());
    budget::install_on(&lua, control);
    let (ok, err) = call(&f);
    assert!(!ok && err.contains(MSG), "{err}");
    // once aborted, even trivial calls of the charging builtins raise again
    for (name, f, args) in calls {
        let r = f.call::<mlua::MultiValue>(args);
        assert!(r.is_err(), "{name}");
        assert!(r.unwrap_err().to_string().contains(MSG), "{name}");
    }
}

#[test]
fn with_the_ticker_the_abort_is_not_swallowed() {
    let lua = state();
    let scope = Scope::budget(Control::new(LIMIT));
    let control = &scope.control;
    let _active = scope.activate(crate::budget::Caller::none());
    budget::install_on(&lua, control);
    let started = Instant::now();
    let err = lua
        .load("local ok = pcall(string.find, string.rep('a', 3000), '.-.-.-b') while true do end")
        .exec()
        .unwrap_err();
    assert!(err.to_string().contains(MSG), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn normal_work_is_charged_but_succeeds() {
    let lua = state();
    let scope = Scope::budget(Control::new(LIMIT));
    let control = &scope.control;
    let _active = scope.activate(crate::budget::Caller::none());
    budget::install_on(&lua, control);
    let (a, b): (i64, i64) = lua
        .load("return string.find(string.rep('ab', 1000) .. 'c', 'b(c)')")
        .eval()
        .map(|(a, b, _c): (i64, i64, String)| (a, b))
        .unwrap();
    assert_eq!((a, b), (2000, 2001));
    budget::settle_on(&lua, control);
    let used = control.instructions();
    assert!(used > 2000, "find charged only {used}");
    lua.load("local t = {} for i = 1, 1000 do t[i] = -i end table.sort(t) assert(t[1] == -1000)")
        .exec()
        .unwrap();
    budget::settle_on(&lua, control);
    assert!(control.instructions() > used + 1000);
    assert_eq!(control.abort(), None);
}

#[test]
fn without_activation_everything_works() {
    let lua = state();
    lua.load(
        r#"
        assert(string.find(string.rep('a', 30), '.-.-.-b') == nil)
        assert(string.find(string.rep('a', 100000) .. 'b', string.rep('a', 100) .. 'b', 1, true)
               == 99901)
        assert(select(2, string.gsub(string.rep('ab', 50000), 'b', '%0%0')) == 50000)
        local n = 0
        for w in string.gmatch("one two three", "%a+") do n = n + 1 end
        assert(n == 3)
        assert(string.match("key = value", "(%w+)%s*=%s*(%w+)") == "key")
        local t = {} for i = 1, 100000 do t[i] = (i * 7919) % 100003 end
        table.sort(t)
        for i = 2, #t do assert(t[i - 1] <= t[i]) end
        table.sort(t, function(a, b) return a > b end)
        assert(t[1] > t[#t])
        "#,
    )
    .exec()
    .unwrap();
}

#[test]
fn activation_ends_cleanly() {
    let lua = state();
    let scope = Scope::budget(Control::new(10));
    let control = &scope.control;
    let f = lua
        .load("return string.rep('a', 5000):find('a-b')")
        .into_function()
        .unwrap();
    {
        let _active = scope.activate(crate::budget::Caller::none());
        budget::install_on(&lua, control);
        let (ok, err) = call(&f);
        assert!(!ok && err.contains(MSG), "{err}");
    }
    // a later run (no activation here) is unaffected by the old abort
    let r: Option<i64> = lua.load("return (string.find('xab', 'a'))").eval().unwrap();
    assert_eq!(r, Some(2));
}

#[test]
fn a_refused_allocation_trips_the_memory_abort_itself() {
    let lua = mlua::Lua::new();
    hardened::install(&lua).unwrap();
    lua.set_memory_limit(32 << 20).unwrap();
    let scope = Scope::budget(Control::new(u64::MAX));
    let control = &scope.control;
    let _a = scope.activate(budget::Caller::none());
    budget::install_on(&lua, control);
    // A raising __close inside pcall used to replace "not enough memory", and nothing
    // here (no prelude) recognised the refusal: the script returned normally.
    let r = lua
        .load(
            r#"
            for i = 1, 1000 do
              pcall(function()
                local guard <close> = setmetatable({}, {__close = function() error("replaced") end})
                local s = string.rep("x", 1 << 30)
              end)
            end
            return "survived"
            "#,
        )
        .eval::<String>();
    assert!(r.is_err(), "{r:?}");
    assert_eq!(control.abort(), Some(budget::Abort::Memory));
}
