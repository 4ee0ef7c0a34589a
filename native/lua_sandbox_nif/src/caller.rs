//! The BEAM side of a run's caller: the NIF call's env, and the liveness check the core's
//! budget makes with it at every tick (`lua_sandbox_core::budget::Caller`).

use std::ffi::c_void;

use lua_sandbox_core::budget::Caller;
use rustler::sys::ErlNifEnv;
use rustler::Env;

/// The caller of the NIF call running in `env`.
pub fn of(env: Env) -> Caller {
    raw(env.as_c_arg())
}

/// The caller of the NIF call whose raw env is `env` (null: nobody to check).
pub fn raw(env: *mut ErlNifEnv) -> Caller {
    Caller {
        env: env.cast(),
        alive: Some(alive),
    }
}

/// `enif_is_current_process_alive` on the caller's env.
///
/// # Safety
/// `env` must be the env of the NIF call currently executing on this thread, as the budget
/// guarantees for the `Caller` it came with.
unsafe fn alive(env: *mut c_void) -> bool {
    // SAFETY: per the contract; `enif_is_current_process_alive` is documented for exactly this
    // use from a (dirty) NIF and only reads the process state.
    unsafe { rustler::sys::enif_is_current_process_alive(env.cast()) != 0 }
}
