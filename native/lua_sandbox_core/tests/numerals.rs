//! Long numerals (issue 16): a numeral longer than 1 KiB, decimal or hexadecimal, is
//! rewritten, with a check every `LUA_SBPIECE` bytes, into a short one that converts to the
//! same value before `l_str2int` and `strtod` see it (`luaO_str2numsb` in
//! vendor/lua-src/lua-5.4.9/lobject.c). Checked here against `strtod` itself (glibc's,
//! correctly rounded) and a model of `l_str2int` on the whole numeral: generated numerals of
//! every shape the grammar has, and numerals next to the midpoints between two doubles, where
//! rounding depends on the last nonzero digit however far it is. Seen red with the sticky digit
//! dropped or one digit fewer kept of a hexadecimal integer.

use std::ffi::CString;

use mlua::{Lua, Value};

/// A small deterministic generator (no dependency on the run's randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Fewer than `n` random digits.
    fn some_digits(&mut self, n: u64) -> String {
        let k = self.below(n) as usize;
        self.digits(k)
    }
    /// 1 to `n` random digits.
    fn some_digits_1(&mut self, n: u64) -> String {
        let k = 1 + self.below(n) as usize;
        self.digits(k)
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }
    /// `n` random hexadecimal digits, of either case.
    fn hex(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b"0123456789abcdefABCDEF"[self.below(22) as usize]))
            .collect()
    }
}

/// What stock Lua gives for `s` (`l_str2int`, then `strtod` on the whole string): an integer,
/// a float's bits, or not a numeral.
#[derive(Debug, PartialEq)]
enum Num {
    Int(i64),
    Float(u64),
    Not,
}

fn stock(s: &str) -> Num {
    let t = s.trim_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let body = t.strip_prefix(['-', '+']).unwrap_or(t);
    let hex = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X"));
    if let Some(digits) = hex.filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        // `l_str2int`: a hexadecimal integer wraps around
        let v = digits.bytes().fold(0u64, |a, b| {
            a.wrapping_mul(16)
                .wrapping_add((b as char).to_digit(16).unwrap() as u64)
        });
        let v = if t.starts_with('-') {
            v.wrapping_neg()
        } else {
            v
        };
        return Num::Int(v as i64);
    }
    if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        // `l_str2int`: wraps never, rejects on overflow (then `strtod` reads it)
        let digits = body.trim_start_matches('0');
        let neg = t.starts_with('-');
        let v = format!("{}{}", if neg { "-" } else { "" }, digits);
        if digits.is_empty() {
            return Num::Int(0);
        }
        if let Ok(i) = v.parse::<i64>() {
            return Num::Int(i);
        }
    }
    let c = CString::new(s).unwrap();
    let mut end: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: `c` is a NUL-terminated string alive for the call; `end` receives a pointer
    // into it.
    let v = unsafe { libc::strtod(c.as_ptr(), &mut end) };
    // SAFETY: `end` points into `c` (at most at its terminator).
    let rest = unsafe { std::ffi::CStr::from_ptr(end) }.to_bytes();
    let consumed = end as usize - c.as_ptr() as usize;
    let special = s.contains(['n', 'N']);
    if consumed == 0 || special || !rest.iter().all(|b| b" \t\n\x0b\x0c\r".contains(b)) {
        Num::Not
    } else {
        Num::Float(v.to_bits())
    }
}

/// The exact decimal digits of `m * 2^e` (`m` odd): `(digits, exponent)`, the value being
/// `digits * 10^exponent`.
fn exact(m: u64, e: i32) -> (String, i32) {
    // little-endian decimal digits
    let mut d: Vec<u8> = m.to_string().bytes().rev().map(|b| b - b'0').collect();
    let (factor, times) = if e >= 0 { (2, e) } else { (5, -e) };
    for _ in 0..times {
        let mut carry = 0;
        for x in d.iter_mut() {
            let v = *x * factor + carry;
            *x = v % 10;
            carry = v / 10;
        }
        if carry > 0 {
            d.push(carry);
        }
    }
    let s: String = d.iter().rev().map(|x| char::from(b'0' + x)).collect();
    (s, e.min(0))
}

/// A numeral of one of the grammar's shapes, at least ~1 KiB long most of the time.
fn numeral(r: &mut Rng) -> String {
    let pad = if r.below(4) > 0 {
        1100 + r.below(3000) as usize
    } else {
        r.below(1500) as usize
    };
    let space = [" ", "\t", "\n", "\x0b", "\x0c", "\r"][r.below(6) as usize];
    let mut s = String::new();
    if r.below(4) == 0 {
        s += &space.repeat(if r.below(2) == 0 { pad } else { 2 });
    }
    if r.below(3) == 0 {
        s.push(if r.below(2) == 0 { '-' } else { '+' });
    }
    match r.below(16) {
        0 => s += &format!("{}{}", "0".repeat(pad), r.some_digits(25)),
        1 => s += &r.digits(pad),
        2 => s += &format!("{}.{}", "0".repeat(pad), r.some_digits(30)),
        3 => {
            let (a, b) = (r.some_digits(20), r.some_digits(30));
            s += &format!("{a}.{}{b}", "0".repeat(pad))
        }
        4 => {
            let e = r.below(5000) as i64 - 2500 + pad as i64;
            s += &format!(".{}{}e{e}", "0".repeat(pad), r.some_digits_1(30))
        }
        5 => s += &format!("{}e-{}", r.digits(pad), r.below(700) as usize + pad),
        6 => {
            let sign = if r.below(2) == 0 { "-" } else { "" };
            let (a, b) = (r.some_digits(5), r.some_digits(12));
            s += &format!("{a}e{sign}{}{b}", "0".repeat(pad))
        }
        7 => {
            // next to the midpoint between two doubles (normal or subnormal)
            // (an odd 54-bit number times 2^e, or an odd one times 2^-1075)
            let bits = r.next() << 20 | r.next();
            let (m, e) = if r.below(4) == 0 {
                (bits & ((1 << 52) - 1) | 1, -1075)
            } else {
                (
                    bits & ((1 << 53) - 1) | 1 << 53 | 1,
                    r.below(2000) as i32 - 1100,
                )
            };
            let (mut d, x) = exact(m, e);
            let len = d.len() as i32;
            match r.below(4) {
                0 => {}
                1 => d += &format!("{}1", "0".repeat(pad)),
                2 => d += &"0".repeat(pad),
                _ => {
                    // just below: ...5 becomes ...4999...9
                    let last = d.pop().unwrap();
                    d.push(char::from(last as u8 - 1));
                    d += &"9".repeat(pad)
                }
            }
            s += &format!("{d}e{}", x - (d.len() as i32 - len))
        }
        8 => s += &format!("{}{}{}", r.digits(5), " ".repeat(pad), r.digits(1)),
        9 => {
            let tail = ["e", "E", ".", "x", "+", "-", "z", "e+", ".e5"][r.below(9) as usize];
            s += &format!("{}{tail}", r.digits(pad))
        }
        10 => {
            let big = ["9223372036854775807", "9223372036854775808"][r.below(2) as usize];
            s += &format!("{}{big}", "0".repeat(pad))
        }
        // hexadecimal: an integer (wraps around), with leading zeros, a float, one next to a
        // midpoint between two doubles, trailing characters
        11 => s += &format!("0x{}", r.hex(pad)),
        12 => {
            let n = 1 + r.below(20) as usize;
            s += &format!("0X{}{}", "0".repeat(pad), r.hex(n))
        }
        13 => {
            let n = r.below(20) as usize;
            let (a, b) = (r.hex(n), r.hex(pad));
            let e = ["", "p0", "p-1100", "P+7", "p-16400", "p99999999999"][r.below(6) as usize];
            s += &format!("0x{a}.{b}{e}")
        }
        14 => {
            let bits = r.next() << 20 | r.next();
            let m = bits & ((1 << 53) - 1) | 1 << 53 | 1;
            let e = r.below(2000) as i64 - 1100;
            let (d, k) = match r.below(3) {
                0 => (format!("{m:x}"), 0),
                1 => (format!("{m:x}{}1", "0".repeat(pad)), pad as i64 + 1),
                _ => (format!("{:x}{}", m - 1, "f".repeat(pad)), pad as i64),
            };
            s += &format!("0x{d}p{}", e - 4 * k)
        }
        _ => {
            let tail = ["g", "p", "p+", ".", "x", "p1.5", " 1"][r.below(7) as usize];
            s += &format!("0x{}{tail}", r.hex(pad))
        }
    }
    if r.below(4) == 0 {
        s += &space.repeat(if r.below(2) == 0 { pad } else { 3 });
    }
    s
}

#[test]
fn long_numerals_convert_as_strtod_reads_them_whole() {
    let lua = Lua::new();
    let convert = lua
        .load("local s = ... return tonumber(s), math.type(tonumber(s))")
        .into_function()
        .unwrap();
    let mut r = Rng(0x5eed);
    let (mut long, mut accepted) = (0, 0);
    for _ in 0..20_000 {
        let s = numeral(&mut r);
        let want = stock(&s);
        let (v, kind): (Value, Option<String>) = convert.call(s.as_str()).unwrap();
        let got = match (v, kind.as_deref()) {
            (Value::Integer(i), Some("integer")) => Num::Int(i),
            (Value::Number(f), Some("float")) => Num::Float(f.to_bits()),
            (Value::Nil, None) => Num::Not,
            (v, k) => panic!("{v:?} {k:?}"),
        };
        assert_eq!(got, want, "{s}");
        long += usize::from(s.len() > 1024);
        accepted += usize::from(want != Num::Not);
    }
    assert!(
        long > 10_000 && accepted > 10_000,
        "{long} long, {accepted} numerals"
    );
}
