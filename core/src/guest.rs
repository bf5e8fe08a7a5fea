//! The guest seams: what a backend (the sim guest, KVM, Xen) provides to the engine.
//!
//! A *source* guest is running and being migrated away; a *destination* guest is being
//! filled and then resumed. A backend usually implements both on one type, because a
//! guest that arrived must be able to leave again.

use crate::bitmap::Bitmap;
use crate::image::ImageIdentity;

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// Name, unique within the guest (becomes the image file name on the destination).
    pub name: String,
    /// Block size in bytes (4096 by default).
    pub block_size: u32,
    /// Number of blocks.
    pub blocks: u64,
    /// The image's identity and current generation, when the image is managed.
    pub identity: Option<ImageIdentity>,
}

impl DiskLayout {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// The shape of a guest, sent in the handshake so the destination can build a matching one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    /// Backend kind ("sim", "kvm", ...): the destination must have the same backend.
    pub backend: String,
    /// Page size in bytes.
    pub page_size: u32,
    /// Number of guest pages.
    pub pages: u64,
    /// The guest's local disks.
    pub disks: Vec<DiskLayout>,
}

impl GuestLayout {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.pages * u64::from(self.page_size)
    }

    /// Sum of all disk sizes in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.disks.iter().map(DiskLayout::bytes).sum()
    }

    /// The largest unit (page or block) in bytes: the size of per-unit buffers.
    pub fn max_unit_size(&self) -> usize {
        self.disks
            .iter()
            .map(|d| d.block_size as usize)
            .chain([self.page_size as usize])
            .max()
            .unwrap_or(4096)
    }
}

/// Versioned vCPU/device state, opaque to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    /// Format version chosen by the backend; the destination rejects what it cannot read.
    pub version: u32,
    /// The encoded state.
    pub bytes: Vec<u8>,
}

/// Result of the guest's own consistency check after it resumed on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OracleReport {
    /// Whether every page and block the workload wrote holds its last written version.
    pub ok: bool,
    /// Pages checked.
    pub pages_checked: u64,
    /// Blocks checked.
    pub blocks_checked: u64,
    /// First problems found, human-readable.
    pub problems: Vec<String>,
}

/// Error from a guest backend.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// An I/O error on a backing file or device.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A request outside the guest's layout.
    #[error("{what} {index} is out of range ({limit})")]
    OutOfRange {
        /// "page" or "block".
        what: &'static str,
        /// The index asked for.
        index: u64,
        /// The number of units.
        limit: u64,
    },
    /// The state blob could not be used.
    #[error("bad state blob: {0}")]
    BadState(String),
    /// The operation is not valid now (e.g. saving state of a running guest).
    #[error("{0}")]
    InvalidState(String),
    /// The layout offered cannot be built here.
    #[error("unsupported layout: {0}")]
    Unsupported(String),
}

/// A guest's disks as the engine drives them. A backend whose disks are Ferry's images
/// (`ferry-disk`'s `GuestDisks`) returns them from `storage()`, and every disk method of
/// [`SourceGuest`] and [`DestGuest`] goes to them by default.
pub trait GuestStorage: Send + Sync {
    /// Starts (restarts, clearing) block dirty tracking on every disk.
    fn start_block_log(&self);
    /// Fetch-and-clear of `disk`'s block log.
    fn fetch_dirty_blocks(&self, disk: usize) -> Result<Bitmap, GuestError>;
    /// Merges a fetched block log back.
    fn merge_dirty_blocks(&self, disk: usize, blocks: &Bitmap);
    /// Blocks of `disk` that may hold data.
    fn allocated_blocks(&self, disk: usize) -> Result<Bitmap, GuestError>;
    /// Reads block `index` of `disk`.
    fn read_block(&self, disk: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError>;
    /// Blocks of `disk` written since `generation` began, if known.
    fn written_since(&self, disk: usize, generation: u64) -> Option<Bitmap>;
    /// Writes block `index` of `disk` (from the migration, not the guest).
    fn write_block(&self, disk: usize, index: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Zeroes block `index` of `disk`.
    fn zero_block(&self, disk: usize, index: u64) -> Result<(), GuestError>;
    /// Starts write-back without waiting for it.
    fn start_writeback(&self) -> Result<(), GuestError>;
    /// What this destination holds for `disk`.
    fn base(&self, disk: usize) -> Base;
    /// Storage post-copy: `owed` blocks of `disk` arrive later.
    fn set_owed(&self, disk: usize, owed: Bitmap, pull: PullFn) -> Result<(), GuestError>;
    /// A late block arrived; written only if still owed.
    fn fill_owed(&self, disk: usize, index: u64, data: &[u8]) -> Result<bool, GuestError>;
    /// Prepares `disk` for the plan before any block arrives.
    fn prepare(&self, disk: usize, plan: DiskPlan) -> Result<(), GuestError>;
    /// A received guest is about to be acknowledged and its data is durable: record in
    /// every image's metadata which image (and generation) it now continues.
    fn record_received(&self) -> Result<(), GuestError>;
    /// Storage post-copy: the owed blocks can no longer arrive; reads of them fail at
    /// once instead of waiting.
    fn abandon_owed(&self);
    /// Storage post-copy: blocks still owed, over every disk.
    fn owed_blocks(&self) -> u64;
    /// Storage post-copy: the blocks of `disk` still owed (`None`: nothing owed).
    fn owed_bitmap(&self, disk: usize) -> Option<Bitmap>;
}

/// The error for disk `disk` of a guest without disks.
fn no_disk(disk: usize) -> GuestError {
    GuestError::OutOfRange {
        what: "disk",
        index: disk as u64,
        limit: 0,
    }
}

/// How much memory auto-converge slows a guest down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuThrottle {
    /// Share of the vCPUs' time taken away, percent (0: none, at most 99).
    pub percent: u8,
    /// The page dirtying rate this step allows: `100 - percent` percent of what the link
    /// carries (0 with `percent` 0: no limit).
    pub dirty_pages_per_second: u64,
}

/// A running guest being migrated away.
///
/// Dirty logging is global (as in Xen and KVM). Fetching a dirty log *consumes* it; when
/// sending what was fetched fails, the engine calls the matching `merge_*` so no dirty
/// bit is lost.
pub trait SourceGuest: Send + Sync {
    /// The guest's shape.
    fn layout(&self) -> GuestLayout;
    /// Starts (or restarts, clearing) memory dirty logging.
    fn start_dirty_log(&self) -> Result<(), GuestError>;
    /// Stops memory dirty logging.
    fn stop_dirty_log(&self);
    /// Fetch-and-clear of the dirty page log.
    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError>;
    /// Merges a fetched page log back after a failed send.
    fn merge_dirty_pages(&self, pages: &Bitmap);
    /// The guest's disks (`None`: it has none).
    fn storage(&self) -> Option<&dyn GuestStorage> {
        None
    }
    /// Starts (or restarts, clearing) block dirty tracking on every disk.
    fn start_block_log(&self) -> Result<(), GuestError> {
        if let Some(s) = self.storage() {
            s.start_block_log();
        }
        Ok(())
    }
    /// Stops block dirty tracking.
    fn stop_block_log(&self) {}
    /// Fetch-and-clear of disk `disk`'s dirty block log.
    fn fetch_dirty_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .fetch_dirty_blocks(disk)
    }
    /// Merges a fetched block log back after a failed send.
    fn merge_dirty_blocks(&self, disk: usize, blocks: &Bitmap) {
        if let Some(s) = self.storage() {
            s.merge_dirty_blocks(disk, blocks);
        }
    }
    /// Blocks of `disk` that may hold data (holes excluded, e.g. via `SEEK_DATA`).
    fn allocated_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .allocated_blocks(disk)
    }
    /// Copies page `index` into `buf` (`buf.len()` is the page size).
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError>;
    /// Copies block `index` of `disk` into `buf`.
    fn read_block(&self, disk: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .read_block(disk, index, buf)
    }
    /// Pauses the guest at a consistent point (vCPUs stopped, in-flight I/O completed).
    fn pause(&self) -> Result<(), GuestError>;
    /// Resumes a paused guest.
    fn resume(&self) -> Result<(), GuestError>;
    /// Saves vCPU and device state; the guest must be paused.
    fn save_state(&self) -> Result<StateBlob, GuestError>;
    /// Called once the destination owns the guest: the source never resumes after this.
    /// A backend with managed images marks its copies as the state the next generation
    /// starts from (a base for incremental migration back).
    fn handed_over(&self) {}
    /// Blocks of `disk` written since `generation` began, if this image's history covers
    /// that generation (same identity, complete record).
    fn written_since(&self, disk: usize, generation: u64) -> Option<Bitmap> {
        self.storage()?.written_since(disk, generation)
    }
    /// Limits the guest's disk writes to this many blocks per second over all disks
    /// (`None` lifts the limit): write throttling when storage pre-copy cannot converge.
    fn limit_disk_writes(&self, _blocks_per_second: Option<u64>) {}
    /// Memory auto-converge: slows the guest down (`percent` 0 lifts it). A backend that
    /// runs real vCPUs keeps them stopped `percent` of the time, as QEMU's cpu-throttle
    /// does; one that paces its own writes holds them to `dirty_pages_per_second`, as
    /// QEMU's dirty-limit does. False when the backend cannot throttle.
    fn throttle_vcpus(&self, _throttle: VcpuThrottle) -> bool {
        false
    }
}

/// Asks the source for an owed block (storage post-copy).
pub type PullFn = std::sync::Arc<dyn Fn(usize, u64) + Send + Sync>;

/// Asks the source for owed pages (memory post-copy): called from the thread that serves
/// the guest's page faults, so it must not wait for the pages.
pub type PullPagesFn = std::sync::Arc<dyn Fn(&[u64]) + Send + Sync>;

/// Memory post-copy: the guest's faults on pages that had not arrived yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultFigures {
    /// Faults on owed pages (each asked the source for its page).
    pub faults: u64,
    /// Fault to page installed, microseconds: median, 99th percentile and worst.
    pub latency_us: [f64; 3],
}

/// What the destination already holds for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Nothing usable: the disk is copied in full.
    None,
    /// An untouched copy of this image at this generation.
    Identity(ImageIdentity),
    /// An image of the right size whose history is unknown: compared block by block.
    Raw,
}

/// What the source decided for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskPlan {
    /// Full copy into a fresh (sparse, zero) image.
    Full,
    /// Only the blocks written since the base's generation: the base is kept.
    Incremental,
    /// Only the blocks whose digests differ from the base's: the base is kept.
    HashCompared,
}

/// A guest being received.
pub trait DestGuest: Send + Sync {
    /// The guest's shape (as built from the handshake).
    fn layout(&self) -> GuestLayout;
    /// Copies the current content of page `index` into `buf` (the base for delta codecs).
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError>;
    /// Writes page `index`.
    fn write_page(&self, index: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Makes page `index` all zero.
    fn zero_page(&self, index: u64) -> Result<(), GuestError>;
    /// The guest's disks (`None`: it has none).
    fn storage(&self) -> Option<&dyn GuestStorage> {
        None
    }
    /// Copies the current content of block `index` of `disk` into `buf`.
    fn read_block(&self, disk: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .read_block(disk, index, buf)
    }
    /// Blocks of `disk` that may hold data (holes excluded), for comparing a base.
    fn allocated_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .allocated_blocks(disk)
    }
    /// Writes block `index` of `disk`.
    fn write_block(&self, disk: usize, index: u64, data: &[u8]) -> Result<(), GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .write_block(disk, index, data)
    }
    /// Makes block `index` of `disk` all zero (keeping sparse files sparse).
    fn zero_block(&self, disk: usize, index: u64) -> Result<(), GuestError> {
        self.storage()
            .ok_or_else(|| no_disk(disk))?
            .zero_block(disk, index)
    }
    /// Makes every write durable.
    fn flush(&self) -> Result<(), GuestError>;
    /// Before `verified`: every received block on stable storage, and the disks' metadata
    /// recording what they hold, so a power loss after the hand-over loses nothing.
    fn make_durable(&self) -> Result<(), GuestError> {
        self.flush()?;
        self.storage().map_or(Ok(()), |s| s.record_received())
    }
    /// Pauses a resumed guest that must not run yet (held for an operator).
    fn hold(&self) -> Result<(), GuestError>;
    /// Storage post-copy: the owed blocks can no longer arrive.
    fn abandon_owed(&self) {
        if let Some(s) = self.storage() {
            s.abandon_owed();
        }
    }
    /// Storage post-copy: blocks still owed.
    fn owed_blocks(&self) -> u64 {
        self.storage().map_or(0, |s| s.owed_blocks())
    }
    /// Storage post-copy: the blocks of `disk` still owed (`None`: nothing owed).
    fn owed_bitmap(&self, disk: usize) -> Option<Bitmap> {
        self.storage().and_then(|s| s.owed_bitmap(disk))
    }
    /// Starts write-back of what was written so far without waiting for it, so dirty data
    /// does not pile up in memory during pre-copy. Without disks of Ferry's, a full flush.
    fn start_writeback(&self) -> Result<(), GuestError> {
        match self.storage() {
            Some(s) => s.start_writeback(),
            None => self.flush(),
        }
    }
    /// Restores vCPU and device state.
    fn restore_state(&self, state: &StateBlob) -> Result<(), GuestError>;
    /// Starts the guest running.
    fn resume(&self) -> Result<(), GuestError>;
    /// The guest's own check after resuming (blocks until done). Backends without an
    /// oracle return `None`.
    fn self_check(&self) -> Option<OracleReport> {
        None
    }
    /// Throws the received guest away (the source stays the owner).
    fn discard(&self);
    /// What this destination already holds for `disk` (announced in the handshake).
    fn base(&self, disk: usize) -> Base {
        self.storage().map_or(Base::None, |s| s.base(disk))
    }
    /// Storage post-copy: `owed` blocks of `disk` arrive after the guest resumed. A guest
    /// read of an owed block must call `pull(disk, block)` once and wait for the block; a
    /// guest write to an owed block wins over the late copy.
    fn set_owed(&self, disk: usize, owed: Bitmap, pull: PullFn) -> Result<(), GuestError> {
        match self.storage() {
            Some(s) => s.set_owed(disk, owed, pull),
            None => Err(GuestError::Unsupported("storage post-copy".into())),
        }
    }
    /// A late block arrived: written only if still owed (the guest may have written it
    /// meanwhile). Returns whether it was written.
    fn fill_owed(&self, disk: usize, index: u64, data: &[u8]) -> Result<bool, GuestError> {
        self.storage()
            .map_or(Ok(false), |s| s.fill_owed(disk, index, data))
    }
    /// Memory post-copy: `owed` pages arrive after the guest resumed. Until a page
    /// arrives, any access to it (the guest's, or the backend's own) waits, and the first
    /// one asks the source for it through `pull`. Called before `resume`.
    fn set_owed_pages(&self, _owed: Bitmap, _pull: PullPagesFn) -> Result<(), GuestError> {
        Err(GuestError::Unsupported(
            "memory post-copy (this backend cannot fault pages in)".into(),
        ))
    }
    /// Memory post-copy: an owed page arrived (`None`: all zero). Installed at once, whole,
    /// waking whoever waits for it; false when it was no longer owed.
    fn fill_owed_page(&self, index: u64, _data: Option<&[u8]>) -> Result<bool, GuestError> {
        Err(GuestError::OutOfRange {
            what: "owed page",
            index,
            limit: 0,
        })
    }
    /// Memory post-copy: pages still owed.
    fn owed_pages(&self) -> u64 {
        0
    }
    /// Memory post-copy: the pages still owed (`None`: nothing owed).
    fn owed_pages_bitmap(&self) -> Option<Bitmap> {
        None
    }
    /// Memory post-copy: the faults served so far.
    fn fault_figures(&self) -> Option<FaultFigures> {
        None
    }
    /// Prepares `disk` for the plan before any block arrives: `Full` starts from a fresh
    /// zero image; the others keep the base (which stops being a trusted base now).
    fn prepare_disk(&self, disk: usize, plan: DiskPlan) -> Result<(), GuestError> {
        self.storage().map_or(Ok(()), |s| s.prepare(disk, plan))
    }
}
