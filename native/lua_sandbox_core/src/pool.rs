//! The slots runs execute in: pristine sandboxes in fixed arenas, leased one per run.
//!
//! A slot ([`Slot`]) holds a sandboxed state built once, in place, and its
//! snapshot. A run leases a pristine slot, and when the lease ends (the run finished, failed,
//! or was dropped with its dead owner) the slot is restored from its snapshot — a `memcpy` of
//! a few tens of KiB, plus returning the pages a big run touched to the OS — and goes back to
//! the idle list. Releasing is O(1) in the state's size and safe on any thread: there is no
//! `lua_close`, no closer thread and no queue of used states.
//!
//! Slots come in capacity classes (a power of two, at least four times the run's `max_memory`, so
//! the allocator's size classes always fit; only address space is reserved). They are created
//! on demand: at most one exists per run in flight (running, or parked at a tool call), plus
//! up to [`MAX_IDLE`] idle ones per class kept for reuse.

use std::sync::Mutex;

use crate::Slot;

use crate::error::SandboxError;
use crate::sandbox;

/// Idle slots kept per capacity class; more are unmapped when released.
pub const MAX_IDLE: usize = 16;

/// The smallest reservation (address space only).
const MIN_CAPACITY: usize = 16 << 20;

/// The largest `max_memory` a slot can serve (the reservation is four times this).
pub const MAX_MEMORY: usize = 1 << 37;

struct Class {
    capacity: usize,
    idle: Vec<Slot>,
}

static IDLE: Mutex<Vec<Class>> = Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<Class>> {
    // Only push/pop happen under the lock: a panic cannot leave the lists inconsistent.
    IDLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The heap limit a run gets for the `max_memory` option: 0 (no limit) and anything above
/// [`MAX_MEMORY`] become [`MAX_MEMORY`].
pub fn clamp_memory(max_memory: u64) -> usize {
    match usize::try_from(max_memory) {
        Ok(0) | Err(_) => MAX_MEMORY,
        Ok(n) => n.min(MAX_MEMORY),
    }
}

/// The reservation for runs limited to `max_memory` bytes.
pub fn capacity_for(max_memory: usize) -> usize {
    max_memory
        .min(MAX_MEMORY)
        .saturating_mul(4)
        .next_power_of_two()
        .max(MIN_CAPACITY)
}

/// A pristine slot, leased until dropped.
pub struct Lease {
    slot: Option<Slot>,
}

impl Lease {
    pub fn slot(&self) -> &Slot {
        self.slot
            .as_ref()
            .expect("a lease holds its slot until dropped")
    }

    pub fn slot_mut(&mut self) -> &mut Slot {
        self.slot
            .as_mut()
            .expect("a lease holds its slot until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            slot.restore();
            let capacity = slot.capacity();
            let mut classes = idle();
            if let Some(class) = classes.iter_mut().find(|c| c.capacity == capacity) {
                if class.idle.len() < MAX_IDLE {
                    class.idle.push(slot);
                }
            }
            // otherwise `slot` is dropped here: its range is unmapped
        }
    }
}

/// A pristine slot for a run limited to `max_memory` bytes: an idle one, or a new one.
pub fn lease(max_memory: usize) -> Result<Lease, SandboxError> {
    lease_from(capacity_for(max_memory))
}

/// Puts a pristine slot built elsewhere into the idle list of its class, so that later leases
/// of that class reuse it. A jailed worker builds its one slot before its jail forbids new
/// mappings of that size, then leases it for every run with [`lease_from`].
pub fn keep(slot: Slot) {
    let capacity = slot.capacity();
    let mut classes = idle();
    match classes.iter_mut().find(|c| c.capacity == capacity) {
        Some(class) => class.idle.push(slot),
        None => classes.push(Class {
            capacity,
            idle: vec![slot],
        }),
    }
}

/// A pristine slot of reservation `capacity` (a class of [`capacity_for`]): an idle one, or
/// a new one.
pub fn lease_from(capacity: usize) -> Result<Lease, SandboxError> {
    let reused = {
        let mut classes = idle();
        match classes.iter_mut().find(|c| c.capacity == capacity) {
            Some(class) => class.idle.pop(),
            None => {
                classes.push(Class {
                    capacity,
                    idle: Vec::new(),
                });
                None
            }
        }
    };
    let slot = match reused {
        Some(slot) => slot,
        None => sandbox::new_slot(capacity)?,
    };
    Ok(Lease { slot: Some(slot) })
}

/// Idle slots of every class (for tests and stats).
#[cfg(test)]
pub fn idle_count() -> usize {
    idle().iter().map(|c| c.idle.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi;

    /// Sets global `x` on the leased state, with no code run: only raw API.
    fn poke(lease: &mut Lease) {
        let l = lease.slot_mut().state();
        // SAFETY: the state is not running; integers and a global set on a pristine state
        // (no metatable on _G) under the backstop.
        unsafe {
            crate::protect::call_backstop(l, &mut |l| {
                ffi::lua_pushinteger(l, 42);
                ffi::lua_setglobal(l, c"x".as_ptr());
            })
            .unwrap();
        }
    }

    fn x_is_nil(lease: &Lease) -> bool {
        let l = lease.slot().state();
        // SAFETY: raw reads of the pristine globals table, which has no metatable.
        unsafe {
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_GLOBALS);
            ffi::lua_pushstring(l, c"x".as_ptr());
            let t = ffi::lua_rawget(l, -2);
            ffi::lua_settop(l, 0);
            t == ffi::LUA_TNIL
        }
    }

    #[test]
    fn released_slots_come_back_pristine_and_are_reused() {
        let mut a = lease(1 << 20).unwrap();
        let base = a.slot().state();
        assert!(x_is_nil(&a));
        poke(&mut a);
        assert!(!x_is_nil(&a));
        let before = idle_count();
        drop(a);
        assert!(idle_count() > before);
        // Tests run in parallel: look for our slot among a few leases.
        let leases: Vec<Lease> = (0..4).map(|_| lease(1 << 20).unwrap()).collect();
        assert!(leases.iter().all(x_is_nil));
        assert!(leases.iter().any(|l| l.slot().state() == base));
    }
}

/// The sandbox's own restore cost: `cargo test --release -p lua_sandbox_core restore_probe --
/// --ignored --nocapture` (recorded in bench/RESULTS.md).
#[cfg(test)]
mod probe {
    #[test]
    #[ignore]
    fn restore_probe() {
        let mut lease = super::lease(64 << 20).unwrap();
        let slot = lease.slot_mut();
        let n = 100_000;
        let mut times: Vec<f64> = (0..n)
            .map(|_| {
                let t = std::time::Instant::now();
                slot.restore();
                t.elapsed().as_nanos() as f64 / 1000.0
            })
            .collect();
        times.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "sandbox snapshot {} bytes, resident {} bytes; restore p50 {:.2} µs p99 {:.2} µs",
            slot.snapshot_len(),
            slot.resident(),
            times[n / 2],
            times[n * 99 / 100]
        );
    }
}
