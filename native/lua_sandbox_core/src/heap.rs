//! The arena allocator: a `lua_Alloc` whose every byte of bookkeeping lives inside the arena.
//!
//! The arena is one reserved address range (see `slot.rs`). Its first bytes hold a [`Heap`]
//! header: the bump offset, the byte count, the limit and the heads of the free lists. Free
//! blocks link through their own first word. Nothing the allocator needs is outside the arena,
//! so copying the arena's used prefix aside and back (the snapshot) restores the allocator
//! together with the Lua state it serves.
//!
//! Lua always tells the allocator the size of the block it frees or resizes (`osize`), so
//! blocks need no header: a block's size class is a function of the size Lua asked for.
//! Classes are 16-byte steps up to 1 KiB, then four steps per power of two (at most 25 %
//! slack). Freed blocks go to their class's list and are reused by the next request of that
//! class; the arena only grows by bumping.
//!
//! `used` is the sum of the sizes Lua holds, exactly what Lua's own `collectgarbage("count")`
//! reports, and the limit is checked against it: a request that would grow `used` past
//! `limit` is refused (Lua then runs an emergency collection and, failing again, raises
//! "not enough memory"). Every refusal is counted in `refusals`, which the run's budget reads
//! to make the memory abort sticky. Shrinking never fails, as Lua requires.

use std::ffi::c_void;
use std::ptr;

use crate::asan;

/// Alignment of every block: enough for any Lua object (`LUAI_MAXALIGN`).
pub const ALIGN: usize = 16;
const SMALL_MAX: usize = 1024;
const SMALL_CLASSES: usize = SMALL_MAX / ALIGN;
/// Four classes per power of two from 2^10 up to 2^58.
const LARGE_CLASSES: usize = 4 * 48;
const CLASSES: usize = SMALL_CLASSES + LARGE_CLASSES;
/// lua.h `LUA_SBGROWMIN`: a request with no block and an `osize` of at least this is a growth
/// into a new block from a block of `osize` bytes (see `Heap::realloc`).
const GROW_MIN: usize = 1024;

#[repr(C)]
struct FreeBlock {
    next: *mut FreeBlock,
}

/// The allocator's state, at offset 0 of its arena.
#[repr(C)]
pub struct Heap {
    /// Bytes of the arena, header included.
    capacity: usize,
    /// Offset of the first byte never handed out.
    bump: usize,
    /// Bytes Lua holds right now (its own count).
    used: usize,
    /// Highest `used` since the last [`Heap::reset_peak`].
    peak: usize,
    /// `used` may not grow past this.
    limit: usize,
    /// Requests refused since the last [`Heap::reset_refusals`].
    refusals: u64,
    free: [*mut FreeBlock; CLASSES],
}

/// Bytes from the arena's start to its first block.
pub const HEADER: usize = (std::mem::size_of::<Heap>() + ALIGN - 1) & !(ALIGN - 1);

/// The class of a request of `n` (≥ 1) bytes.
fn class_of(n: usize) -> usize {
    if n <= SMALL_MAX {
        n.div_ceil(ALIGN) - 1
    } else {
        let b = (usize::BITS - 1 - (n - 1).leading_zeros()) as usize; // 2^b < n <= 2^(b+1)
        let quarter = 1usize << (b - 2);
        let k = (n - (1usize << b)).div_ceil(quarter); // 1..=4
        SMALL_CLASSES + (b - 10) * 4 + (k - 1)
    }
}

/// The block size of class `c`: the largest request that maps to `c`.
fn class_size(c: usize) -> usize {
    if c < SMALL_CLASSES {
        (c + 1) * ALIGN
    } else {
        let b = (c - SMALL_CLASSES) / 4 + 10;
        let k = (c - SMALL_CLASSES) % 4 + 1;
        (1usize << b) + k * (1usize << (b - 2))
    }
}

impl Heap {
    /// Writes a fresh header at `base` for an arena of `capacity` bytes.
    ///
    /// # Safety
    /// `base` must be the start of a writable, `ALIGN`-aligned range of `capacity` bytes
    /// (`capacity` > `HEADER`) that nothing else uses.
    pub unsafe fn init(base: *mut u8, capacity: usize) -> *mut Heap {
        let heap = base.cast::<Heap>();
        // SAFETY: `base` is aligned and the range holds at least `HEADER` writable bytes.
        unsafe {
            heap.write(Heap {
                capacity,
                bump: HEADER,
                used: 0,
                peak: 0,
                limit: usize::MAX,
                refusals: 0,
                free: [ptr::null_mut(); CLASSES],
            });
        }
        // SAFETY: inside the range, past the header.
        asan::poison(unsafe { base.add(HEADER) }, capacity - HEADER);
        heap
    }

    /// The sanitizer build's view after the arena's prefix was copied back or read whole
    /// (restore, rollback, checkpoint): the caller unpoisoned `[0, upto)`; poison again what
    /// Lua does not hold in it, every free block and everything above the bump. (Empty
    /// without the `sanitize` feature.)
    pub fn repoison(&self, upto: usize) {
        if !cfg!(feature = "sanitize") {
            return;
        }
        for (c, head) in self.free.iter().enumerate() {
            let mut block = *head;
            while !block.is_null() {
                asan::poison(block.cast(), class_size(c));
                // SAFETY: a free list links blocks of this arena through their first word.
                block = unsafe { (*block).next };
            }
        }
        if upto > self.bump {
            // SAFETY: `bump < upto`, both inside the arena.
            asan::poison(unsafe { self.base().add(self.bump) }, upto - self.bump);
        }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn reset_peak(&mut self) {
        self.peak = self.used;
    }

    /// Bytes of the arena handed out at least once (header included).
    pub fn extent(&self) -> usize {
        self.bump
    }

    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    pub fn reset_refusals(&mut self) {
        self.refusals = 0;
    }

    /// Sets the limit on `used`; `usize::MAX` for none.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    fn base(&self) -> *mut u8 {
        (self as *const Heap).cast_mut().cast::<u8>()
    }

    /// A block of class `c`: from its free list, the bump, or (when the arena is full) the
    /// free list of the nearest larger class; null when none has one.
    fn take(&mut self, c: usize) -> *mut u8 {
        if let Some(p) = self.pop(c) {
            return p;
        }
        let size = class_size(c);
        match self.bump.checked_add(size) {
            Some(end) if end <= self.capacity => {
                // SAFETY: `bump < end <= capacity`, so the block lies inside the arena.
                let p = unsafe { self.base().add(self.bump) };
                self.bump = end;
                p
            }
            _ => (c + 1..CLASSES)
                .find_map(|larger| self.pop(larger))
                .unwrap_or(ptr::null_mut()),
        }
    }

    fn pop(&mut self, c: usize) -> Option<*mut u8> {
        let head = self.free[c];
        if head.is_null() {
            return None;
        }
        // SAFETY: every pointer on a free list is a block of this arena at least
        // `class_size(c)` bytes long, whose first word was set by `give`.
        self.free[c] = unsafe { (*head).next };
        Some(head.cast())
    }

    /// Returns a block Lua asked for with `size` bytes to its class's list.
    ///
    /// # Safety
    /// `p` must be a live block of this heap that Lua holds with size `size`.
    unsafe fn give(&mut self, p: *mut u8, size: usize) {
        let c = class_of(size);
        let block = p.cast::<FreeBlock>();
        // SAFETY: the block is at least `class_size(c)` >= 16 bytes, aligned, and no longer
        // used by Lua, so its first word is ours.
        unsafe { block.write(FreeBlock { next: self.free[c] }) };
        self.free[c] = block;
        asan::poison(p, class_size(c));
    }

    /// `lua_Alloc` semantics on this heap.
    ///
    /// # Safety
    /// `p`/`osize` must describe a block Lua got from this heap (or `p` null), as Lua's
    /// allocator contract guarantees.
    unsafe fn realloc(&mut self, p: *mut u8, osize: usize, nsize: usize) -> *mut u8 {
        let old = if p.is_null() { 0 } else { osize };
        // A new block for a growth the VM copies in pieces (lua.h `LUA_SBGROWMIN`, lmem.c
        // `luaM_sandboxgrow`): the old block of `osize` bytes is freed once the copy is done,
        // so the limit and the peak count the growth only, as for the `realloc` it replaces
        // (which holds both blocks for its copy too). Lua passes a small tag there otherwise.
        let credit = if p.is_null() && osize >= GROW_MIN {
            osize
        } else {
            0
        };
        let spare = old + credit;
        if nsize == 0 {
            if !p.is_null() {
                // SAFETY: forwarded contract.
                unsafe { self.give(p, osize) };
                self.used -= osize;
            }
            return ptr::null_mut();
        }
        if nsize > spare && (nsize - spare > self.limit || self.used > self.limit - (nsize - spare))
        {
            self.refusals += 1;
            return ptr::null_mut();
        }
        if !p.is_null() && class_of(nsize) == class_of(osize) {
            // Same class: the block fits as it is.
            asan::unpoison(p, nsize);
            // SAFETY: `nsize <= class_size`: the tail lies in the block.
            asan::poison(unsafe { p.add(nsize) }, class_size(class_of(nsize)) - nsize);
            self.used = self.used - old + nsize;
            self.peak = self.peak.max(self.used);
            return p;
        }
        if !p.is_null() && nsize < osize {
            // A shrink into a smaller class moves the block, so the big block returns to its
            // own class's list instead of serving small requests from then on (Lua grows and
            // shrinks stacks and buffers all the time). If no block is free, it stays put:
            // shrinking never fails.
            let q = self.take(class_of(nsize));
            self.used = self.used - old + nsize;
            if q.is_null() {
                // SAFETY: `nsize < osize`: the tail lies in the block.
                asan::poison(unsafe { p.add(nsize) }, osize - nsize);
                return p;
            }
            asan::unpoison(q, nsize);
            // SAFETY: `p` holds `osize` > `nsize` live bytes; `q` is a distinct block of at
            // least `nsize` bytes.
            unsafe {
                ptr::copy_nonoverlapping(p, q, nsize);
                self.give(p, osize);
            }
            return q;
        }
        if nsize > self.capacity {
            self.refusals += 1;
            return ptr::null_mut();
        }
        let q = self.take(class_of(nsize));
        if q.is_null() {
            self.refusals += 1;
            return ptr::null_mut();
        }
        asan::unpoison(q, nsize);
        if !p.is_null() {
            // SAFETY: `p` holds `osize` live bytes, `q` is a distinct block of at least
            // `nsize` bytes; Lua keeps `p` until we return.
            unsafe {
                ptr::copy_nonoverlapping(p, q, osize.min(nsize));
                self.give(p, osize);
            }
        }
        self.used = self.used - old + nsize;
        self.peak = self.peak.max(self.used - credit);
        q
    }
}

/// The `lua_Alloc` handed to `lua_newstate`, with the arena's [`Heap`] as `ud`.
///
/// # Safety
/// Called by Lua only, with `ud` the header written by [`Heap::init`] of a live arena; Lua
/// never calls it from two threads at once (a state runs on one thread at a time).
pub unsafe extern "C" fn lua_alloc(
    ud: *mut c_void,
    p: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: `ud` is the heap of the state calling us (see above), and no other reference to
    // it is live while Lua runs this allocation.
    let heap = unsafe { &mut *ud.cast::<Heap>() };
    // SAFETY: Lua's allocator contract (see `Heap::realloc`).
    unsafe { heap.realloc(p.cast(), osize, nsize).cast() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_with_bounded_slack() {
        let mut n = 1;
        while n < (1 << 40) {
            let c = class_of(n);
            let s = class_size(c);
            assert!(s >= n, "{n} -> class {c} size {s}");
            assert!(c < CLASSES);
            if n > 64 {
                assert!(s as f64 <= n as f64 * 1.26, "{n} -> {s}");
            }
            if c > 0 {
                assert!(class_size(c - 1) < n, "{n} fits the smaller class");
            }
            assert_eq!(s % ALIGN, 0);
            n = if n < 5000 { n + 1 } else { n + n / 7 };
        }
    }

    #[test]
    fn a_growth_in_pieces_counts_the_difference() {
        let mut arena = vec![0u128; (1 << 16) / 16];
        // SAFETY: the test's own aligned buffer.
        unsafe {
            let heap = &mut *Heap::init(arena.as_mut_ptr().cast(), 1 << 16);
            let old = heap.realloc(ptr::null_mut(), 0, 4096);
            heap.set_limit(heap.used() + 2048);
            // A plain new block of 6 KiB does not fit beside the old one...
            assert!(heap.realloc(ptr::null_mut(), 0, 6144).is_null());
            // ...but as the growth of the 4 KiB block it is 2 KiB more, as a `realloc` is.
            let new = heap.realloc(ptr::null_mut(), 4096, 6144);
            assert!(!new.is_null());
            assert_eq!(heap.peak(), 6144);
            heap.realloc(old, 4096, 0);
            assert_eq!(heap.used(), 6144);
            // A small `osize` with no block is Lua's tag: no credit.
            assert!(heap.realloc(ptr::null_mut(), 8, 4096).is_null());
        }
    }

    #[test]
    fn alloc_free_reuse_and_limit() {
        let mut arena = vec![0u128; 4096]; // 64 KiB, 16-aligned
        let base = arena.as_mut_ptr().cast::<u8>();
        // SAFETY: the vector is 64 KiB, aligned to 16 and used by nothing else.
        let heap = unsafe { &mut *Heap::init(base, 65536) };
        // SAFETY: every block passed back below came from this heap with the size given.
        unsafe {
            let a = heap.realloc(ptr::null_mut(), 5, 100);
            assert!(!a.is_null());
            assert_eq!(heap.used(), 100);
            let b = heap.realloc(a, 100, 97); // same class: in place
            assert_eq!(a, b);
            assert_eq!(heap.used(), 97);
            let b = heap.realloc(b, 97, 50); // smaller class: moved
            assert_ne!(a, b);
            assert_eq!(heap.used(), 50);
            let again = heap.realloc(ptr::null_mut(), 0, 100);
            assert_eq!(again, a, "the big block went back to its own class");
            heap.realloc(again, 100, 0);
            heap.realloc(b, 50, 0);
            assert_eq!(heap.used(), 0);
            let c = heap.realloc(ptr::null_mut(), 0, 60);
            assert_eq!(c, b, "a freed block of the class is reused");
            heap.set_limit(1000);
            assert!(heap.realloc(ptr::null_mut(), 0, 2000).is_null());
            assert_eq!(heap.refusals(), 1);
            let d = heap.realloc(c, 60, 900); // grows within the limit
            assert!(!d.is_null());
            assert_eq!(heap.used(), 900);
            heap.set_limit(usize::MAX);
            assert!(
                heap.realloc(ptr::null_mut(), 0, 1 << 20).is_null(),
                "arena full"
            );
        }
    }
}
