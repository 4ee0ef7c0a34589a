//! Slots: a Lua state in a fixed arena, restored from its pristine snapshot for every run.
//!
//! A slot reserves one address range without committing memory (`MAP_NORESERVE`; pages
//! become resident when touched). The [`Heap`] header sits at its start and the Lua state,
//! with everything it allocates, lives after it. When the slot is created, the caller's
//! `build` function sets the state up (libraries, sandbox functions); the slot then collects
//! garbage and copies the arena's used prefix aside: the snapshot.
//!
//! [`Slot::restore`] copies the snapshot back over the arena, at the same address. That is a
//! complete fresh state: every pointer inside the state points into the arena (the state, the
//! allocator's lists) or at static data and code (C functions, `lua_alloc`), so the copy is
//! valid where it was taken, and whatever the previous run created, changed or deleted lives
//! in bytes the restored allocator considers free or has overwritten. After a run that grew
//! the arena by more than [`TRIM_THRESHOLD`], the pages above the snapshot go back to the OS
//! (`MADV_DONTNEED`), so the slot's resident size returns to its baseline.
//!
//! Releasing a slot needs no `lua_close`: the next restore overwrites it, and dropping the
//! slot unmaps the range (no finalizer runs: the sandbox's states have none to run).

use std::ffi::{c_int, c_void};
use std::ptr::{self, NonNull};

use mlua_sys as ffi;

use crate::asan;
use crate::heap::{self, Heap};
use crate::protect::{self, LuaFailure};
use crate::written::Written;

/// Growth above the snapshot, in bytes, past which a restore returns the pages to the OS.
pub const TRIM_THRESHOLD: usize = 1 << 20;

/// The largest arena a slot may reserve (virtual address space only).
pub const MAX_CAPACITY: usize = 1 << 40;

/// State size from which a checkpoint tracks the pages written (see [`Slot::checkpoint`])
/// instead of copying the whole state each time: below it a `memcpy` is cheaper than the
/// write faults and the page-table walk.
pub const TRACK_FROM: usize = 1 << 20;

/// Why a slot could not be created.
#[derive(Debug)]
pub enum SlotError {
    /// `mmap` refused the reservation.
    Reserve(std::io::Error),
    /// `lua_newstate` failed (arena too small for a state).
    NewState,
    /// The build function raised.
    Build(LuaFailure),
    /// Capacity outside `HEADER + 64 KiB ..= MAX_CAPACITY`.
    Capacity(usize),
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::Reserve(e) => write!(f, "cannot reserve the arena: {e}"),
            SlotError::NewState => write!(f, "cannot create a Lua state in the arena"),
            SlotError::Build(e) => write!(f, "building the pristine state failed: {e}"),
            SlotError::Capacity(n) => write!(f, "arena capacity out of range: {n}"),
        }
    }
}

impl std::error::Error for SlotError {}

/// A host-side copy of a state (an image, a checkpoint) that could not get its memory: the
/// allocator refused it (the process's address-space limit, or the host out of memory). Every
/// such copy grows with the script's data, so it is reserved fallibly first and refused with
/// this instead of aborting the process (Rust's infallible allocation aborts when it fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRefused {
    /// What the copy was for.
    pub what: &'static str,
    /// The bytes it asked for.
    pub bytes: usize,
}

impl std::fmt::Display for CopyRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the session's state copies need more memory than this process can allocate \
             ({} of {} bytes refused)",
            self.what, self.bytes
        )
    }
}

impl std::error::Error for CopyRefused {}

/// A copy of `bytes` in a new vector whose memory was reserved fallibly: `Err` instead of the
/// abort of `to_vec` when the allocator refuses it. `what` names the copy in the error.
pub fn copy_of(bytes: &[u8], what: &'static str) -> Result<Vec<u8>, CopyRefused> {
    let mut copy = Vec::new();
    reserve(&mut copy, bytes.len(), what)?;
    // Within the capacity just reserved: no allocation.
    copy.extend_from_slice(bytes);
    Ok(copy)
}

/// Makes room in `buf` for `more` bytes past its length, fallibly: amortized as `Vec`'s own
/// growth is (a checkpoint that grows a little with each call does not reallocate each time),
/// or exactly when the amortized size is refused.
fn reserve(buf: &mut Vec<u8>, more: usize, what: &'static str) -> Result<(), CopyRefused> {
    buf.try_reserve(more)
        .or_else(|_| buf.try_reserve_exact(more))
        .map_err(|_| CopyRefused {
            what,
            bytes: buf.len().saturating_add(more),
        })
}

/// One arena, its Lua state and its pristine snapshot.
pub struct Slot {
    base: NonNull<u8>,
    capacity: usize,
    page: usize,
    state: *mut ffi::lua_State,
    snapshot: Box<[u8]>,
    /// The checkpoint: the arena's used prefix when [`Slot::checkpoint`] was last called,
    /// kept equal to the arena everywhere `written` does not report a write.
    saved: Vec<u8>,
    /// Write tracking of the arena, on while the checkpoint is kept incrementally.
    written: Option<Written>,
    /// State size from which checkpoints track writes (`usize::MAX`: never, e.g. after the
    /// kernel refused once).
    track_from: usize,
}

// SAFETY: a slot owns its mapping and its state exclusively; nothing in them is tied to the
// thread that created them (the allocator keeps no thread-local data, Lua keeps none), so a
// slot may move to another thread. It is not `Sync`: using the state needs `&mut`.
unsafe impl Send for Slot {}

impl Slot {
    /// Reserves an arena of `capacity` bytes, builds a state in it with `build` (a
    /// `lua_CFunction` run under `lua_pcall`, receiving `ud` as a light userdata at index 1),
    /// collects garbage twice and takes the snapshot.
    ///
    /// # Safety
    /// `build` must follow the raising discipline (`protect.rs`) and may use `ud` only as the
    /// caller allows; it runs once, before `new` returns.
    pub unsafe fn new(
        capacity: usize,
        build: ffi::lua_CFunction,
        ud: *mut c_void,
    ) -> Result<Slot, SlotError> {
        if !(heap::HEADER + (64 << 10)..=MAX_CAPACITY).contains(&capacity) {
            return Err(SlotError::Capacity(capacity));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let capacity = capacity.div_ceil(page) * page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is affected. MAP_NORESERVE: untouched pages cost nothing.
        let mapping = unsafe {
            libc::mmap(
                ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(SlotError::Reserve(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(mapping.cast::<u8>()).ok_or(SlotError::NewState)?;
        let mut slot = Slot {
            base,
            capacity,
            page,
            state: ptr::null_mut(),
            snapshot: Box::new([]),
            saved: Vec::new(),
            written: None,
            track_from: TRACK_FROM,
        };
        // SAFETY: the mapping is page-aligned, writable, `capacity` bytes, and ours alone.
        let heap = unsafe { Heap::init(base.as_ptr(), capacity) };
        // SAFETY: `lua_alloc` implements the allocator contract on `heap`, which lives as long
        // as the mapping, i.e. as long as the state (both end in `Drop`).
        let state = unsafe { ffi::lua_newstate(heap::lua_alloc, heap.cast()) };
        if state.is_null() {
            return Err(SlotError::NewState);
        }
        slot.state = state;
        // SAFETY: `state` is a fresh state with an empty stack; `protect::call` runs `build`
        // and the collections under `lua_pcall` (see protect.rs).
        unsafe {
            protect::call(state, build, ud).map_err(SlotError::Build)?;
            protect::call(state, collect, ptr::null_mut()).map_err(SlotError::Build)?;
            ffi::lua_settop(state, 0);
        }
        slot.heap_mut().reset_peak();
        let extent = slot.heap().extent();
        asan::unpoison(base.as_ptr(), extent);
        // SAFETY: `[base, base + extent)` lies inside the mapping and holds the state just
        // built; nothing writes it while we copy.
        slot.snapshot = unsafe { std::slice::from_raw_parts(base.as_ptr(), extent) }.into();
        slot.heap().repoison(extent);
        slot.heap_mut().reset_peak();
        Ok(slot)
    }

    /// The state. Valid until the next [`Slot::restore`] or the slot's drop; every thread
    /// (coroutine) pointer taken from it is valid only until the next restore.
    pub fn state(&self) -> *mut ffi::lua_State {
        self.state
    }

    fn heap(&self) -> &Heap {
        // SAFETY: the header was written by `Heap::init` at the mapping's start and stays
        // there for the slot's life (restores rewrite it with a copy of itself).
        unsafe { &*self.base.as_ptr().cast::<Heap>() }
    }

    fn heap_mut(&mut self) -> &mut Heap {
        // SAFETY: as in `heap`; `&mut self` means no Lua code is running on this state.
        unsafe { &mut *self.base.as_ptr().cast::<Heap>() }
    }

    /// Bytes Lua holds now (exact: Lua's own count).
    pub fn used(&self) -> usize {
        self.heap().used()
    }

    /// The most Lua held since the last restore.
    pub fn peak(&self) -> usize {
        self.heap().peak()
    }

    /// Starts a new peak measurement from the current use.
    pub fn reset_peak(&mut self) {
        self.heap_mut().reset_peak();
    }

    /// Allocation requests refused since the last restore (limit or arena full).
    pub fn refusals(&self) -> u64 {
        self.heap().refusals()
    }

    /// Limits the bytes Lua may hold; refused requests raise "not enough memory" in Lua.
    pub fn set_limit(&mut self, bytes: usize) {
        self.heap_mut().set_limit(bytes);
    }

    /// Size of the pristine snapshot, in bytes.
    pub fn snapshot_len(&self) -> usize {
        self.snapshot.len()
    }

    /// Size of the arena's reservation, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the arena that are resident right now (`mincore`).
    pub fn resident(&self) -> usize {
        let pages = self.capacity / self.page;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is our mapping, page-aligned; `vec` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                self.base.as_ptr().cast(),
                self.capacity,
                vec.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|b| **b & 1 != 0).count() * self.page
    }

    /// Makes the state pristine again: the snapshot copied back, the limit lifted, and the
    /// pages above the snapshot returned to the OS if the last run grew past the threshold.
    pub fn restore(&mut self) {
        self.forget_checkpoint();
        let extent = self.heap().extent();
        let len = self.snapshot.len();
        asan::unpoison(self.base.as_ptr(), len);
        // SAFETY: `&mut self`: no Lua code runs on this state and no reference into the arena
        // is live. The snapshot was taken from this very range, at this address.
        unsafe {
            ptr::copy_nonoverlapping(self.snapshot.as_ptr(), self.base.as_ptr(), len);
        }
        self.heap().repoison(extent.max(len));
        if extent > len + TRIM_THRESHOLD {
            self.trim_above(len, extent);
        }
    }

    /// Bytes of the arena in use by the state now (what a checkpoint copies).
    pub fn extent(&self) -> usize {
        self.heap().extent()
    }

    /// Records the state as it is now, so that [`Slot::rollback`] can return to exactly this
    /// point. Take it only between runs: with no Lua code active on the state.
    ///
    /// The first checkpoint copies the arena's used prefix aside. From [`TRACK_FROM`] bytes on,
    /// the slot then tracks the pages written (`written.rs`), and each later checkpoint copies
    /// only the pages written since the previous checkpoint or rollback, plus the pages the
    /// state grew into: its cost follows what the calls in between touched, not the state's
    /// size. Without tracking (a small state, or a kernel without `userfaultfd` write-protect
    /// or `PAGEMAP_SCAN`), every checkpoint copies the whole prefix.
    ///
    /// The copy's memory is reserved before anything changes: `Err` when the allocator refuses
    /// it, and then there is no checkpoint to roll back to (the state itself is untouched; a
    /// kept incremental copy stays as consistent as it was, for the next attempt).
    pub fn checkpoint(&mut self) -> Result<(), CopyRefused> {
        let extent = self.page_round(self.heap().extent());
        let kept = self.saved.len();
        if self.written.is_some() && kept > 0 && kept <= extent {
            // Possibly incremental: the pages grown into since are appended (and a failed
            // scan's full copy below fits the same capacity).
            reserve(&mut self.saved, extent - kept, "the checkpoint")?;
        } else if self.saved.capacity() < extent {
            // A full copy: the old one goes first, so the two are never held together.
            self.saved = Vec::new();
            reserve(&mut self.saved, extent, "the checkpoint")?;
        }
        let mut started = false;
        if self.written.is_none() && extent >= self.track_from {
            started = self.start_tracking().is_ok();
            if !started {
                self.track_from = usize::MAX;
            }
        }
        let base = self.base.as_ptr();
        let old = self.saved.len();
        // Lua's free blocks are poisoned under ASan; this copy reads them on purpose.
        asan::unpoison(base, extent);
        // Incremental only from a checkpoint taken under tracking: `saved` then differs from
        // the arena only where a write was reported.
        let incremental = self.written.is_some() && !started && old > 0 && old <= extent;
        if incremental {
            let saved = &mut self.saved;
            let scanned = self.written.as_ref().map(|w| {
                w.scan(extent, true, |from, to| {
                    let to = to.min(old);
                    if from < to {
                        // SAFETY: `[from, to)` lies inside the arena's used prefix (below
                        // `old` <= `extent`) and inside `saved` (`old` bytes); no Lua code runs.
                        unsafe {
                            ptr::copy_nonoverlapping(
                                base.add(from),
                                saved.as_mut_ptr().add(from),
                                to - from,
                            )
                        };
                    }
                })
            });
            if let Some(Ok(())) = scanned {
                // The pages grown into since: copied whole, within the capacity reserved above.
                // SAFETY: `[old, extent)` lies inside the mapping; nothing writes it now.
                saved.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(base.add(old), extent - old)
                });
                self.heap().repoison(extent);
                return Ok(());
            }
            // A failed scan may have re-protected pages it did not report: nothing it said
            // can be trusted from now on.
            self.written = None;
            self.track_from = usize::MAX;
        } else if let Some(w) = &self.written {
            // A full copy follows: protect everything first, so the next scan reports only
            // what is written after it.
            if w.scan(extent, true, |_, _| {}).is_err() {
                self.written = None;
                self.track_from = usize::MAX;
            }
        }
        self.saved.clear();
        // Within the capacity reserved above (at least `extent`): no allocation.
        // SAFETY: `[base, base + extent)` lies inside the mapping (the extent is page-rounded
        // and capped by the capacity); `&mut self`: no Lua code runs while we read it.
        self.saved
            .extend_from_slice(unsafe { std::slice::from_raw_parts(base, extent) });
        self.heap().repoison(extent);
        Ok(())
    }

    /// Returns the state to the point [`Slot::checkpoint`] recorded: everything Lua did since
    /// is undone, allocator included — with tracking, by copying back only the pages written
    /// since. Pages the state grew into since then go back to the OS if they pass the
    /// threshold.
    ///
    /// # Panics
    /// If no checkpoint was taken since the slot was last restored.
    pub fn rollback(&mut self) {
        let len = self.saved.len();
        assert!(len >= heap::HEADER, "rollback without a checkpoint");
        let extent = self.page_round(self.heap().extent());
        let base = self.base.as_ptr();
        // The copies below write poisoned bytes (free blocks) on purpose.
        asan::unpoison(base, extent.max(len));
        let mut restored = false;
        if let Some(w) = &self.written {
            let mut runs = Vec::new();
            if w.scan(extent.max(len), false, |from, to| {
                runs.push((from, to.min(len)))
            })
            .is_ok()
            {
                for &(from, to) in runs.iter().filter(|(from, to)| from < to) {
                    // SAFETY: `[from, to)` lies below `len`, inside both the arena and
                    // `saved`, a copy of this arena's own prefix, valid at this address;
                    // `&mut self`: no reference into the arena is live.
                    unsafe {
                        ptr::copy_nonoverlapping(
                            self.saved.as_ptr().add(from),
                            base.add(from),
                            to - from,
                        )
                    };
                }
                // Our own copies lifted the protection: set it again, so the next scan
                // reports only what Lua writes.
                restored = runs.iter().all(|&(from, to)| {
                    from >= to || w.protect(from, to.div_ceil(self.page) * self.page).is_ok()
                });
            }
            if !restored {
                self.written = None;
                self.track_from = usize::MAX;
            }
        }
        if !restored {
            // SAFETY: as above, for the whole checkpoint.
            unsafe { ptr::copy_nonoverlapping(self.saved.as_ptr(), base, len) };
        }
        self.heap().repoison(extent.max(len));
        if extent > len + TRIM_THRESHOLD {
            self.trim_above(len, extent);
        }
    }

    /// Whether checkpoints currently copy only the pages written (see [`Slot::checkpoint`]).
    pub fn tracking(&self) -> bool {
        self.written.is_some()
    }

    /// Sets the state size from which checkpoints track writes (tests: 0 tracks always).
    pub fn set_track_from(&mut self, bytes: usize) {
        self.track_from = bytes;
    }

    /// A copy of the state's used prefix: what [`Slot::load`] takes back. `Err` when the
    /// allocator refuses its memory (nothing else happens).
    pub fn image(&self) -> Result<Vec<u8>, CopyRefused> {
        let extent = self.heap().extent();
        // SAFETY: `[base, base + extent)` lies inside the mapping; `&self`: no Lua code runs.
        copy_of(
            unsafe { std::slice::from_raw_parts(self.base.as_ptr(), extent) },
            "an image of a state",
        )
    }

    /// Replaces the state with `image`, an [`Slot::image`] of this slot (this address). The
    /// checkpoint is forgotten: take a new one before the next rollback.
    ///
    /// # Panics
    /// If `image` cannot be one (larger than the arena, smaller than the allocator's header).
    pub fn load(&mut self, image: &[u8]) {
        assert!(image.len() <= self.capacity && image.len() >= heap::HEADER);
        self.forget_checkpoint();
        let extent = self.heap().extent();
        asan::unpoison(self.base.as_ptr(), image.len());
        // SAFETY: as in `restore`: `&mut self`, no reference into the arena is live, and the
        // image is a copy of this arena's own prefix, valid at this address.
        unsafe { ptr::copy_nonoverlapping(image.as_ptr(), self.base.as_ptr(), image.len()) };
        self.heap().repoison(extent.max(image.len()));
        if extent > image.len() + TRIM_THRESHOLD {
            self.trim_above(image.len(), extent);
        }
    }

    /// Drops the checkpoint and the write tracking (the slot goes back to copying in full):
    /// its memory is free for other copies. The next rollback needs a new checkpoint.
    pub fn forget_checkpoint(&mut self) {
        self.written = None;
        self.saved = Vec::new();
        self.track_from = self.track_from.min(TRACK_FROM);
    }

    fn page_round(&self, n: usize) -> usize {
        (n.div_ceil(self.page) * self.page).min(self.capacity)
    }

    /// Turns write tracking on for the whole arena.
    fn start_tracking(&mut self) -> std::io::Result<()> {
        // SAFETY: the arena is our private anonymous mapping, page-aligned, `capacity` bytes;
        // `Drop` ends the tracking before it unmaps the range.
        let w = unsafe { Written::new(self.base.as_ptr(), self.capacity)? };
        self.written = Some(w);
        Ok(())
    }

    /// Returns the pages of `[from, to)` (rounded inward to pages) to the OS.
    fn trim_above(&mut self, from: usize, to: usize) {
        let start = from.div_ceil(self.page) * self.page;
        let end = (to.div_ceil(self.page) * self.page).min(self.capacity);
        if end > start {
            // SAFETY: `[start, end)` is inside our private anonymous mapping and above
            // everything the restored allocator hands out before bumping past it; after
            // MADV_DONTNEED those pages read as zeros, which is fine for unused memory.
            unsafe {
                libc::madvise(
                    self.base.as_ptr().add(start).cast(),
                    end - start,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The tracking of the range ends before the range is unmapped.
        self.written = None;
        // SAFETY: the mapping is ours; the state in it is abandoned without `lua_close`
        // (nothing outside the arena refers to it, and the sandbox's states have no
        // finalizers that would need to run).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.capacity);
        }
    }
}

/// Two full collections, so the snapshot holds no garbage (run under `lua_pcall`).
unsafe extern "C-unwind" fn collect(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: `l` is the running state; `lua_gc` may run the collector, which may raise only
    // inside this protected call. No Rust value with a destructor is live.
    unsafe {
        ffi::lua_gc(l, ffi::LUA_GCCOLLECT, 0);
        ffi::lua_gc(l, ffi::LUA_GCCOLLECT, 0);
    }
    0
}
