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
