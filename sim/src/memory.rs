//! Guest memory: one anonymous mapping, shared between the workload threads (the "vCPUs")
//! and the migration threads, as guest RAM is shared in every VMM.

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

/// An anonymous mapping of `pages` pages.
pub struct GuestMemory {
    // Declared first so it stops (and joins) before the mapping goes.
    _prefault: Option<ferry_core::prefault::Prefault>,
    // Kept alive for `base`; never accessed through a reference, only through raw
    // pointers, because other threads write the memory concurrently.
    _map: MmapMut,
    base: *mut u8,
    pages: u64,
    page_size: usize,
}

// SAFETY: the mapping lives as long as the struct; all access goes through raw pointers
// with explicit bounds checks, so sharing the pointer between threads is sound as far as
// Rust's aliasing rules go. Concurrent guest writes and migration reads race by design
// (as with a running VM); dirty logging makes the engine re-send anything it read torn.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send` above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `pages` zeroed pages; `populate` pre-faults them in the background (a
    /// destination about to write every page: one kernel pass is ~4x cheaper here than a
    /// fault per first touch, and in the background it overlaps the transfer).
    pub fn new(pages: u64, page_size: usize, populate: bool) -> std::io::Result<Self> {
        let len = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(page_size))
            .ok_or_else(|| std::io::Error::other("memory size overflows"))?;
        let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let base = map.as_mut_ptr();
        // SAFETY: `map` is a private anonymous mapping of `len` bytes at `base`, and the
        // populator is dropped before it (field order).
        let prefault =
            populate.then(|| unsafe { ferry_core::prefault::Prefault::start(base, len) });
        Ok(Self {
            _prefault: prefault,
            _map: map,
            base,
            pages,
            page_size,
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn page_ptr(&self, index: u64) -> Option<*mut u8> {
        (index < self.pages).then(|| {
            // SAFETY: index < pages, so the offset is inside the mapping.
            unsafe { self.base.add(index as usize * self.page_size) }
        })
    }

    /// Copies page `index` into `buf` (`buf.len()` bytes, at most a page). False when out
    /// of range.
    pub fn read(&self, index: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.page_ptr(index) else {
            return false;
        };
        let n = buf.len().min(self.page_size);
        // SAFETY: `p` points at a whole page inside the mapping; `buf` is a distinct
        // allocation of at least `n` bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n) };
        true
    }

    /// Overwrites page `index` with `data` (at most a page). False when out of range.
    pub fn write(&self, index: u64, data: &[u8]) -> bool {
        let Some(p) = self.page_ptr(index) else {
            return false;
        };
        let n = data.len().min(self.page_size);
        // SAFETY: as in `read`; the destination range lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, n) };
        true
    }

    /// Zeroes page `index`.
    pub fn zero(&self, index: u64) -> bool {
        let Some(p) = self.page_ptr(index) else {
            return false;
        };
        // SAFETY: the page lies inside the mapping.
        unsafe { std::ptr::write_bytes(p, 0, self.page_size) };
        true
    }

    /// The 64-bit word at byte `offset`, as an atomic (for the workload's counters, which
    /// other threads read while it writes them).
    pub fn word(&self, offset: u64) -> Option<&AtomicU64> {
        let end = offset.checked_add(8)?;
        if !offset.is_multiple_of(8) || end > self.pages * self.page_size as u64 {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned (the mapping is page-aligned); the mapping
        // outlives the returned reference, which borrows `self`.
        Some(unsafe { AtomicU64::from_ptr(self.base.add(offset as usize).cast::<u64>()) })
    }

    /// Loads the word at `offset` (0 when out of range).
    pub fn load(&self, offset: u64) -> u64 {
        self.word(offset).map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Stores the word at `offset` (ignored when out of range).
    pub fn store(&self, offset: u64, v: u64) {
        if let Some(w) = self.word(offset) {
            w.store(v, Ordering::Relaxed);
        }
    }

    /// Runs `f` over disjoint mutable chunks of pages `[from, to)` in parallel; for filling
    /// memory before the guest starts (no other thread touches it then).
    pub fn fill_pages_parallel<F>(&self, from: u64, to: u64, f: F)
    where
        F: Fn(u64, &mut [u8]) + Sync,
    {
        use rayon::prelude::*;
        let to = to.min(self.pages);
        if from >= to {
            return;
        }
        let start = from as usize * self.page_size;
        let len = (to - from) as usize * self.page_size;
        // SAFETY: [start, start+len) lies inside the mapping; this runs before any other
        // thread accesses the memory, so the exclusive slice does not alias.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.base.add(start), len) };
        slice
            .par_chunks_mut(self.page_size)
            .enumerate()
            .for_each(|(i, page)| f(from + i as u64, page));
    }
}
