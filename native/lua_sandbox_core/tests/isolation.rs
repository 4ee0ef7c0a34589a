//! A restore leaves nothing of the previous run that a script could observe.

mod common;

use common::{eval, new_slot, MIB};

/// Every observable corner the previous run could have changed, as one string.
const PROBE: &str = r#"
  local parts = {}
  local function add(x) parts[#parts + 1] = tostring(x) end
  add(x_global) add(type(print)) add(type(string.rep)) add(string.custom)
  add(getmetatable("").__index == string) add(getmetatable("").__extra)
  add(rawlen(table)) add(type(table.concat)) add(math.pi) add(type(os.time))
  add(getmetatable(_G)) add(type(coroutine.running))
  local n = 0 for _ in pairs(_G) do n = n + 1 end add(n)
  local m = 0 for _ in pairs(string) do m = m + 1 end add(m)
  add(collectgarbage("count") < 200)
  return table.concat(parts, ",")
"#;

const VANDAL: &str = r#"
  x_global = "left behind"
  print = nil
  string.rep = nil
  string.custom = 42
  getmetatable("").__extra = "shared?"
  getmetatable("").__index = { upper = function() return "hijacked" end }
  table[1] = "array part"
  math.pi = 3
  os.time = function() return 0 end
  setmetatable(_G, { __index = function() return "ghost" end })
  for k in pairs(coroutine) do coroutine[k] = nil end
  for i = 1, 1000 do _G["g" .. i] = {i} end
  return "vandalized"
"#;

#[test]
fn a_restore_undoes_every_change_to_globals_libraries_and_metatables() {
    let mut slot = new_slot(64 * MIB);
    let pristine = eval(&mut slot, PROBE).unwrap();
    assert!(pristine.starts_with("nil,function,function,nil,true,nil,0,function,3.14"));
    slot.restore();
    assert_eq!(eval(&mut slot, VANDAL).unwrap(), "vandalized");
    let after = eval(&mut slot, PROBE).unwrap();
    assert_ne!(after, pristine, "the vandal changed the state");
    slot.restore();
    assert_eq!(eval(&mut slot, PROBE).unwrap(), pristine);
}

#[test]
fn the_registry_and_loaded_libraries_are_restored() {
    let mut slot = new_slot(64 * MIB);
    // package.loaded lives in the registry (_LOADED); requiref registered every library.
    let probe = "local t = {} for k in pairs(string) do t[#t+1] = k end table.sort(t) return table.concat(t, ' ')";
    let before = eval(&mut slot, probe).unwrap();
    eval(
        &mut slot,
        "for k in pairs(string) do string[k] = nil end return 1",
    )
    .unwrap();
    assert_eq!(eval(&mut slot, probe).unwrap(), "");
    slot.restore();
    assert_eq!(eval(&mut slot, probe).unwrap(), before);
}

#[test]
fn heavy_runs_then_restore_behave_normally() {
    let mut slot = new_slot(256 * MIB);
    let heavy = r#"
      local t = {}
      for i = 1, 200000 do t[i] = { i, tostring(i) } end
      collectgarbage() collectgarbage()
      local s = 0 for i = 1, #t do s = s + t[i][1] end
      return s
    "#;
    for _ in 0..3 {
        slot.restore();
        assert_eq!(eval(&mut slot, heavy).unwrap(), "20000100000");
        slot.restore();
        assert_eq!(
            eval(&mut slot, "return string.rep('ab', 3) .. #_G").unwrap(),
            "ababab0"
        );
    }
}

#[test]
fn a_run_cut_short_by_an_error_leaves_nothing_either() {
    let mut slot = new_slot(64 * MIB);
    let e = eval(&mut slot, "x_global = 1 local c = coroutine.create(function() coroutine.yield() end) coroutine.resume(c) error('boom')").unwrap_err();
    assert!(e.message.contains("boom"), "{e}");
    slot.restore();
    assert_eq!(eval(&mut slot, "return tostring(x_global)").unwrap(), "nil");
}

#[test]
fn math_random_is_reseeded_per_run_and_slots_hash_strings_differently() {
    let mut slot = new_slot(64 * MIB);
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..10 {
        slot.restore();
        // SAFETY: the state is not running and has an empty stack.
        unsafe { lua_sandbox_core::seed::reseed(slot.state()).unwrap() };
        firsts.insert(eval(&mut slot, "return math.random(1, 1 << 40)").unwrap());
    }
    assert_eq!(firsts.len(), 10, "{firsts:?}");

    // Without a reseed, the restored generator repeats itself: the reseed is what helps.
    let mut same = std::collections::HashSet::new();
    for _ in 0..3 {
        slot.restore();
        same.insert(eval(&mut slot, "return math.random(1, 1 << 40)").unwrap());
    }
    assert_eq!(same.len(), 1);

    // Each slot has its own string-hash seed: key order of a string-keyed table differs.
    let order = "local t = {} for i = 1, 64 do t['k' .. i] = i end local o = {} for k in pairs(t) do o[#o+1] = k end return table.concat(o, ',')";
    let mut slots: Vec<_> = (0..4).map(|_| new_slot(MIB)).collect();
    let orders: std::collections::HashSet<String> =
        slots.iter_mut().map(|s| eval(s, order).unwrap()).collect();
    assert!(orders.len() > 1, "all slots hashed alike");
}

#[test]
fn a_rollback_returns_to_the_checkpoint_exactly() {
    let mut slot = new_slot(64 * MIB);
    eval(&mut slot, "counter = 1 log = {'a'} return 1").unwrap();
    slot.checkpoint().expect("a checkpoint");
    let probe = "return counter .. ':' .. table.concat(log, ',') .. ':' .. tostring(extra)";
    assert_eq!(eval(&mut slot, probe).unwrap(), "1:a:nil");
    eval(
        &mut slot,
        "counter = 2 log[#log + 1] = 'b' extra = string.rep('z', 4 << 20) return 1",
    )
    .unwrap();
    assert_eq!(eval(&mut slot, "return counter").unwrap(), "2");
    slot.rollback();
    assert_eq!(eval(&mut slot, probe).unwrap(), "1:a:nil");
    // The state keeps working and can move on from the rolled-back point.
    eval(&mut slot, "counter = 3 return 1").unwrap();
    assert_eq!(eval(&mut slot, probe).unwrap(), "3:a:nil");
}
