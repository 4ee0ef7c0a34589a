//! Running Lua on a native stack large enough for its own recursion limits.
//!
//! Dirty CPU scheduler threads have 320 KiB of stack by default. Lua bounds recursion through
//! C (`LUAI_MAXCCALLS` = 200 levels: `gsub` callbacks, `__index` functions, `string.format`
//! on a self-formatting `__tostring`, the parser's nesting), but 200 such levels need more than
//! that, and overflowing a scheduler stack kills the VM. So every run executes on its own
//! segment, on the same thread — the kill check (`enif_is_current_process_alive`) must run on
//! the NIF-calling thread, which rules out a helper thread.

/// Room for 200 levels of the deepest C recursion Lua allows, with a wide margin.
pub const STACK_SIZE: usize = 16 * 1024 * 1024;

/// Runs `f` on a fresh stack segment of `STACK_SIZE` bytes (with a guard page below it).
pub fn with_big_stack<R>(f: impl FnOnce() -> R) -> R {
    stacker::grow(STACK_SIZE, f)
}
