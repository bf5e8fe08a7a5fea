//! The embedded default guest: memory in an anonymous mapping, a sparse raw disk image,
//! and a workload on its own threads that dirties both in a verifiable way (see
//! [`workload`]). Its dirty tracking is the software equivalent of log-dirty mode: every
//! write sets a bit.
//!
//! Guest memory layout, in pages:
//!
//! ```text
//! [0] header | page ledger (8 B per page) | block ledger (8 B per block) | data pages ...
//! ```

mod fill;
mod memory;
pub mod state;
mod traits;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ferry_core::bytemap::DirtyBytes;
use ferry_core::guest::{GuestError, GuestLayout, OracleReport};

use ferry_disk::set::{DiskSpec, GuestDisks};
pub use ferry_disk::DiskImage;
pub use ferry_disk::{random_bytes, Fill};
pub use memory::GuestMemory;
pub use workload::{Pattern, Regs, WorkloadConfig};

use workload::{tag, LiveCounters, RunControl, BLOCK_MAGIC};

/// Backend name in the handshake.
pub const BACKEND: &str = "sim";
/// Header magic in page 0.
const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"FERRYSIM");
/// Problems listed in an oracle report at most.
const MAX_PROBLEMS: usize = 8;
/// Most workload threads a guest may have.
pub const MAX_THREADS: usize = 64;

/// Settings of a new sim guest.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Memory size in bytes (a multiple of the page size).
    pub memory: u64,
    /// Page size.
    pub page_size: u32,
    /// Disk image path; `None` for a guest without a disk.
    pub disk_path: Option<PathBuf>,
    /// Disk size in bytes (a multiple of the block size).
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Fraction of the disk filled with data when the image is created (0..=1).
    pub disk_used: f64,
    /// Initial memory content.
    pub fill: Fill,
    /// The workload.
    pub workload: WorkloadConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            memory: 256 << 20,
            page_size: 4096,
            disk_path: None,
            disk_size: 0,
            block_size: 4096,
            disk_used: 0.5,
            fill: Fill::Zero,
            workload: WorkloadConfig::default(),
        }
    }
}

/// An error creating a sim guest.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A bad setting.
    #[error("{0}")]
    Config(String),
    /// Mapping memory or opening the disk failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where things are in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemMap {
    pages: u64,
    page_size: u64,
    ledger_start: u64,
    bledger_start: u64,
    /// First data page.
    pub data_start: u64,
    /// Blocks of disk 0.
    pub blocks: u64,
}

impl MemMap {
    /// Computes the map; fails when memory is too small for the ledgers plus 16 data pages.
    pub fn new(pages: u64, page_size: u64, blocks: u64) -> Result<Self, String> {
        let ledger_pages = (pages * 8).div_ceil(page_size);
        let bledger_pages = (blocks * 8).div_ceil(page_size);
        let data_start = 1 + ledger_pages + bledger_pages;
        if pages < data_start + 16 {
            return Err(format!(
                "memory of {pages} pages is too small: the workload's ledgers need {data_start} pages plus 16 data pages"
            ));
        }
        Ok(Self {
            pages,
            page_size,
            ledger_start: 1,
            bledger_start: 1 + ledger_pages,
            data_start,
            blocks,
        })
    }

    fn ledger(&self, p: u64) -> u64 {
        self.ledger_start * self.page_size + p * 8
    }

    fn bledger(&self, b: u64) -> u64 {
        self.bledger_start * self.page_size + b * 8
    }

    /// Data pages `[lo, hi)` of thread `t` of `n`.
    pub fn partition(&self, t: usize, n: usize) -> (u64, u64) {
        let len = self.pages - self.data_start;
        let n = n.max(1) as u64;
        let t = t as u64;
        (
            self.data_start + len * t / n,
            self.data_start + len * (t + 1) / n,
        )
    }
}

/// Units checked and the problems found by one thread's self-check.
type CheckResult = (u64, Vec<String>);

/// Shared state of a sim guest (the threads hold an `Arc` of it).
pub struct Inner {
    mem: GuestMemory,
    disks: GuestDisks,
    map: MemMap,
    page_log: DirtyBytes,
    ctl: RunControl,
    config: Mutex<WorkloadConfig>,
    /// Registers: one slot per memory thread, then one for the disk thread.
    regs: Mutex<Vec<Regs>>,
    live: LiveCounters,
    checks: Mutex<Vec<Option<CheckResult>>>,
    checks_cond: Condvar,
    /// Disk writes per second allowed while a migration throttles the guest (0 = none).
    disk_limit: AtomicU64,
    /// Memory auto-converge (dirty-limit): page writes per second allowed over all memory
    /// threads while a migration throttles the guest (0 = none).
    dirty_limit: AtomicU64,
    /// Whether guest writes mark the dirty log (always, except in the untracked baseline
    /// of `ferry bench overhead`, which can never migrate).
    tracked: AtomicBool,
}

impl Inner {
    fn config(&self) -> WorkloadConfig {
        *self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn regs(&self, slot: usize) -> Regs {
        self.regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(slot)
            .copied()
            .unwrap_or_default()
    }

    fn save_regs(&self, slot: usize, r: Regs) {
        if let Some(s) = self
            .regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(slot)
        {
            *s = r;
        }
    }

    fn mark(&self, page: u64) {
        if self.tracked.load(Ordering::Relaxed) {
            self.page_log.set(page);
        }
    }

    /// One guest write: advance page `p`'s counter, then its ledger entry.
    fn write_page_version(&self, p: u64) {
        let lo = self.map.ledger(p);
        let c = self.mem.load(lo) + 1;
        let off = p * self.map.page_size;
        self.mem.store(off, c);
        self.mem.store(off + 8, tag(p, c));
        self.mark(p);
        self.mem.store(lo, c);
        self.mark(lo / self.map.page_size);
    }

    /// One guest disk write: a sequence-numbered block, then its ledger entry.
    fn write_block_version(&self, b: u64) -> std::io::Result<()> {
        let Some(disk) = self.disks.images().first() else {
            return Ok(());
        };
        let lo = self.map.bledger(b);
        let s = self.mem.load(lo) + 1;
        let mut block = vec![0u8; disk.block_size() as usize];
        let fill = tag(b, s);
        for (i, w) in block.chunks_exact_mut(8).enumerate() {
            let v = match i {
                0 => BLOCK_MAGIC,
                1 => b,
                2 => s,
                3 => tag(b, s),
                _ => fill.rotate_left((i % 64) as u32),
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
        disk.guest_write(b, &block)?;
        self.mem.store(lo, s);
        self.mark(lo / self.map.page_size);
        Ok(())
    }

    /// Checks data pages `[lo, hi)` against the ledger.
    fn check_pages(&self, lo: u64, hi: u64) -> CheckResult {
        let mut checked = 0;
        let mut problems = Vec::new();
        for p in lo..hi {
            let c = self.mem.load(self.map.ledger(p));
            if c == 0 {
                continue;
            }
            checked += 1;
            let off = p * self.map.page_size;
            let (v, t) = (self.mem.load(off), self.mem.load(off + 8));
            if (v != c || t != tag(p, c)) && problems.len() < MAX_PROBLEMS {
                problems.push(format!(
                    "page {p} holds version {v} but the guest last wrote version {c}"
                ));
            }
        }
        (checked, problems)
    }

    /// Checks every block of disk 0 against the block ledger.
    fn check_blocks(&self) -> CheckResult {
        let Some(disk) = self.disks.images().first() else {
            return (0, Vec::new());
        };
        let mut checked = 0;
        let mut problems = Vec::new();
        let mut head = [0u8; 32];
        for b in 0..self.map.blocks {
            let s = self.mem.load(self.map.bledger(b));
            if s == 0 {
                continue;
            }
            checked += 1;
            let ok = disk.read_head(b, &mut head).is_ok() && {
                let w = |i: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&head[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(a)
                };
                w(0) == BLOCK_MAGIC && w(1) == b && w(2) == s && w(3) == tag(b, s)
            };
            if !ok && problems.len() < MAX_PROBLEMS {
                problems.push(format!(
                    "block {b} does not hold sequence {s}, the guest's last write"
                ));
            }
        }
        (checked, problems)
    }

    fn record_check(&self, slot: usize, r: CheckResult) {
        let mut c = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = c.get_mut(slot) {
            *s = Some(r);
        }
        self.checks_cond.notify_all();
    }

    /// The self-check cannot finish (owed pages stopped arriving): every check still
    /// running counts as failed, so whoever waits for the verdict gets one.
    fn abandon_checks(&self) {
        let mut c = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        for s in c.iter_mut().filter(|s| s.is_none()) {
            *s = Some((
                0,
                vec!["not checked: owed pages stopped arriving (post-copy)".into()],
            ));
        }
        self.checks_cond.notify_all();
    }

    /// Whether the header is here and wrong. A header still owed (memory post-copy) is
    /// not read: that would wait for it.
    fn header_wrong(&self) -> bool {
        let owed = self.mem.postcopy().get().is_some_and(|o| o.is_owed(0));
        !owed && !self.header_ok()
    }

    fn header_ok(&self) -> bool {
        self.mem.load(0) == HEADER_MAGIC
            && self.mem.load(8) == self.map.pages
            && self.mem.load(16) == self.map.blocks
    }
}

/// Workload progress for status output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Page writes since the guest was created (over all hosts it lived on).
    pub page_writes: u64,
    /// Block writes likewise.
    pub block_writes: u64,
    /// Whether the workload runs.
    pub running: bool,
}

/// The sim guest.
pub struct SimGuest {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
    incoming: bool,
    /// For a received guest: each disk's source identity, and whether we created the file.
    layout: GuestLayout,
}

impl SimGuest {
    fn build(
        pages: u64,
        page_size: u32,
        disks: GuestDisks,
        workload: WorkloadConfig,
        incoming: bool,
    ) -> Result<Self, SimError> {
        let blocks = disks.images().first().map_or(0, |d| d.blocks());
        let map = MemMap::new(pages, u64::from(page_size), blocks).map_err(SimError::Config)?;
        let mem = GuestMemory::new(pages, page_size as usize, incoming).map_err(|source| {
            SimError::Io {
                what: format!(
                    "mapping {} MiB of guest memory",
                    (pages * u64::from(page_size)) >> 20
                ),
                source,
            }
        })?;
        let threads = usize::from(workload.threads.max(1));
        if threads > MAX_THREADS {
            return Err(SimError::Config(format!(
                "{threads} workload threads (at most {MAX_THREADS})"
            )));
        }
        let layout = GuestLayout {
            backend: BACKEND.into(),
            page_size,
            pages,
            disks: disks.layouts(),
        };
        let inner = Inner {
            mem,
            disks,
            map,
            page_log: DirtyBytes::new(pages),
            ctl: RunControl::new(),
            config: Mutex::new(workload),
            regs: Mutex::new(
                (0..=threads)
                    .map(|t| Regs::seeded(workload.seed, t as u64))
                    .collect(),
            ),
            live: LiveCounters {
                page_writes: (0..MAX_THREADS).map(|_| AtomicU64::new(0)).collect(),
                block_writes: AtomicU64::new(0),
            },
            checks: Mutex::new(Vec::new()),
            checks_cond: Condvar::new(),
            disk_limit: AtomicU64::new(0),
            dirty_limit: AtomicU64::new(0),
            tracked: AtomicBool::new(true),
        };
        Ok(Self {
            inner: Arc::new(inner),
            threads: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            incoming,
            layout,
        })
    }

    /// Creates a guest from `cfg`: maps and fills memory, opens (or creates and fills) the
    /// disk image. The workload does not run until [`SimGuest::start`].
    pub fn create(cfg: &SimConfig) -> Result<Self, SimError> {
        let ps = u64::from(cfg.page_size);
        if cfg.memory == 0 || !cfg.memory.is_multiple_of(ps) {
            return Err(SimError::Config(format!(
                "memory size {} is not a positive multiple of the page size {ps}",
                cfg.memory
            )));
        }
        let specs: Vec<DiskSpec> = cfg
            .disk_path
            .iter()
            .map(|path| DiskSpec {
                path: path.clone(),
                block_size: cfg.block_size,
                size: cfg.disk_size,
                used: cfg.disk_used,
                seed: cfg.workload.seed,
            })
            .collect();
        let disks = GuestDisks::open_live(&specs).map_err(|e| match e {
            GuestError::Io { what, source } => SimError::Io { what, source },
            e => SimError::Config(e.to_string()),
        })?;
        let g = Self::build(cfg.memory / ps, cfg.page_size, disks, cfg.workload, false)?;
        let map = g.inner.map;
        fill::fill_memory(&g.inner.mem, map.data_start, &cfg.fill, cfg.workload.seed)
            .map_err(|e| SimError::Config(format!("--fill: {e}")))?;
        g.inner.mem.store(0, HEADER_MAGIC);
        g.inner.mem.store(8, map.pages);
        g.inner.mem.store(16, map.blocks);
        Ok(g)
    }

    /// Builds an empty guest to receive `layout` into, with disk images in `dir`.
    pub fn incoming(layout: &GuestLayout, dir: &Path) -> Result<Self, GuestError> {
        if layout.backend != BACKEND {
            return Err(GuestError::Unsupported(format!(
                "backend {:?} (this destination runs {BACKEND:?} guests)",
                layout.backend
            )));
        }
        let disks = GuestDisks::incoming(&layout.disks, dir)?;
        // The real workload settings arrive with the state; a placeholder until then.
        let g = Self::build(
            layout.pages,
            layout.page_size,
            disks,
            WorkloadConfig::default(),
            true,
        )
        .map_err(|e| GuestError::Unsupported(e.to_string()))?;
        Ok(g)
    }

    /// Starts the workload threads (after creation, or on the destination after restore).
    pub fn start(&self) {
        // From here the guest writes its memory itself.
        self.inner.mem.settle();
        if self.started.swap(true, Ordering::SeqCst) {
            self.inner.ctl.resume();
            return;
        }
        let cfg = self.inner.config();
        let n = usize::from(cfg.threads.max(1));
        let check = self.incoming;
        {
            let mut c = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
            *c = if check { vec![None; n + 1] } else { Vec::new() };
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.ctl.live.store(n as u64 + 1, Ordering::SeqCst);
        for t in 0..n {
            let inner = Arc::clone(&self.inner);
            threads.push(std::thread::spawn(move || {
                workload::memory_thread(&inner, t, check);
            }));
        }
        let inner = Arc::clone(&self.inner);
        threads.push(std::thread::spawn(move || {
            workload::disk_thread(&inner, n, check);
        }));
    }

    /// Turns dirty tracking off for good: the baseline a benchmark measures the cost of
    /// tracking against. Such a guest refuses to migrate (its log would miss writes).
    pub fn without_dirty_tracking(&self) {
        self.inner.tracked.store(false, Ordering::SeqCst);
    }

    /// Stops the workload for good, joins its threads and closes the images' metadata.
    pub fn stop(&self) {
        self.inner.ctl.stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        if self.started.load(Ordering::SeqCst) {
            self.inner.disks.close();
        }
    }

    /// The disks (for inspection).
    pub fn disks(&self) -> &[std::sync::Arc<DiskImage>] {
        self.inner.disks.images()
    }

    /// Workload progress.
    pub fn stats(&self) -> SimStats {
        SimStats {
            page_writes: self
                .inner
                .live
                .page_writes
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .sum(),
            block_writes: self.inner.live.block_writes.load(Ordering::Relaxed),
            running: self.started.load(Ordering::SeqCst) && !self.inner.ctl.is_paused(),
        }
    }

    /// The workload settings.
    pub fn workload(&self) -> WorkloadConfig {
        self.inner.config()
    }

    /// Memory map.
    pub fn map(&self) -> MemMap {
        self.inner.map
    }

    /// Pauses the workload, checks every page and block against the ledgers, resumes.
    pub fn check_now(&self) -> Result<OracleReport, GuestError> {
        let was_running = self.started.load(Ordering::SeqCst) && !self.inner.ctl.is_paused();
        if was_running {
            self.inner.ctl.pause().map_err(GuestError::InvalidState)?;
        }
        let (pc, mut problems) = self
            .inner
            .check_pages(self.inner.map.data_start, self.inner.map.pages);
        let (bc, bp) = self.inner.check_blocks();
        problems.extend(bp);
        if was_running {
            self.inner.ctl.resume();
        }
        Ok(OracleReport {
            ok: problems.is_empty(),
            pages_checked: pc,
            blocks_checked: bc,
            problems,
        })
    }

    /// Disk images.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        self.inner.disks.paths()
    }

    /// Reads page `index` (tests).
    pub fn peek_page(&self, index: u64, buf: &mut [u8]) -> bool {
        self.inner.mem.read(index, buf)
    }

    fn page_range(&self, index: u64) -> Result<(), GuestError> {
        if index >= self.inner.map.pages {
            return Err(GuestError::OutOfRange {
                what: "page",
                index,
                limit: self.inner.map.pages,
            });
        }
        Ok(())
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        self.stop();
    }
}
