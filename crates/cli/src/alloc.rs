//! A global allocator that can count live heap bytes, for `farthing bench`'s memory figures.
//!
//! Counting is off unless a measurement turns it on, so the server pays one relaxed load per
//! allocation and nothing else.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

pub struct Counting;

static ENABLED: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed straight to the system allocator; counting only reads sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() && ENABLED.load(Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() && ENABLED.load(Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ENABLED.load(Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size() as isize, Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() && ENABLED.load(Relaxed) {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        }
        new
    }
}

/// Blocks at least this large are mapped on their own and unmapped when freed (glibc's
/// `M_MMAP_THRESHOLD`).
const MAPPED_BLOCK_BYTES_MIN: std::ffi::c_int = 4 << 20;

/// Sets the C allocator up for a process whose memory must stay near a budget.
///
/// glibc maps large blocks on their own, but after the first such block is freed it raises
/// the size that counts as large, up to 32 MiB, and from then on keeps blocks below it in its
/// heap when they are freed: resident, for reuse. A checkpoint's transient vectors and hash
/// tables are of that size, so a bounded-memory server held 580-690 MiB of freed memory
/// beside 850-980 MiB in use. A fixed threshold of 4 MiB maps every large block and gives
/// it back when freed (180-320 MiB freed and kept; ADR 0004); at 1 MiB, a batch request's
/// buffers would be fresh mappings each time, zeroed page by page. An operator's own
/// `glibc.malloc.mmap_threshold` tunable is left as set. Other C libraries manage their
/// memory their own way, and nothing is done there.
pub fn settle() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        let tuned = std::env::var("GLIBC_TUNABLES")
            .is_ok_and(|tunables| tunables.contains("glibc.malloc.mmap_threshold"));
        if !tuned {
            // SAFETY: `mallopt` changes the allocator's settings under its own lock and may be
            // called at any time; this runs before any thread is started.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES_MIN);
            }
        }
    }
}

/// Gives the heap's free memory back to the operating system: glibc keeps freed blocks below
/// its mmap threshold for reuse, resident, until asked (`malloc_trim`). Other C libraries
/// return memory their own way, and nothing is done there.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's `malloc_trim` takes a byte count, touches only the allocator's own
        // free lists (under its own locks) and may be called from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// The C allocator's own figures: bytes in use by the program, and bytes freed but kept by
/// the allocator (resident unless given back). `None` where the C library does not say.
pub fn heap_figures() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[repr(C)]
        struct MallInfo2 {
            arena: usize,
            ordblks: usize,
            smblks: usize,
            hblks: usize,
            hblkhd: usize,
            usmblks: usize,
            fsmblks: usize,
            uordblks: usize,
            fordblks: usize,
            keepcost: usize,
        }
        unsafe extern "C" {
            fn mallinfo2() -> MallInfo2;
        }
        // SAFETY: glibc's `mallinfo2` (2.33 and later) takes nothing and returns its figures
        // by value, reading the allocator's arenas under their own locks.
        let info = unsafe { mallinfo2() };
        Some(((info.uordblks + info.hblkhd) as u64, info.fordblks as u64))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Heap bytes allocated (net of frees) while `measure` ran.
pub fn heap_bytes_of<T>(measure: impl FnOnce() -> T) -> (T, isize) {
    ENABLED.store(true, Relaxed);
    let before = LIVE_BYTES.load(Relaxed);
    let value = measure();
    let after = LIVE_BYTES.load(Relaxed);
    ENABLED.store(false, Relaxed);
    (value, after - before)
}
