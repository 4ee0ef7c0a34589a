//! Pristine sandboxes built ahead of time, and used ones dropped, on a background thread.
//!
//! Building a sandboxed state costs far more than a trivial run, and so does closing one. A
//! builder thread keeps a few pristine states ready and closes the ones runs are done with, so
//! neither cost sits on the dirty scheduler in the common case. A pooled state is used for
//! exactly one run and then dropped: states are never reused, so isolation is the same as
//! building one per run. If the pool is empty the run builds its own.

use std::sync::{Condvar, Mutex, OnceLock};

use crate::sandbox::Sandbox;

/// Pristine states kept ready; enough for a burst on a few schedulers, ~50 KiB each.
pub const TARGET: usize = 8;

/// Used states waiting to be closed; beyond this, runs close their own (back-pressure).
const MAX_GRAVEYARD: usize = 64;

/// Anything a finished run leaves behind to be dropped off the scheduler.
pub type Garbage = Box<dyn Send>;

struct Shared {
    ready: Vec<Sandbox>,
    graveyard: Vec<Garbage>,
}

struct Pool {
    shared: Mutex<Shared>,
    wake: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            shared: Mutex::new(Shared {
                ready: Vec::with_capacity(TARGET),
                graveyard: Vec::new(),
            }),
            wake: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("lua_sandbox_pool".into())
            // The builder runs the prelude, which may recurse through C like any Lua code.
            .stack_size(crate::stack::STACK_SIZE)
            .spawn(move || builder(pool));
        if spawned.is_err() {
            // No thread: runs build and drop their own states, which is only slower.
        }
        pool
    })
}

fn lock(pool: &Pool) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave `Shared` inconsistent (only push/pop).
    pool.shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn builder(pool: &'static Pool) {
    lower_priority();
    loop {
        let garbage = {
            let mut shared = lock(pool);
            while shared.ready.len() >= TARGET && shared.graveyard.is_empty() {
                shared = pool.wake.wait(shared).unwrap_or_else(|p| p.into_inner());
            }
            std::mem::take(&mut shared.graveyard)
        };
        drop(garbage);
        if lock(pool).ready.len() < TARGET {
            if let Ok(sandbox) = Sandbox::new() {
                lock(pool).ready.push(sandbox);
            }
        }
    }
}

/// Makes this thread run only when a CPU would otherwise idle: refilling the pool must never
/// take a core from a scheduler (on a 2-core machine the builder preempting a dirty scheduler
/// cost more latency than building the state in line).
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 means the calling thread; `param` is a valid, initialised struct. A
    // failure (e.g. a restricted container) leaves the default policy, which is only slower.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// A pristine sandbox: from the pool if one is ready, otherwise built now.
pub fn take() -> mlua::Result<Sandbox> {
    let pool = pool();
    let ready = lock(pool).ready.pop();
    pool.wake.notify_one();
    match ready {
        Some(sandbox) => Ok(sandbox),
        None => Sandbox::new(),
    }
}

/// Hands a finished run's state to the builder thread to close.
pub fn discard(garbage: Garbage) {
    let pool = pool();
    let mut shared = lock(pool);
    if shared.graveyard.len() >= MAX_GRAVEYARD {
        drop(shared);
        drop(garbage);
        return;
    }
    shared.graveyard.push(garbage);
    drop(shared);
    pool.wake.notify_one();
}

/// How many pristine states are ready right now (for tests and stats).
#[cfg(test)]
pub fn ready() -> usize {
    lock(pool()).ready.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_fills_and_hands_out_fresh_states() {
        let first = take().unwrap();
        for _ in 0..200 {
            if ready() >= TARGET {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(ready() >= 1);
        let second = take().unwrap();
        // Each state is its own Lua state.
        assert_ne!(
            first.lua.globals().to_pointer(),
            second.lua.globals().to_pointer()
        );
        discard(Box::new(first));
        discard(Box::new(second));
    }
}
