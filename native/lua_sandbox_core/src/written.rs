//! Which pages of an arena were written since the last look, without a signal handler.
//!
//! A [`Written`] registers an address range with a `userfaultfd` in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC`: the kernel itself lifts a page's protection on the first write to
//! it (a minor fault, no copy, nothing delivered to us). The `PAGEMAP_SCAN` ioctl on
//! `/proc/self/pagemap` (Linux 6.7+) then lists the pages that are present and unprotected —
//! written since they were last protected, or never protected — as runs of addresses, walking
//! only the page tables of the range, and can protect them again in the same walk.
//!
//! Over-reporting is harmless to the callers (a page reported as written that was not costs a
//! copy); under-reporting would not be, so every way a page can change is covered: a write to
//! a protected page lifts its protection; a page zapped by `MADV_DONTNEED` comes back as a
//! fresh, unprotected page on its next touch; a page never protected is reported as soon as it
//! is present. Any failure of the kernel interface is an error the caller answers by copying
//! everything (see `slot.rs`), never by trusting a partial answer.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

// <linux/userfaultfd.h> (the system headers may predate WP_ASYNC).
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, 24);
const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, 32);
const UFFDIO_WRITEPROTECT: libc::c_ulong = iowr(0xAA, 0x06, 24);
// <linux/fs.h>
const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f' as u64, 16, 96);
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

const fn iowr(ty: u64, nr: u64, size: u64) -> libc::c_ulong {
    ((3 << 30) | (size << 16) | (ty << 8) | nr) as libc::c_ulong
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Runs of written pages fetched per `PAGEMAP_SCAN` call.
const BATCH: usize = 64;

/// Set once tracking is off for this process (see [`disable`]).
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns write tracking off for the rest of this process's life: every later [`Written::new`]
/// fails, so checkpoints copy whole states, without a system call. A jailed worker calls this
/// before its seccomp filter goes on: the filter kills on `userfaultfd` and `open`, which a
/// first checkpoint would otherwise make.
pub fn disable() {
    DISABLED.store(true, Ordering::SeqCst);
}

fn pagemap() -> io::Result<&'static File> {
    static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();
    PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").ok())
        .as_ref()
        .ok_or_else(|| io::Error::other("/proc/self/pagemap cannot be opened"))
}

/// Write tracking of one address range (see the module doc). Dropping it ends the tracking
/// (closing the `userfaultfd` unregisters the range).
pub struct Written {
    uffd: OwnedFd,
    base: usize,
    len: usize,
}

impl Written {
    /// Starts tracking `[base, base + len)`. Pages present now count as written until the
    /// first [`Written::take`] protects them.
    ///
    /// # Safety
    /// The range must be a private anonymous mapping owned by the caller, page-aligned, that
    /// stays mapped as long as the `Written` lives.
    pub unsafe fn new(base: *mut u8, len: usize) -> io::Result<Written> {
        if DISABLED.load(Ordering::SeqCst) {
            return Err(io::Error::other("write tracking is off in this process"));
        }
        pagemap()?;
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just received and own alone.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC,
            ioctls: 0,
        };
        // SAFETY: the ioctl reads and writes exactly this struct.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: base as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: the range is the caller's anonymous mapping (contract); registering only
        // changes how write faults in it are resolved (by the kernel: WP_ASYNC).
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Huge pages would make every report 2 MiB wide.
        // SAFETY: advice only, on the caller's mapping.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_NOHUGEPAGE) };
        Ok(Written {
            uffd,
            base: base as usize,
            len,
        })
    }

    /// Calls `each(from, to)` (offsets into the range, page-aligned) for every run of pages
    /// in `[0, upto)` written since they were last protected, protecting them again
    /// (`rearm`) or not. On an error some runs may have been reported: the caller must not
    /// rely on the answer.
    pub fn scan(
        &self,
        upto: usize,
        rearm: bool,
        mut each: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        let end = self.base + upto.min(self.len);
        let mut start = self.base;
        let mut regions = [PageRegion::default(); BATCH];
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if rearm {
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
                } else {
                    PM_SCAN_CHECK_WPASYNC
                },
                start: start as u64,
                end: end as u64,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: BATCH as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: the kernel reads `arg` and writes at most `vec_len` regions into
            // `regions`, which outlives the call; the range is ours (see `new`).
            let n = unsafe { libc::ioctl(pagemap()?.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in &regions[..n as usize] {
                each(r.start as usize - self.base, r.end as usize - self.base);
            }
            if arg.walk_end as usize <= start {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            start = arg.walk_end as usize;
        }
        Ok(())
    }

    /// Protects `[from, to)` (offsets, page-aligned) again.
    pub fn protect(&self, from: usize, to: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: (self.base + from) as u64,
                len: (to - from) as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: the ioctl reads this struct; the range lies inside the registered one.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
