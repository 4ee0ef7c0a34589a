//! Side by side, in one process: a fresh state by restore versus by building one with malloc.
//! `cargo run --release -p lua_sandbox_core --example restore_bench`

use std::ffi::c_int;
use std::time::Instant;

use lua_sandbox_core::{ffi, protect, seed};

#[path = "../tests/common/mod.rs"]
mod common;

const N: u32 = 20_000;

fn per_op(label: &str, mut f: impl FnMut()) -> f64 {
    for _ in 0..N / 10 {
        f();
    }
    let mut samples: Vec<f64> = Vec::with_capacity(N as usize);
    for _ in 0..N {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!("{label:<44} p50 {p50:>7.2} µs   p99 {p99:>7.2} µs");
    p50
}

unsafe extern "C-unwind" fn one_plus_one(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: under lua_pcall (protect::call); no Rust value with a destructor is alive.
    unsafe {
        let code = b"return 1 + 1";
        if ffi::luaL_loadbufferx(
            l,
            code.as_ptr().cast(),
            code.len(),
            c"=b".as_ptr(),
            c"t".as_ptr(),
        ) != ffi::LUA_OK
        {
            ffi::lua_error(l);
        }
        ffi::lua_call(l, 0, 1);
    }
    1
}

fn main() {
    if std::env::args().any(|a| a == "checkpoint") {
        return checkpoints();
    }
    let mut slot = common::new_slot(1 << 30);
    println!(
        "snapshot: {} bytes; resident {} bytes",
        slot.snapshot_len(),
        slot.resident()
    );
    per_op("restore", || slot.restore());
    per_op("restore + reseed math.random", || {
        slot.restore();
        // SAFETY: not running, empty stack.
        unsafe { seed::reseed(slot.state()).unwrap() };
    });
    per_op("restore + reseed + load + run `return 1 + 1`", || {
        slot.restore();
        let l = slot.state();
        // SAFETY: not running, empty stack; `one_plus_one` follows the discipline.
        unsafe {
            seed::reseed(l).unwrap();
            protect::call(l, one_plus_one, std::ptr::null_mut()).unwrap();
            assert_eq!(ffi::lua_tointegerx(l, -1, std::ptr::null_mut()), 2);
            ffi::lua_settop(l, 0);
        }
    });
    per_op("malloc state: new + libs + run + close", || {
        // SAFETY: a private state, used and closed on this thread.
        unsafe {
            let l = ffi::luaL_newstate();
            protect::call(l, common::build_libs, std::ptr::null_mut()).unwrap();
            protect::call(l, one_plus_one, std::ptr::null_mut()).unwrap();
            ffi::lua_close(l);
        }
    });
}

/// Checkpoint + rollback cost by state size (sessions), around a call that changes one field:
/// `... --example restore_bench -- checkpoint`
fn checkpoints() {
    for (label, bytes) in [
        ("64 KiB", 64 << 10),
        ("1 MiB", 1 << 20),
        ("16 MiB", 16 << 20),
    ] {
        let mut slot = common::new_slot(256 << 20);
        common::eval(
            &mut slot,
            &format!("blob = string.rep('x', {bytes}) return 1"),
        )
        .unwrap();
        let n = if bytes > (1 << 20) { 500 } else { 2000 };
        let (mut ck, mut rb) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            slot.checkpoint().expect("a checkpoint");
            ck.push(t.elapsed().as_nanos() as f64 / 1000.0);
            common::eval(&mut slot, "n = (n or 0) + 1 return n").unwrap();
            let t = Instant::now();
            slot.rollback();
            rb.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        ck.sort_by(|a, b| a.total_cmp(b));
        rb.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{label:>7} state ({} bytes used, tracking {}): checkpoint p50 {:.1} µs, rollback p50 {:.1} µs",
            slot.used(),
            slot.tracking(),
            ck[n / 2],
            rb[n / 2]
        );
    }
}
