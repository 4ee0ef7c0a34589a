//! Generated programs across every library a sandboxed state offers, under randomized limits,
//! end in a result or a clean error — and, in the sanitizer build (`make san`: the vendored Lua,
//! csrc/ and the arena's poisoning under ASan + UBSan), without a memory error or undefined
//! behaviour, which abort the process.
//!
//! Each program is a random sequence of calls drawn from a catalog (string, pattern matching,
//! format, pack, table, sort, math and integer edge cases, utf8, coroutines, json, os, load,
//! metatables, pcall/error, the collector, deep recursion, memory growth), with random
//! arguments that favour edges (mininteger, huge counts, broken patterns, NaN). Every program
//! runs in a full sandbox (`sandbox::new_slot`) restored from its snapshot, with random
//! `max_instructions`, `max_memory`, `max_output` and json depth.
//!
//! `LUA_GENERATED_PROGRAMS` (default 300) and `LUA_GENERATED_SEED` (default: from the clock,
//! printed) choose the run; a failure prints the seed, the program's index and its source.

mod common;

use lua_sandbox_core::budget::{self, Caller, Control};
use lua_sandbox_core::output::{Output, Print};
use lua_sandbox_core::scope::Scope;
use lua_sandbox_core::{sandbox, Slot};

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

const INTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "63",
    "64",
    "255",
    "256",
    "1000",
    "100000",
    "2^31",
    "-2^31",
    "math.maxinteger",
    "math.mininteger",
    "math.maxinteger - 1",
    "2^53",
    "-0.0",
    "0.5",
    "1e308",
    "1/0",
    "-1/0",
    "0/0",
    "#s",
    "-#s",
    "n",
];

const STRINGS: &[&str] = &[
    "''",
    "'a'",
    "'hello world'",
    "'  spaced  '",
    "'%d%%'",
    "'\\0\\1\\255'",
    "'é€😀'",
    "'\\xff\\xfe'",
    "'((()))'",
    "'a,b,,c'",
    "'12345678901234567890'",
    "'-0x7fffffffffffffff'",
    "'[1,2,{\"a\":null}]'",
    "'{\"k\": [true, false, 1.5e3, \"\\\\u00e9\"]}'",
    "s",
    "s .. s",
    "string.rep('ab', n)",
];

const PATTERNS: &[&str] = &[
    "'%a+'",
    "'(%d+)'",
    "'[^%s]'",
    "'.-'",
    "'%b()'",
    "'%f[%w]%w+'",
    "'('",
    "'%'",
    "'[a-'",
    "'.*$'",
    "'^(.-)%s*$'",
    "'(a*(.)%w(%s*))'",
    "'%1'",
    "'[%a-z]'",
    "'()'",
    "'a?b*c+d-'",
    "string.rep('a?', 20) .. string.rep('a', 20)",
    "'[\\0-\\255]+'",
];

const FORMATS: &[&str] = &[
    "'%d'",
    "'%5.2f'",
    "'%q'",
    "'%s'",
    "'%x'",
    "'%g'",
    "'%c'",
    "'%i'",
    "'%-10s'",
    "'%a'",
    "'%099d'",
    "'%.99f'",
    "'%'",
    "'%z'",
    "'%10.3s|%5d'",
    "'%.14g'",
    "'%X'",
    "'%o'",
    "'%e'",
];

const PACKS: &[&str] = &[
    "'i4'",
    "'>I8'",
    "'z'",
    "'s1'",
    "'d'",
    "'j'",
    "'!4i3'",
    "'<i16'",
    "'Xi4'",
    "'i0'",
    "'c3'",
    "'=I2 b B'",
];

const JSON_TEXTS: &[&str] = &[
    "'[1, 2, 3]'",
    "'{\"a\": {\"b\": [null, true]}}'",
    "'\"\\\\ud83d\\\\ude00\"'",
    "'\"\\\\ud800\"'",
    "'[1,'",
    "'{\"a\" 1}'",
    "'1e999'",
    "'-0'",
    "'123456789012345678901234567890'",
    "string.rep('[', n) .. string.rep(']', n)",
    "string.rep('{\"a\":', n) .. '1' .. string.rep('}', n)",
    "'\"' .. string.rep('\\\\n', n) .. '\"'",
    "s",
];

const DATES: &[&str] = &[
    "'%Y-%m-%d'",
    "'!%c'",
    "'*t'",
    "'!*t'",
    "'%Ez'",
    "'%'",
    "'%H:%M:%S %p %j'",
];

fn int(r: &mut Rng) -> String {
    r.pick(INTS).to_string()
}

fn string(r: &mut Rng) -> String {
    r.pick(STRINGS).to_string()
}

fn value(r: &mut Rng) -> String {
    match r.below(6) {
        0 => int(r),
        1 => string(r),
        2 => "t".into(),
        3 => "nil".into(),
        4 => "true".into(),
        _ => "{1, 'x', {y = 2}}".into(),
    }
}

/// One statement from the catalog.
fn statement(r: &mut Rng) -> String {
    let (i, j, k) = (int(r), int(r), int(r));
    let (a, b) = (string(r), string(r));
    let p = r.pick(PATTERNS);
    let v = value(r);
    match r.below(48) {
        0 => format!("local x = string.rep({a}, {i} % 1000, {b})"),
        1 => format!("local x = string.format({}, {v})", r.pick(FORMATS)),
        2 => format!("local x = string.format({}, {i}, {a})", r.pick(FORMATS)),
        3 => format!("local x = {{string.find({a}, {p}, {i}, {})}}", r.below(2) == 0),
        4 => format!("local x = string.gsub({a}, {p}, {b}, {j})"),
        5 => format!("local x = string.gsub({a}, {p}, function(c) return c .. c end)"),
        6 => format!("local x = string.gsub({a}, {p}, {{a = 1, b = true}})"),
        7 => format!("for w in string.gmatch({a}, {p}) do n = n + 1 end"),
        8 => format!("local x = string.match({a}, {p}, {i})"),
        9 => format!("local x = {{string.byte({a}, {i}, {j})}}"),
        10 => format!("local x = string.char({i} % 256, {j} % 256)"),
        11 => format!("local x = string.sub({a}, {i}, {j})"),
        12 => format!("local x = string.pack({}, {i})", r.pick(PACKS)),
        13 => format!("local x = {{string.unpack({}, {a}, {i})}}", r.pick(PACKS)),
        14 => format!("local x = ({a}):reverse():upper():lower():len()"),
        15 => format!("local x = table.concat(t, {a}, {i}, {j})"),
        16 => format!("table.insert(t, {v})"),
        17 => format!("table.insert(t, {i}, {v})"),
        18 => format!("local x = table.remove(t, {i})"),
        19 => "table.sort(t, function(x, y) return tostring(x) < tostring(y) end)".into(),
        20 => "table.sort(t, function(x, y) return true end)".into(),
        21 => format!("local x = {{table.unpack(t, {i}, {j})}}"),
        22 => format!("table.move(t, {i}, {j}, {k}, {{}})"),
        23 => format!("local x = math.floor({i}) + math.ceil({j}) + math.abs({k})"),
        24 => format!("local x = math.fmod({i}, {j})"),
        25 => format!("local x = {{math.tointeger({i}), math.ult({i}, {j}), math.type({k})}}"),
        26 => format!("local x = {i} // {j} + {i} % {j}"),
        27 => format!("local x = ({i} << {j}) ~ ({i} >> {k}) | -{i}"),
        28 => format!("local x = {i} ^ {j}, math.max({i}, {j}, {k}), math.min({i}, {j})"),
        29 => format!("local x = math.random({i}, {j})"),
        30 => format!("local x = utf8.char({i} % 0x7FFFFFFF, {j} % 0x10FFFF)"),
        31 => format!("local x = {{utf8.codepoint({a}, {i}, {j})}}, utf8.len({a}, {i}, {j})"),
        32 => format!("local x = utf8.offset({a}, {i}, {j})"),
        33 => format!("for _, c in utf8.codes({a}) do n = n + c end"),
        34 => format!(
            "local co = coroutine.wrap(function(...) for q = 1, {} do coroutine.yield(q) end return ... end) \
             for q = 1, 5 do co({v}) end",
            r.below(4)
        ),
        35 => "local co = coroutine.create(function() coroutine.yield(1) error('in co') end) \
               coroutine.resume(co) coroutine.resume(co) coroutine.close(co) coroutine.status(co)"
            .into(),
        36 => format!("local x = json.encode({v})"),
        37 => format!("local x = json.decode({})", r.pick(JSON_TEXTS)),
        38 => "local x = json.encode(json.decode(json.encode(t)))".into(),
        39 => format!("local x = os.date({}, {i})", r.pick(DATES)),
        40 => format!(
            "local x = os.time({{year = {i}, month = {j}, day = {k}}}) + os.clock() + os.difftime({i}, {j})"
        ),
        41 => format!("local f = load({a} .. ' return 1') local x = f and f()"),
        42 => format!(
            "local parts = {{'return ', {a}, ' .. ', {b}}} local q = 0 \
             local x = load(function() q = q + 1 return parts[q] end)"
        ),
        43 => format!(
            "local m = setmetatable({{}}, {{__index = function(_, key) return key end, \
             __concat = function(x, y) return 'c' end, __len = function() return {i} end, \
             __eq = function() return true end, __lt = function() error({v}) end}}) \
             local x = m.foo, m .. 'x', #m, m == setmetatable({{}}, getmetatable(m)), m < m"
        ),
        44 => format!(
            "local ok, e = pcall(error, {v}) local x = select('#', xpcall(error, debug.traceback, {a}))"
        ),
        45 => format!(
            "local x = collectgarbage({}) ",
            r.pick(&["'count'", "'step'", "'collect'", "'isrunning'", "'incremental'", "'generational'"])
        ),
        46 => format!(
            "local function f(d) if d <= 0 then return 0 end return 1 + f(d - 1) end local x = f({} )",
            r.pick(&["10", "190", "1000", "100000", "n"])
        ),
        _ => format!(
            "local keep = {{}} for q = 1, {} do keep[q] = string.rep('x', {}) .. q end",
            r.pick(&["10", "1000", "100000"]),
            r.pick(&["1", "100", "10000", "1000000"])
        ),
    }
}

/// A program: a few locals, then statements, most inside `pcall` so the run goes on.
fn program(r: &mut Rng) -> String {
    let mut src = format!(
        "local n = {} local s = {} local t = {{3, 1, 'two', 4.5, {{}}, false}}\n",
        r.range(0, 300),
        string(r)
    );
    for _ in 0..r.range(1, 12) {
        let stmt = statement(r);
        if r.below(5) == 0 {
            src.push_str(&format!("do {stmt} end\n"));
        } else {
            src.push_str(&format!("pcall(function() {stmt} end)\n"));
        }
    }
    src.push_str("print(n, #t) return 'done'\n");
    src
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn generated_programs_end_cleanly_under_random_limits() {
    let count = env_u64("LUA_GENERATED_PROGRAMS").unwrap_or(300);
    let seed = env_u64("LUA_GENERATED_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    println!("LUA_GENERATED_SEED={seed} LUA_GENERATED_PROGRAMS={count}");
    // Lua runs on this thread's stack: room for its 200 C levels with the sanitizer's larger
    // frames, and under the 64 MiB past which ASan stops cleaning the stack after a longjmp
    // (then it reports false overflows).
    std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(move || run_all(seed, count))
        .unwrap()
        .join()
        .unwrap();
}

fn run_all(seed: u64, count: u64) {
    let mut r = Rng(seed);
    // Two arena sizes, each slot reused (restored from its snapshot) across programs.
    let mut slots: Vec<Slot> = [4 << 20, 32 << 20]
        .into_iter()
        .map(|cap| sandbox::new_slot(cap).expect("a sandbox"))
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for index in 0..count {
        let src = program(&mut r);
        let slot = &mut slots[r.below(2)];
        let max_memory = (r.range(256 << 10, slot.capacity() as u64 / 4) as usize).max(1);
        let max_instructions = r.range(1_000, 5_000_000);
        let max_output = r.range(0, 1 << 16) as usize;
        slot.set_limit(max_memory);
        // SAFETY: the slot's state is pristine and not running; the depth setter replaces a
        // registry entry the sandbox created.
        unsafe { sandbox::set_json_depth(slot.state(), r.range(1, 200) as usize) };
        let scope = Scope::new(
            Control::new(max_instructions),
            Output::new(max_output, Print::Capture),
        );
        let result = {
            let _active = scope.activate(Caller::none());
            // SAFETY: the slot's state outlives every use of the control below (the scope is
            // dropped before the slot is restored).
            unsafe { budget::install_ticker(slot.state(), &scope.control) };
            common::eval(slot, &src)
        };
        let context = || format!("seed {seed}, program {index}:\n{src}");
        assert!(
            slot.peak() <= max_memory,
            "heap peak {} over max_memory {max_memory}; {}",
            slot.peak(),
            context()
        );
        assert!(scope.output().take().len() <= max_output, "{}", context());
        match result {
            Ok(v) => {
                assert_eq!(v, "done", "{}", context());
                ok += 1;
            }
            Err(e) => {
                assert!(!e.message.is_empty(), "{}", context());
                failed += 1;
            }
        }
        slot.restore();
        slot.reset_peak();
    }
    println!("{count} programs: {ok} returned, {failed} ended in an error");
    assert!(ok > 0 && failed > 0, "the catalog reaches both ends");
}
