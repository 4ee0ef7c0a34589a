//! Running Lua on a native stack large enough for its own recursion limits.
//!
//! Dirty CPU scheduler threads have 320 KiB of stack by default. Lua bounds recursion through
//! C (`LUAI_MAXCCALLS` = 200 levels: `gsub` callbacks, `__index` functions, `string.format`
//! on a self-formatting `__tostring`, the parser's nesting), but 200 such levels need more than
//! that, and overflowing a scheduler stack kills the VM. So every run executes on its own
//! segment, on the same thread — the kill check (`enif_is_current_process_alive`) must run on
//! the NIF-calling thread, which rules out a helper thread.
//!
//! Mapping a fresh segment per run costs page faults and syscalls on every call, so each
//! thread keeps its segment and reuses it; a nested call (none today) gets a new one.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;

/// Room for 200 levels of the deepest C recursion Lua allows, with a wide margin.
pub const STACK_SIZE: usize = 16 * 1024 * 1024;

/// An mmap'd stack segment with an inaccessible guard page below it, so an overflow faults
/// instead of writing into whatever lies below.
struct Segment {
    mapping: *mut libc::c_void,
    len: usize,
    page: usize,
}

impl Segment {
    fn new() -> Option<Segment> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let len = STACK_SIZE.checked_add(page)?;
        // SAFETY: an anonymous private mapping of `len` bytes at an address of the kernel's
        // choosing; no existing memory is affected.
        let mapping = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return None;
        }
        let segment = Segment { mapping, len, page };
        // SAFETY: the first page lies inside the mapping just created and owned by `segment`.
        if unsafe { libc::mprotect(mapping, page, libc::PROT_NONE) } != 0 {
            return None; // `segment` is dropped, which unmaps it
        }
        Some(segment)
    }

    /// Lowest usable address (just above the guard page) and the usable size.
    fn area(&self) -> (*mut u8, usize) {
        // SAFETY: `page` < `len`, so the result stays inside the mapping.
        (
            unsafe { self.mapping.cast::<u8>().add(self.page) },
            self.len - self.page,
        )
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `mapping`/`len` describe exactly the mapping created in `new`, which nothing
        // uses any more (a segment is only dropped when no code runs on it).
        unsafe {
            libc::munmap(self.mapping, self.len);
        }
    }
}

thread_local! {
    static CACHED: Cell<Option<Segment>> = const { Cell::new(None) };
}

/// Runs `f` on a stack segment of `STACK_SIZE` bytes, on this thread.
pub fn with_big_stack<R>(f: impl FnOnce() -> R) -> R {
    let segment = CACHED.with(|c| c.take()).or_else(Segment::new);
    let Some(segment) = segment else {
        // No mapping available: let stacker try (it panics if it cannot map either).
        return stacker::grow(STACK_SIZE, f);
    };
    let (base, size) = segment.area();
    let mut f = Some(f);
    let mut ret = None;
    // SAFETY: `base` is page-aligned (hence aligned for any target) and `size` is a multiple of
    // the page size; the segment is owned by this frame and not shared (taken out of the
    // thread-local, so a nested call cannot reuse it). The callback cannot unwind across the
    // switch: panics are caught inside it and resumed after switching back. Lua errors never
    // cross it either: every entry into Lua below is a protected call, so their
    // longjmps land on this segment.
    let panic = unsafe {
        psm::on_stack(base, size, || {
            catch_unwind(AssertUnwindSafe(|| {
                if let Some(f) = f.take() {
                    ret = Some(f());
                }
            }))
            .err()
        })
    };
    CACHED.with(|c| c.set(Some(segment)));
    if let Some(p) = panic {
        resume_unwind(p);
    }
    match ret {
        Some(r) => r,
        None => unreachable!("the callback ran to completion or panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(n: u32) -> u32 {
        let pad = std::hint::black_box([0u8; 1024]);
        if n == 0 {
            u32::from(pad[0])
        } else {
            depth(n - 1) + u32::from(pad[1])
        }
    }

    #[test]
    fn deep_recursion_fits() {
        // 5-6 MiB of frames in a release build, ~11 MiB unoptimized (`cargo test` without
        // --release: 10 000 frames overflowed the 16 MiB segment there): more than a test
        // thread (2 MiB) or a scheduler thread has, within the segment either way.
        assert_eq!(with_big_stack(|| depth(5_000)), 0);
        // and the cached segment is reused
        assert_eq!(with_big_stack(|| depth(5_000)), 0);
    }

    #[test]
    fn panics_propagate_and_the_segment_survives() {
        let r = std::panic::catch_unwind(|| with_big_stack(|| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(with_big_stack(|| 7), 7);
    }

    #[test]
    fn nested_calls_get_their_own_segment() {
        assert_eq!(with_big_stack(|| with_big_stack(|| 1) + 1), 2);
    }
}
