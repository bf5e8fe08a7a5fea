//! Guest memory: one anonymous mapping, shared between the workload threads (the "vCPUs")
//! and the migration threads, as guest RAM is shared in every VMM.

use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use ferry_core::prefault::FirstWrite;
#[cfg(test)]
use ferry_core::prefault::CHUNK_PAGES;

/// An anonymous mapping of `pages` pages.
pub struct GuestMemory {
    /// Memory post-copy: the pages still owed and the service of their faults. Declared
    /// first so it unregisters before the mapping goes.
    postcopy: ferry_uffd::PostcopySlot,
    // Declared first so it stops (and joins) before the mapping goes.
    after_start: std::sync::Mutex<Option<ferry_core::prefault::Prefault>>,
    /// For a destination's memory: which chunks no page reached yet (populated on their
    /// first write).
    fresh: Option<FirstWrite>,
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
    /// Maps `pages` zeroed pages. `incoming` (a destination about to write most pages):
    /// each chunk of [`ferry_core::prefault::CHUNK_PAGES`] is populated with one call when its first page is
    /// written (a kernel pass over 256 KiB is ~4x cheaper here than a fault per page, and
    /// on the receiver's own thread it competes with nothing), and a zero page arriving
    /// for an untouched chunk costs nothing (never allocated).
    pub fn new(pages: u64, page_size: usize, incoming: bool) -> std::io::Result<Self> {
        let len = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(page_size))
            .ok_or_else(|| std::io::Error::other("memory size overflows"))?;
        let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let base = map.as_mut_ptr();
        let fresh = incoming.then(|| FirstWrite::new(pages, page_size));
        Ok(Self {
            postcopy: ferry_uffd::PostcopySlot::default(),
            after_start: std::sync::Mutex::new(None),
            fresh,
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

    /// Populates page `index`'s chunk if it is still untouched (a destination's first
    /// write there).
    fn touch(&self, index: u64) {
        if let Some(f) = &self.fresh {
            // SAFETY: `base` is this struct's mapping of `pages` pages, alive with it.
            unsafe { f.touch(self.base, index) };
        }
    }

    /// Whether page `index` is known to be untouched since the mapping was made.
    fn untouched(&self, index: u64) -> bool {
        self.fresh.as_ref().is_some_and(|f| f.untouched(index))
    }

    /// The guest is about to run: its own writes do not mark chunks, so from now on no
    /// page is assumed untouched.
    /// What no page reached (zero regions) is populated in the background from here,
    /// so the guest's first touches there do not each fault (~20 µs here).
    pub fn settle(&self) {
        let was_fresh = self.fresh.as_ref().is_some_and(FirstWrite::invalidate);
        if !was_fresh || self.postcopy.get().is_some() {
            // (In post-copy, touching every page would demand every owed one.)
            return;
        }
        let len = self.pages as usize * self.page_size;
        // SAFETY: `base..base + len` is this struct's private anonymous mapping, and the
        // populator is dropped before it (field order).
        let populate = unsafe { ferry_core::prefault::Prefault::start(self.base, len) };
        *self.after_start.lock().unwrap_or_else(|p| p.into_inner()) = Some(populate);
    }

    /// Memory post-copy: the `owed` pages arrive after the guest runs; any access to one
    /// waits for it and the first asks `pull` for it. Once only.
    pub fn set_owed(
        &self,
        owed: &ferry_core::bitmap::Bitmap,
        pull: ferry_core::guest::PullPagesFn,
    ) -> Result<(), ferry_uffd::UffdError> {
        // Pages arrive through userfaultfd from now on, not through `write`.
        if let Some(f) = &self.fresh {
            f.invalidate();
        }
        // SAFETY: the mapping is this struct's private anonymous one and outlives the
        // registration (field order); owed pages are only written through `fill_owed`.
        unsafe {
            self.postcopy
                .start(self.base, self.pages, self.page_size, owed, pull)
        }
    }

    /// Memory post-copy: the owed pages, their installation and their faults.
    pub fn postcopy(&self) -> &ferry_uffd::PostcopySlot {
        &self.postcopy
    }

    /// Overwrites page `index` with `data` (at most a page). False when out of range.
    pub fn write(&self, index: u64, data: &[u8]) -> bool {
        let Some(p) = self.page_ptr(index) else {
            return false;
        };
        self.touch(index);
        let n = data.len().min(self.page_size);
        // SAFETY: as in `read`; the destination range lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, n) };
        true
    }

    /// Zeroes page `index` (nothing to do for a page still untouched since mapping).
    pub fn zero(&self, index: u64) -> bool {
        let Some(p) = self.page_ptr(index) else {
            return false;
        };
        if self.untouched(index) {
            return true;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of this process (from /proc/self/statm).
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    #[test]
    fn a_destination_populates_on_first_write_and_skips_untouched_zero_pages() {
        let pages = 16 * CHUNK_PAGES;
        let mem = GuestMemory::new(pages, 4096, true).unwrap();
        let before = rss();
        // Zero pages for untouched chunks allocate nothing.
        for i in 0..8 * CHUNK_PAGES {
            assert!(mem.zero(i));
        }
        let after_zeros = rss();
        assert!(
            after_zeros < before + (1 << 20),
            "{} KiB for zero pages",
            (after_zeros - before) >> 10
        );
        // A write populates its chunk and lands; a zero page there is written as zero.
        assert!(mem.write(8 * CHUNK_PAGES + 3, &[7u8; 4096]));
        let mut buf = vec![0u8; 4096];
        assert!(mem.read(8 * CHUNK_PAGES + 3, &mut buf));
        assert!(buf.iter().all(|b| *b == 7));
        assert!(mem.zero(8 * CHUNK_PAGES + 3));
        assert!(mem.read(8 * CHUNK_PAGES + 3, &mut buf));
        assert!(buf.iter().all(|b| *b == 0));
        // Once the guest runs, its own writes do not mark chunks: zero pages are written.
        mem.settle();
        mem.store(4096, 0xdead_beef);
        assert!(mem.zero(1));
        assert_eq!(mem.load(4096), 0);
        // Out of range stays refused.
        assert!(!mem.write(pages, &[1]));
        assert!(!mem.zero(pages));
    }
}
