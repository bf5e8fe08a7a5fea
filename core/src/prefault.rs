//! Pre-faulting a destination's guest memory in the background. A destination writes every
//! page of the first pass, and one kernel pass over the mapping is several times cheaper
//! than a fault per first touch; done before the handshake answers, it was most of the time
//! outside the rounds (about 0.3 s per GiB here). Done beside the transfer, it overlaps the
//! wait for the first frames, and pages the receiver writes first simply fault as usual.
//! The KVM backend uses it; the sim guest populates each 256 KiB chunk on its first write
//! instead, which on one host with 2 cores competes with nothing, and uses it only once
//! the guest runs, for the regions no page reached.
//! (Measured on a 2 GiB guest here: the whole migration took 791–835 ms with the populating
//! in the background against 1,019–1,130 ms with it before the handshake answered;
//! transparent huge pages were slower still in this nested VM, so none are asked for.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes populated per call, so a stop request is seen quickly.
const CHUNK: usize = 16 << 20;

/// A region's base address, sent to the populating thread.
struct Region(*mut u8, usize);

// SAFETY: the pointer is only passed to `madvise`, never dereferenced, and the owner of the
// mapping keeps it mapped until the thread is joined (see [`Prefault::start`]).
unsafe impl Send for Region {}

/// A thread populating a mapping, stopped and joined when dropped.
pub struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Prefault {
    /// Starts populating `len` bytes at `base` for writing, front to back
    /// (`MADV_POPULATE_WRITE`; on kernels without it, nothing is done and pages fault on
    /// first touch as they would anyway). Populating never changes content, so it may
    /// race with writers.
    ///
    /// # Safety
    ///
    /// `base..base + len` must be one private anonymous mapping that stays mapped until
    /// the returned value is dropped.
    pub unsafe fn start(base: *mut u8, len: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let region = Region(base, len);
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let region = region;
                let mut at = 0;
                while at < region.1 && !flag.load(Ordering::Relaxed) {
                    let n = CHUNK.min(region.1 - at);
                    // SAFETY: `at + n <= len` inside the mapping the caller keeps alive;
                    // MADV_POPULATE_WRITE only faults pages in, without changing content.
                    let r = unsafe {
                        libc::madvise(region.0.add(at).cast(), n, libc::MADV_POPULATE_WRITE)
                    };
                    if r != 0 {
                        break;
                    }
                    at += n;
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pages per chunk a destination populates at once on its first write there (256 KiB of
/// 4 KiB pages: one frame's worth).
pub const CHUNK_PAGES: u64 = 64;

/// A destination's memory populated a chunk at a time, on the first page written there
/// (a kernel pass over 256 KiB is ~4x cheaper here than a fault per page, and on the
/// receiver's own thread it competes with nothing). A zero page arriving for a chunk still
/// untouched costs nothing; memory no page reached is never allocated, so nothing has to
/// be dropped when it turns out to be owed (memory post-copy).
pub struct FirstWrite {
    /// Per chunk, whether it is untouched since the mapping was made (all zero).
    fresh: Box<[AtomicBool]>,
    /// Whether `fresh` still describes the memory: only until the guest first runs (its
    /// own writes do not clear the flags).
    valid: AtomicBool,
    pages: u64,
    page_size: usize,
}

impl FirstWrite {
    /// Every chunk of `pages` pages untouched.
    pub fn new(pages: u64, page_size: usize) -> Self {
        Self {
            fresh: (0..pages.div_ceil(CHUNK_PAGES))
                .map(|_| AtomicBool::new(true))
                .collect(),
            valid: AtomicBool::new(true),
            pages,
            page_size,
        }
    }

    /// Populates page `index`'s chunk if it is still untouched (a first write there).
    /// Once invalidated, nothing: the guest's own touches fault as usual, and with memory
    /// post-copy a chunk's owed pages must not all be faulted in for one page.
    ///
    /// # Safety
    ///
    /// `base` must be the start of the private anonymous mapping of `pages` pages this
    /// was made for, mapped for the duration of the call.
    pub unsafe fn touch(&self, base: *mut u8, index: u64) {
        if !self.valid.load(Ordering::Acquire) {
            return;
        }
        let c = (index / CHUNK_PAGES) as usize;
        let Some(flag) = self.fresh.get(c) else {
            return;
        };
        if !flag.load(Ordering::Acquire) {
            return;
        }
        let first = c as u64 * CHUNK_PAGES;
        let n = CHUNK_PAGES.min(self.pages - first) as usize * self.page_size;
        // SAFETY: the chunk lies inside the mapping (caller's contract); populating only
        // faults pages in without changing their content (it may fail on old kernels:
        // the pages then fault on first write, as they would anyway).
        unsafe {
            libc::madvise(
                base.add(first as usize * self.page_size).cast(),
                n,
                libc::MADV_POPULATE_WRITE,
            )
        };
        flag.store(false, Ordering::Release);
    }

    /// Whether page `index` is known to be untouched (all zero, never allocated).
    pub fn untouched(&self, index: u64) -> bool {
        self.valid.load(Ordering::Acquire)
            && self
                .fresh
                .get((index / CHUNK_PAGES) as usize)
                .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// The guest is about to run (or its memory stops being written by the migration
    /// alone): from now on no page is assumed untouched. Returns whether it was valid.
    pub fn invalidate(&self) -> bool {
        self.valid.swap(false, Ordering::AcqRel)
    }
}
