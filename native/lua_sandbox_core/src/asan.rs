//! Manual poisoning for AddressSanitizer (feature `sanitize`, `make san`): the arena allocator
//! hands out blocks of one big mapping, so ASan cannot tell a live block from a free one or
//! from the slack at its end by itself. The heap poisons every byte Lua does not hold — free
//! blocks, the tail of a block past the size Lua asked for, the arena above the bump — and
//! unpoisons exactly the bytes of each block it hands out; an instrumented C access (the
//! vendored Lua, csrc/) to any other byte of the arena is then reported as a heap overflow or a
//! use after free. Without the feature both functions are empty and vanish.

#[cfg(feature = "sanitize")]
use std::ffi::c_void;

#[cfg(feature = "sanitize")]
extern "C" {
    fn __asan_poison_memory_region(addr: *const c_void, size: usize);
    fn __asan_unpoison_memory_region(addr: *const c_void, size: usize);
}

/// Marks `[p, p + n)` unaddressable for instrumented code.
#[inline]
#[allow(unused_variables)]
pub fn poison(p: *const u8, n: usize) {
    #[cfg(feature = "sanitize")]
    if n > 0 {
        // SAFETY: only ASan's shadow memory changes; `p..p+n` lies in a mapping the caller owns.
        unsafe { __asan_poison_memory_region(p.cast(), n) }
    }
}

/// Marks `[p, p + n)` addressable again.
#[inline]
#[allow(unused_variables)]
pub fn unpoison(p: *const u8, n: usize) {
    #[cfg(feature = "sanitize")]
    if n > 0 {
        // SAFETY: as in `poison`.
        unsafe { __asan_unpoison_memory_region(p.cast(), n) }
    }
}
