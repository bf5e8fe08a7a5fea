//! Memory post-copy on `userfaultfd`: a destination's guest runs before all of its memory
//! arrived. Pages still owed are absent from the mapping; the first access to one (a vCPU,
//! the guest's workload, or the VMM's own code) blocks in the kernel, a service thread
//! reads the fault and asks the source for the page, and the page is installed whole and
//! atomically (`UFFDIO_COPY`, or `UFFDIO_ZEROPAGE` for a zero page), waking whoever waits.
//!
//! The mapping must be private anonymous memory (both the sim and the KVM backends map
//! guest RAM that way). Pages that are not owed but were never touched (zero pages the
//! destination skipped) fault as well while the range is registered: they are zero, and
//! are filled as such at once without asking anyone.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_core::bitmap::{Bitmap, DirtyBitmap};
use ferry_core::guest::{FaultFigures, PullPagesFn};
use userfaultfd::{Event, Uffd, UffdBuilder};

/// Errors of memory post-copy.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd could not be opened or set up.
    #[error("userfaultfd is not available")]
    Open(#[source] userfaultfd::Error),
    /// The guest memory could not be registered.
    #[error("registering guest memory with userfaultfd")]
    Register(#[source] userfaultfd::Error),
    /// Dropping the stale content of owed pages failed.
    #[error("dropping owed pages")]
    Drop(#[source] std::io::Error),
    /// Installing a page failed.
    #[error("installing page {page}")]
    Install {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: userfaultfd::Error,
    },
    /// A page outside the memory.
    #[error("page {page} is out of range ({pages})")]
    OutOfRange {
        /// The page asked for.
        page: u64,
        /// Pages of the memory.
        pages: u64,
    },
    /// The service thread could not start.
    #[error("starting the fault service")]
    Thread(#[source] std::io::Error),
}

/// A set of owed pages that threads clear concurrently, and how many are left.
struct OwedSet {
    bits: DirtyBitmap,
    left: AtomicU64,
}

impl OwedSet {
    fn new(owed: &Bitmap) -> Self {
        let bits = DirtyBitmap::new(owed.len());
        bits.merge(owed);
        Self {
            bits,
            left: AtomicU64::new(owed.count()),
        }
    }

    fn contains(&self, i: u64) -> bool {
        self.bits.is_set(i)
    }

    /// Clears `i`; whether it was owed.
    fn take(&self, i: u64) -> bool {
        let was = self.bits.take_bit(i);
        if was {
            self.left.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    fn to_bitmap(&self) -> Bitmap {
        self.bits.peek()
    }
}

/// What the service thread and the installers share.
struct Inner {
    uffd: Uffd,
    base: usize,
    pages: u64,
    page_size: usize,
    owed: OwedSet,
    /// Pages asked for and when each was first faulted on.
    waiting: Mutex<HashMap<u64, Instant>>,
    /// Fault-to-installed latencies, microseconds.
    latencies: Mutex<Vec<u32>>,
    faults: AtomicU64,
    stop: AtomicBool,
}

// SAFETY: `base` is an address, never dereferenced here except through the kernel's
// userfaultfd ioctls, which are thread-safe; the mapping outlives `OwedMemory` (the
// contract of `OwedMemory::start`).
unsafe impl Send for Inner {}
// SAFETY: see `Send`.
unsafe impl Sync for Inner {}

/// Guest memory whose owed pages arrive while the guest runs.
pub struct OwedMemory {
    inner: Arc<Inner>,
    service: Mutex<Option<JoinHandle<()>>>,
}

impl OwedMemory {
    /// Drops the content of the `owed` pages of the mapping at `base` (`pages` pages of
    /// `page_size`), registers the mapping for missing-page faults, and starts the thread
    /// that serves them: a fault on an owed page calls `pull` once for it.
    ///
    /// # Safety
    ///
    /// `base..base + pages * page_size` must be a private anonymous mapping that stays
    /// mapped until this value is dropped, and nothing may write the owed pages except
    /// through [`OwedMemory::fill`] until they are filled.
    pub unsafe fn start(
        base: *mut u8,
        pages: u64,
        page_size: usize,
        owed: &Bitmap,
        pull: PullPagesFn,
    ) -> Result<Self, UffdError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Open)?;
        let len = pages as usize * page_size;
        // Stale copies of owed pages (sent in an earlier round, dirtied since) must go:
        // only a missing page faults.
        for (first, n) in owed.runs() {
            // SAFETY: the run lies inside the mapping (caller's contract); dropping private
            // anonymous pages makes them read back as missing.
            let r = unsafe {
                libc::madvise(
                    base.add(first as usize * page_size).cast(),
                    n as usize * page_size,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(UffdError::Drop(std::io::Error::last_os_error()));
            }
        }
        uffd.register(base.cast(), len)
            .map_err(UffdError::Register)?;
        let inner = Arc::new(Inner {
            uffd,
            base: base as usize,
            pages,
            page_size,
            owed: OwedSet::new(owed),
            waiting: Mutex::new(HashMap::new()),
            latencies: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let served = Arc::clone(&inner);
        let service = std::thread::Builder::new()
            .name("ferry-uffd".into())
            .spawn(move || serve(&served, &*pull))
            .map_err(UffdError::Thread)?;
        Ok(Self {
            inner,
            service: Mutex::new(Some(service)),
        })
    }

    /// Installs page `index` (`None`: zero) if it is still owed; whether it was.
    pub fn fill(&self, index: u64, data: Option<&[u8]>) -> Result<bool, UffdError> {
        let inner = &self.inner;
        if index >= inner.pages {
            return Err(UffdError::OutOfRange {
                page: index,
                pages: inner.pages,
            });
        }
        if !inner.owed.contains(index) {
            return Ok(false);
        }
        inner.install(index, data)?;
        // Cleared only once the page is in: a fault racing with this sees it owed and
        // waits for the wake-up the install gives.
        let was = inner.owed.take(index);
        let asked = inner
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
        if let Some(t) = asked {
            let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            inner
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(us);
        }
        if inner.owed.left.load(Ordering::Acquire) == 0 {
            self.finish();
        }
        Ok(was)
    }

    /// Pages still owed.
    pub fn owed(&self) -> u64 {
        self.inner.owed.left.load(Ordering::Acquire)
    }

    /// The pages still owed.
    pub fn owed_bitmap(&self) -> Bitmap {
        self.inner.owed.to_bitmap()
    }

    /// Whether page `index` is still owed.
    pub fn is_owed(&self, index: u64) -> bool {
        self.inner.owed.contains(index)
    }

    /// The faults served so far.
    pub fn figures(&self) -> FaultFigures {
        let mut l = self
            .inner
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        l.sort_unstable();
        let at = |q: f64| -> f64 {
            if l.is_empty() {
                0.0
            } else {
                f64::from(l[((l.len() - 1) as f64 * q).round() as usize])
            }
        };
        FaultFigures {
            faults: self.inner.faults.load(Ordering::Relaxed),
            latency_us: [at(0.5), at(0.99), at(1.0)],
        }
    }

    /// Every page arrived: stop serving faults and unregister, so untouched zero pages
    /// fault the ordinary way from now on.
    fn finish(&self) {
        let handle = self
            .service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.stop.store(true, Ordering::Release);
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        let len = self.inner.pages as usize * self.inner.page_size;
        if let Err(e) = self.inner.uffd.unregister(self.inner.base as *mut _, len) {
            tracing::warn!("unregistering guest memory from userfaultfd: {e}");
        }
    }
}

impl Drop for OwedMemory {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Inner {
    fn page_addr(&self, index: u64) -> *mut libc::c_void {
        (self.base + index as usize * self.page_size) as *mut _
    }

    /// Copies (or zeroes) one page in and wakes its waiters; a page already there is not
    /// an error (another install, or a zero fill, won).
    fn install(&self, index: u64, data: Option<&[u8]>) -> Result<(), UffdError> {
        let dst = self.page_addr(index);
        let r = match data {
            Some(d) if d.len() >= self.page_size => {
                // SAFETY: `dst` is a page of the registered range; `d` holds a whole page.
                unsafe { self.uffd.copy(d.as_ptr().cast(), dst, self.page_size, true) }
            }
            Some(d) => {
                let mut page = vec![0u8; self.page_size];
                page[..d.len()].copy_from_slice(d);
                // SAFETY: as above, from a whole-page buffer.
                unsafe {
                    self.uffd
                        .copy(page.as_ptr().cast(), dst, self.page_size, true)
                }
            }
            // SAFETY: `dst` is a page of the registered range.
            None => unsafe { self.uffd.zeropage(dst, self.page_size, true) },
        };
        match r {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                let _ = self.uffd.wake(dst, self.page_size);
                Ok(())
            }
            Err(source) => Err(UffdError::Install {
                page: index,
                source,
            }),
        }
    }
}

/// The fault service: reads faults, fills untouched zero pages at once, and asks the
/// source for owed pages (each once), in one request per burst of faults.
fn serve(inner: &Inner, pull: &(dyn Fn(&[u64]) + Send + Sync)) {
    let fd = inner.uffd.as_raw_fd();
    let mut ask: Vec<u64> = Vec::new();
    while !inner.stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout so `stop` is seen.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        loop {
            match inner.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    let off = (addr as usize).wrapping_sub(inner.base);
                    let page = (off / inner.page_size) as u64;
                    if page >= inner.pages {
                        continue;
                    }
                    if inner.owed.contains(page) {
                        let mut w = inner.waiting.lock().unwrap_or_else(|p| p.into_inner());
                        if let std::collections::hash_map::Entry::Vacant(e) = w.entry(page) {
                            e.insert(Instant::now());
                            inner.faults.fetch_add(1, Ordering::Relaxed);
                            ask.push(page);
                        }
                    } else if let Err(e) = inner.install(page, None) {
                        // Not owed and not there: a zero page nobody sent (or one that
                        // was installed a moment ago, which `install` tolerates).
                        tracing::warn!("serving a fault on page {page}: {e}");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("reading userfaultfd: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
            }
        }
        if !ask.is_empty() {
            pull(&ask);
            ask.clear();
        }
    }
}

/// A guest memory's post-copy, set up at most once: what a backend's memory holds.
#[derive(Default)]
pub struct PostcopySlot(std::sync::OnceLock<OwedMemory>);

impl PostcopySlot {
    /// Sets up post-copy of `owed` over the mapping at `base` ([`OwedMemory::start`]).
    ///
    /// # Safety
    ///
    /// As for [`OwedMemory::start`]; the slot must be dropped before the mapping.
    pub unsafe fn start(
        &self,
        base: *mut u8,
        pages: u64,
        page_size: usize,
        owed: &Bitmap,
        pull: PullPagesFn,
    ) -> Result<(), UffdError> {
        if owed.len() != pages {
            return Err(UffdError::OutOfRange {
                page: owed.len(),
                pages,
            });
        }
        // SAFETY: the caller's contract.
        let owed = unsafe { OwedMemory::start(base, pages, page_size, owed, pull) }?;
        if self.0.set(owed).is_err() {
            tracing::warn!("memory post-copy was already set up");
        }
        Ok(())
    }

    /// Installs an owed page (`None`: zero); false when not owed (or no post-copy).
    pub fn fill(&self, index: u64, data: Option<&[u8]>) -> Result<bool, UffdError> {
        match self.0.get() {
            Some(p) => p.fill(index, data),
            None => Ok(false),
        }
    }

    /// The owed pages (`None`: no post-copy).
    pub fn get(&self) -> Option<&OwedMemory> {
        self.0.get()
    }
}

#[cfg(test)]
mod tests;
