//! A guest's disks as one set: what every backend does with its images when a guest
//! starts, leaves, arrives or is thrown away, in one place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_core::bitmap::Bitmap;
use ferry_core::guest::{Base, DiskLayout, DiskPlan, GuestError, GuestStorage, PullFn};
use ferry_core::image::{sidecar_path, ImageIdentity, SidecarState};

use crate::image::DiskImage;

fn io(what: &str) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        what: what.to_string(),
        source,
    }
}

fn meta_err(what: String) -> impl FnOnce(ferry_core::image::SidecarError) -> GuestError {
    move |e| GuestError::Io {
        what,
        source: std::io::Error::other(ferry_core::engine::error_chain(&e)),
    }
}

/// An incoming disk's name must be a plain file name that is not Ferry's own metadata.
fn check_incoming_name(name: &str) -> Result<(), GuestError> {
    let plain =
        !name.is_empty() && !name.contains('/') && !name.contains('\0') && !name.starts_with('.');
    if !plain {
        return Err(GuestError::Unsupported(format!(
            "disk name {name:?} is not a plain file name"
        )));
    }
    if name.ends_with(".ferry") || name.ends_with(".ferry.tmp") {
        return Err(GuestError::Unsupported(format!(
            "disk name {name:?} is reserved for image metadata"
        )));
    }
    Ok(())
}

/// Settings of a disk a new guest starts with.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Image path (created sparse when missing).
    pub path: PathBuf,
    /// Block size.
    pub block_size: u32,
    /// Size in bytes (a positive multiple of the block size).
    pub size: u64,
    /// Share of a new image filled with pseudo-random data (0..=1).
    pub used: f64,
    /// Seed of that data.
    pub seed: u64,
}

/// The disks of one guest.
#[derive(Default)]
pub struct GuestDisks {
    /// Shared with a block back-end that serves them (see [`crate::kernel_nbd`]).
    disks: Vec<Arc<DiskImage>>,
    /// On a destination: per disk, the source image's identity and whether the image was
    /// created for this migration (a pre-existing one may be a base and is kept).
    incoming: Vec<(Option<ImageIdentity>, bool)>,
}

impl GuestDisks {
    /// Opens (or creates and pre-fills) the disks a new guest runs, marked in use.
    pub fn open_live(specs: &[DiskSpec]) -> Result<Self, GuestError> {
        let mut disks = Vec::new();
        for s in specs {
            let bs = u64::from(s.block_size);
            if s.size == 0 || !s.size.is_multiple_of(bs) {
                return Err(GuestError::Unsupported(format!(
                    "disk size {} is not a positive multiple of the block size {bs}",
                    s.size
                )));
            }
            let what = format!("opening disk image {}", s.path.display());
            let (disk, created) =
                DiskImage::open_or_create(&s.path, s.block_size, s.size / bs).map_err(io(&what))?;
            if created {
                let what = format!("filling disk image {}", s.path.display());
                crate::prefill_disk(&disk, s.used, s.seed).map_err(io(&what))?;
                // Generation 1 began with the empty image: the fill is written since.
                if let Ok(a) = disk.allocated() {
                    for b in a.iter_ones() {
                        disk.gen_log.set(b);
                    }
                }
            }
            disk.start_live().map_err(meta_err(format!(
                "writing metadata for {}",
                s.path.display()
            )))?;
            disks.push(Arc::new(disk));
        }
        Ok(Self {
            disks,
            incoming: Vec::new(),
        })
    }

    /// Opens or creates, in `dir`, the images an incoming guest of `layouts` needs. An
    /// image of the right size already there is kept: it may be a base for an incremental
    /// migration (the source decides; [`GuestDisks::prepare`] applies it).
    pub fn incoming(layouts: &[DiskLayout], dir: &Path) -> Result<Self, GuestError> {
        std::fs::create_dir_all(dir).map_err(io("creating the destination directory"))?;
        let mut disks = Vec::new();
        let mut incoming = Vec::new();
        for d in layouts {
            check_incoming_name(&d.name)?;
            let path = dir.join(&d.name);
            // Locked before anything is read or written: an image another guest or
            // migration uses is refused here, naming the file, and nothing is touched.
            let (disk, new) = DiskImage::open_incoming(&path, d.block_size, d.blocks)
                .map_err(io("opening a disk image for the incoming guest"))?;
            disks.push(Arc::new(disk));
            incoming.push((d.identity, new));
        }
        Ok(Self { disks, incoming })
    }

    /// Images opened by the caller, as they are (no metadata written).
    pub(crate) fn from_images(images: Vec<DiskImage>) -> Self {
        Self {
            disks: images.into_iter().map(Arc::new).collect(),
            incoming: Vec::new(),
        }
    }

    /// The images.
    pub fn images(&self) -> &[Arc<DiskImage>] {
        &self.disks
    }

    /// Disk `d`, or an out-of-range error.
    pub fn get(&self, d: usize) -> Result<&DiskImage, GuestError> {
        self.disks
            .get(d)
            .map(|i| &**i)
            .ok_or(GuestError::OutOfRange {
                what: "disk",
                index: d as u64,
                limit: self.disks.len() as u64,
            })
    }

    /// Image paths.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.disks.iter().map(|d| d.path().to_path_buf()).collect()
    }

    /// The layout of every disk, with its current identity.
    pub fn layouts(&self) -> Vec<DiskLayout> {
        self.disks
            .iter()
            .map(|d| DiskLayout {
                name: d
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "disk0.img".into()),
                block_size: d.block_size(),
                blocks: d.blocks(),
                identity: Some(d.identity()),
            })
            .collect()
    }

    /// The destination owns the guest now: the copies left here become the base the next
    /// generation starts from.
    pub fn hand_over(&self) {
        for d in &self.disks {
            if let Err(e) = d.hand_over() {
                tracing::warn!("{}", ferry_core::engine::error_chain(&e));
            }
        }
    }

    /// The guest stopped cleanly: the images' histories are closed (trusted later).
    pub fn close(&self) {
        for d in &self.disks {
            if let Err(e) = d.persist(SidecarState::Closed) {
                tracing::warn!("{}", ferry_core::engine::error_chain(&e));
            }
        }
    }

    /// Makes every write durable; once the guest runs here (`live`), also records the
    /// images' new identity (kept out of the downtime).
    pub fn flush(&self, live: bool) -> Result<(), GuestError> {
        for d in &self.disks {
            d.flush().map_err(io("flushing a disk image"))?;
        }
        if live {
            for d in &self.disks {
                d.persist(SidecarState::Open)
                    .map_err(meta_err("writing image metadata".into()))?;
            }
        }
        Ok(())
    }

    /// The received guest starts here: its images continue the source's, one generation
    /// on.
    pub fn adopt_incoming(&self) -> Result<(), GuestError> {
        for (d, (id, _)) in self.disks.iter().zip(&self.incoming) {
            if let Some(id) = id {
                d.adopt(*id)
                    .map_err(meta_err("writing image metadata".into()))?;
            }
        }
        Ok(())
    }

    /// The received guest is thrown away: images created for it go; a pre-existing one (a
    /// base) stays, its metadata already removed by [`GuestDisks::prepare`], so it is never
    /// trusted.
    pub fn discard(&self) {
        for (i, d) in self.disks.iter().enumerate() {
            // Removed while still locked, so nobody can take the file up in between.
            let created = self.incoming.get(i).is_none_or(|(_, c)| *c);
            if created {
                let _ = std::fs::remove_file(d.path());
                let _ = std::fs::remove_file(sidecar_path(d.path()));
            }
            d.retire();
        }
    }
}

impl GuestStorage for GuestDisks {
    /// Starts (restarts, clearing) block dirty tracking on every disk.
    fn start_block_log(&self) {
        for d in &self.disks {
            d.log.clear();
        }
    }

    /// Fetch-and-clear of disk `d`'s block log.
    fn fetch_dirty_blocks(&self, d: usize) -> Result<Bitmap, GuestError> {
        Ok(self.get(d)?.log.take())
    }

    /// Merges a fetched block log back.
    fn merge_dirty_blocks(&self, d: usize, blocks: &Bitmap) {
        if let Ok(d) = self.get(d) {
            d.log.merge(blocks);
        }
    }

    /// Blocks of disk `d` that may hold data.
    fn allocated_blocks(&self, d: usize) -> Result<Bitmap, GuestError> {
        self.get(d)?
            .allocated()
            .map_err(io("finding allocated blocks"))
    }

    /// Reads block `index` of disk `d` (an owed block is pulled first).
    fn read_block(&self, d: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.get(d)?.read(index, buf).map_err(io("reading a block"))
    }

    /// Blocks of disk `d` written since `generation` began, if known.
    fn written_since(&self, d: usize, generation: u64) -> Option<Bitmap> {
        self.disks.get(d)?.written_since(generation)
    }

    /// Writes block `index` of disk `d` (from the migration, not the guest).
    fn write_block(&self, d: usize, index: u64, data: &[u8]) -> Result<(), GuestError> {
        self.get(d)?
            .write(index, data)
            .map_err(io("writing a block"))
    }

    /// Zeroes block `index` of disk `d`, keeping the image sparse.
    fn zero_block(&self, d: usize, index: u64) -> Result<(), GuestError> {
        self.get(d)?.zero(index).map_err(io("zeroing a block"))
    }

    /// Starts write-back without waiting for it.
    fn start_writeback(&self) -> Result<(), GuestError> {
        for d in &self.disks {
            d.start_writeback().map_err(io("starting write-back"))?;
        }
        Ok(())
    }

    /// What this destination holds for disk `d`.
    fn base(&self, d: usize) -> Base {
        self.disks.get(d).map_or(Base::None, |i| i.base())
    }

    /// Storage post-copy: `owed` blocks of disk `d` arrive later.
    fn set_owed(&self, d: usize, owed: Bitmap, pull: PullFn) -> Result<(), GuestError> {
        self.get(d)?.set_owed(d, owed, pull);
        Ok(())
    }

    /// A late block arrived; written only if still owed.
    fn fill_owed(&self, d: usize, index: u64, data: &[u8]) -> Result<bool, GuestError> {
        self.get(d)?
            .fill_owed(index, data)
            .map_err(io("writing a late block"))
    }

    /// Prepares disk `d` for the plan before any block arrives.
    fn prepare(&self, d: usize, plan: DiskPlan) -> Result<(), GuestError> {
        self.get(d)?
            .prepare(plan)
            .map_err(io("preparing a disk image"))
    }

    /// Once the data is durable ([`DestGuest::flush`] first), each image's metadata names
    /// the image it now continues (an `open` sidecar: its history is trusted only after a
    /// clean stop).
    ///
    /// [`DestGuest::flush`]: ferry_core::DestGuest::flush
    fn record_received(&self) -> Result<(), GuestError> {
        self.adopt_incoming()?;
        for d in &self.disks {
            d.persist(SidecarState::Open)
                .map_err(meta_err("writing image metadata".into()))?;
        }
        Ok(())
    }

    fn abandon_owed(&self) {
        for d in &self.disks {
            d.abandon_owed();
        }
    }

    fn owed_blocks(&self) -> u64 {
        self.disks.iter().map(|d| d.owed_count()).sum()
    }

    fn owed_bitmap(&self, d: usize) -> Option<Bitmap> {
        self.disks.get(d)?.owed_bits()
    }
}
