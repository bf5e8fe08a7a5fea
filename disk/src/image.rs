//! A raw, sparse disk image file with a dirty-block log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use ferry_core::bitmap::{Bitmap, DirtyBitmap};
use ferry_core::guest::{Base, DiskPlan};
use ferry_core::image::{sidecar_path, ImageIdentity, Seal, Sidecar, SidecarState, SidecarStatus};

/// One disk image.
pub struct DiskImage {
    file: File,
    path: PathBuf,
    block_size: u32,
    blocks: u64,
    /// Blocks written since block logging (re)started (for the migration in progress).
    pub log: DirtyBitmap,
    /// Blocks the guest wrote since this process opened the image (for the generation).
    pub gen_log: DirtyBitmap,
    meta: Mutex<DiskMeta>,
    /// Storage post-copy: blocks still owed by the source, and how to ask for them.
    owed: Mutex<Option<Owed>>,
    owed_cond: std::sync::Condvar,
}

/// Blocks a post-copy destination still waits for.
struct Owed {
    disk: usize,
    /// The source can no longer send them: reads fail at once.
    abandoned: bool,
    bits: Bitmap,
    requested: Bitmap,
    pull: ferry_core::guest::PullFn,
}

/// How long a guest read waits for an owed block before it fails like a broken disk.
const OWED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The image's generation bookkeeping.
#[derive(Debug, Clone)]
struct DiskMeta {
    identity: ImageIdentity,
    /// Whether `written` plus `gen_log` is every block written since the generation began.
    complete: bool,
    /// Blocks written since the generation began, before this process opened the image.
    written: Bitmap,
    /// What this image can serve as when a migration arrives here.
    base: Base,
    /// Set when the image stopped changing here for good (handed over or discarded).
    retired: bool,
}

fn new_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    ferry_core::engine::fill_random(&mut id);
    id
}

impl DiskImage {
    /// Opens `path`, creating it sparse with `blocks` blocks when missing; an existing
    /// image must have exactly that size. Takes an exclusive lock on it for as long as
    /// this value lives (until [`DiskImage::retire`] or a hand-over), so no other process
    /// serves, receives into or compares against an image in use. Reads its sidecar: a
    /// valid, closed one whose seal still matches the file continues the image's
    /// generation; an open one (a crash), a corrupt one, a stale seal or none leaves the
    /// history incomplete (no incremental migration from it). Returns whether the file
    /// was created.
    pub fn open_or_create(
        path: &Path,
        block_size: u32,
        blocks: u64,
    ) -> std::io::Result<(Self, bool)> {
        Self::open_with(path, block_size, blocks, true)
    }

    /// As [`DiskImage::open_or_create`], for an image a migration arrives into: a
    /// symbolic link is refused rather than followed (out of the destination directory),
    /// and so is an existing file of another size (it is not ours to replace).
    pub fn open_incoming(
        path: &Path,
        block_size: u32,
        blocks: u64,
    ) -> std::io::Result<(Self, bool)> {
        Self::open_with(path, block_size, blocks, false)
    }

    fn open_with(
        path: &Path,
        block_size: u32,
        blocks: u64,
        follow: bool,
    ) -> std::io::Result<(Self, bool)> {
        use std::os::unix::fs::OpenOptionsExt;
        let size = blocks * u64::from(block_size);
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        if !follow {
            opts.custom_flags(libc::O_NOFOLLOW);
        }
        let created = !path.exists();
        let file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} is a symbolic link; refused", path.display()),
                )
            } else {
                e
            }
        })?;
        lock_exclusive(&file, path)?;
        if created {
            file.set_len(size)?;
        } else {
            let have = file.metadata()?.len();
            if have != size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} is {have} bytes, expected {size}", path.display()),
                ));
            }
        }
        // A pre-existing image whose history is not trusted can still be compared block
        // by block with a source's image (hash-compared copy).
        let untrusted = if created { Base::None } else { Base::Raw };
        let fresh = |complete| DiskMeta {
            identity: ImageIdentity {
                id: new_id(),
                generation: 1,
            },
            complete,
            written: Bitmap::new(blocks),
            base: untrusted,
            retired: false,
        };
        let status = match Sidecar::load(path, block_size, blocks) {
            SidecarStatus::Valid(sc) if sc.state != SidecarState::Open => {
                match check_seal(&file, &sc, block_size, blocks) {
                    Ok(()) => SidecarStatus::Valid(sc),
                    Err(why) => SidecarStatus::Corrupt(why),
                }
            }
            other => other,
        };
        let meta = match status {
            SidecarStatus::Missing => fresh(created),
            SidecarStatus::Valid(sc) => match sc.state {
                SidecarState::Closed => DiskMeta {
                    identity: sc.identity,
                    complete: true,
                    written: sc.written,
                    base: untrusted,
                    retired: false,
                },
                SidecarState::Base => DiskMeta {
                    identity: sc.identity,
                    complete: true,
                    written: Bitmap::new(blocks),
                    base: Base::Identity(sc.identity),
                    retired: false,
                },
                SidecarState::Open => {
                    tracing::warn!(
                        "{}: the image was not closed cleanly; its write history is incomplete",
                        path.display()
                    );
                    DiskMeta {
                        identity: sc.identity,
                        complete: false,
                        written: Bitmap::new(blocks),
                        base: untrusted,
                        retired: false,
                    }
                }
            },
            SidecarStatus::Corrupt(why) => {
                tracing::warn!(
                    "{}: ignoring its metadata ({why}); treating every block as written",
                    sidecar_path(path).display()
                );
                fresh(false)
            }
        };
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                block_size,
                blocks,
                log: DirtyBitmap::new(blocks),
                gen_log: DirtyBitmap::new(blocks),
                meta: Mutex::new(meta),
                owed: Mutex::new(None),
                owed_cond: std::sync::Condvar::new(),
            },
            created,
        ))
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, DiskMeta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image's identity and generation.
    pub fn identity(&self) -> ImageIdentity {
        self.meta().identity
    }

    /// What this image offers as a base to an incoming migration.
    pub fn base(&self) -> Base {
        self.meta().base
    }

    /// Whether the write history since the generation began is complete.
    pub fn history_complete(&self) -> bool {
        self.meta().complete
    }

    /// Blocks written since `generation` began, if the history covers it.
    pub fn written_since(&self, generation: u64) -> Option<Bitmap> {
        let m = self.meta();
        if !m.complete || m.identity.generation != generation {
            return None;
        }
        let mut w = m.written.clone();
        w.merge(&self.gen_log.peek());
        Some(w)
    }

    /// Writes the sidecar: `Open` while a guest uses the image, `Closed` at a clean stop.
    /// An incomplete history is always written `Open`: it must never be trusted later.
    pub fn persist(&self, state: SidecarState) -> Result<(), ferry_core::image::SidecarError> {
        let m = self.meta();
        if m.retired {
            return Ok(());
        }
        let mut written = m.written.clone();
        written.merge(&self.gen_log.peek());
        let state = if m.complete {
            state
        } else {
            SidecarState::Open
        };
        let seal = match state {
            SidecarState::Open => None,
            _ => Some(self.seal(&m.identity)?),
        };
        Sidecar {
            state,
            identity: m.identity,
            block_size: self.block_size,
            written,
            seal,
        }
        .store(&self.path)
    }

    /// The image's seal now (after its last write), for a closed or base sidecar.
    fn seal(&self, id: &ImageIdentity) -> Result<Seal, ferry_core::image::SidecarError> {
        Seal::of(&self.file, &id.id, self.block_size, self.blocks)
            .map_err(|e| ferry_core::image::SidecarError::new(&self.path, e))
    }

    /// The guest moved away: this copy is now the state the next generation starts from.
    pub fn hand_over(&self) -> Result<(), ferry_core::image::SidecarError> {
        let mut m = self.meta();
        if m.retired {
            return Ok(());
        }
        m.identity.generation += 1;
        m.written = Bitmap::new(self.blocks);
        m.complete = true;
        m.retired = true;
        let seal = self.seal(&m.identity)?;
        let r = Sidecar {
            state: SidecarState::Base,
            identity: m.identity,
            block_size: self.block_size,
            written: m.written.clone(),
            seal: Some(seal),
        }
        .store(&self.path);
        // This process serves the image no more: the next holder may take it as a base.
        unlock(&self.file);
        r
    }

    /// A migration arrived here: this image now continues `source`'s image in the
    /// generation after `source.generation`, with nothing written yet. Recorded in memory
    /// only: until the next [`DiskImage::persist`] the image has no sidecar (removed by
    /// [`DiskImage::prepare`]), so a crash leaves it untrusted, never wrongly trusted.
    pub fn adopt(&self, source: ImageIdentity) -> Result<(), ferry_core::image::SidecarError> {
        {
            let mut m = self.meta();
            m.identity = ImageIdentity {
                id: source.id,
                generation: source.generation + 1,
            };
            m.written = Bitmap::new(self.blocks);
            m.complete = true;
            m.base = Base::None;
            m.retired = false;
        }
        self.gen_log.clear();
        Ok(())
    }

    /// Prepares for an incoming migration: `Full` empties the image (sparse zeros); the
    /// other plans keep the content, which stops being a trusted base now.
    pub fn prepare(&self, plan: DiskPlan) -> std::io::Result<()> {
        match std::fs::remove_file(sidecar_path(&self.path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        {
            // Until the migration completes the content is neither the base nor the
            // source's: never trust it (an interrupted receive leaves an open sidecar).
            let mut m = self.meta();
            m.base = Base::None;
            m.complete = false;
        }
        if plan == DiskPlan::Full {
            let size = self.blocks * u64::from(self.block_size);
            self.file.set_len(0)?;
            self.file.set_len(size)?;
        }
        Ok(())
    }

    /// The image stops being managed here (discarded): no sidecar is written any more,
    /// and the lock is released.
    pub fn retire(&self) {
        self.meta().retired = true;
        unlock(&self.file);
    }

    /// A guest is about to run this image: a base left by a hand-over forks a new
    /// identity (it diverges from the copy that moved on), and the sidecar is marked open.
    pub fn start_live(&self) -> Result<(), ferry_core::image::SidecarError> {
        {
            let mut m = self.meta();
            if m.base != Base::None {
                tracing::warn!(
                    "{}: running a copy that was handed over; it gets a new identity",
                    self.path.display()
                );
                m.identity = ImageIdentity {
                    id: new_id(),
                    generation: 1,
                };
                m.base = Base::None;
                m.written = Bitmap::new(self.blocks);
                m.complete = true;
            }
        }
        self.persist(SidecarState::Open)
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Block count.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn offset(&self, index: u64) -> std::io::Result<u64> {
        if index >= self.blocks {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("block {index} out of range ({})", self.blocks),
            ));
        }
        Ok(index * u64::from(self.block_size))
    }

    /// Reads block `index`; an owed block is pulled from the source first.
    pub fn read(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = self.offset(index)?;
        self.wait_owed(index)?;
        self.file.read_exact_at(buf, off)
    }

    fn owed_lock(&self) -> std::sync::MutexGuard<'_, Option<Owed>> {
        self.owed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until block `index` is no longer owed, asking the source for it once.
    fn wait_owed(&self, index: u64) -> std::io::Result<()> {
        let mut g = self.owed_lock();
        let deadline = std::time::Instant::now() + OWED_WAIT;
        loop {
            let Some(o) = g.as_mut() else { return Ok(()) };
            if !o.bits.get(index) {
                return Ok(());
            }
            if o.abandoned {
                return Err(std::io::Error::other(format!(
                    "block {index} is owed by a source that is gone"
                )));
            }
            if !o.requested.get(index) {
                o.requested.set(index);
                (o.pull)(o.disk, index);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("block {index} never arrived from the source"),
                ));
            }
            g = self
                .owed_cond
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Marks `owed` blocks as still to come from the source.
    pub fn set_owed(&self, disk: usize, owed: Bitmap, pull: ferry_core::guest::PullFn) {
        let requested = Bitmap::new(owed.len());
        *self.owed_lock() = Some(Owed {
            disk,
            abandoned: false,
            bits: owed,
            requested,
            pull,
        });
    }

    /// Writes a late block only if it is still owed; returns whether it was written.
    pub fn fill_owed(&self, index: u64, data: &[u8]) -> std::io::Result<bool> {
        let off = self.offset(index)?;
        let mut g = self.owed_lock();
        let Some(o) = g.as_mut() else {
            return Ok(false);
        };
        if !o.bits.get(index) {
            return Ok(false);
        }
        // Written under the lock, so a guest write (which clears the bit first) can never
        // be overwritten by the late copy.
        self.file.write_all_at(data, off)?;
        o.bits.clear(index);
        if o.bits.none() {
            *g = None;
        }
        self.owed_cond.notify_all();
        Ok(true)
    }

    /// The owed blocks can no longer arrive: waiting reads fail now, later ones at once.
    pub fn abandon_owed(&self) {
        if let Some(o) = self.owed_lock().as_mut() {
            o.abandoned = true;
        }
        self.owed_cond.notify_all();
    }

    /// The blocks still owed, if any.
    pub fn owed_bits(&self) -> Option<Bitmap> {
        self.owed_lock().as_ref().map(|o| o.bits.clone())
    }

    /// Blocks still owed.
    pub fn owed_count(&self) -> u64 {
        self.owed_lock().as_ref().map_or(0, |o| o.bits.count())
    }

    /// A guest write: logged for the migration in progress and for the generation, and
    /// it wins over an owed block's late copy.
    pub fn guest_write(&self, index: u64, data: &[u8]) -> std::io::Result<()> {
        {
            let mut g = self.owed_lock();
            if let Some(o) = g.as_mut() {
                if o.bits.get(index) {
                    o.bits.clear(index);
                    self.owed_cond.notify_all();
                }
            }
        }
        self.write(index, data)?;
        self.log.set(index);
        self.gen_log.set(index);
        Ok(())
    }

    /// Reads `buf.len()` bytes at the start of block `index`.
    pub fn read_head(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read(index, buf)
    }

    /// Writes block `index` (not logged: the caller decides whether a write is the guest's).
    pub fn write(&self, index: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.offset(index)?)
    }

    /// Makes block `index` zero by punching a hole (keeps the image sparse).
    pub fn zero(&self, index: u64) -> std::io::Result<()> {
        let off = self.offset(index)?;
        // SAFETY: plain fallocate(2) on an fd we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                libc::off_t::from(self.block_size as i32),
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Filesystems without hole punching: write zeros.
        self.file
            .write_all_at(&vec![0u8; self.block_size as usize], off)
    }

    /// Blocks that may hold data: everything `SEEK_DATA` reports, block-aligned.
    pub fn allocated(&self) -> std::io::Result<Bitmap> {
        let mut map = Bitmap::new(self.blocks);
        let size = self.blocks * u64::from(self.block_size);
        let fd = self.file.as_raw_fd();
        let bs = u64::from(self.block_size);
        let mut pos: u64 = 0;
        while pos < size {
            // SAFETY: lseek(2) on an fd we own.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no more data
                }
                // No SEEK_DATA support: everything may hold data.
                return Ok(Bitmap::full(self.blocks));
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { size as i64 } else { hole };
            let (start, end) = (
                data as u64 / bs,
                (hole as u64).div_ceil(bs).min(self.blocks),
            );
            for b in start..end {
                map.set(b);
            }
            pos = hole as u64;
        }
        Ok(map)
    }

    /// fsync.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Starts write-back of every dirty page of the image without waiting for it.
    pub fn start_writeback(&self) -> std::io::Result<()> {
        // SAFETY: sync_file_range(2) on an fd we own; offset 0 and length 0 mean the
        // whole file; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Bytes actually allocated on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

/// Takes the exclusive lock that says "this image is in use", without waiting.
fn lock_exclusive(file: &File, path: &Path) -> std::io::Result<()> {
    // SAFETY: flock(2) on an fd we own; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            format!(
                "{} is in use by another guest or migration (locked)",
                path.display()
            ),
        ));
    }
    Err(e)
}

/// Releases the lock (the image is no longer served by this process).
fn unlock(file: &File) {
    // SAFETY: flock(2) on an fd we own; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Whether a closed or base sidecar still describes the file: the seal it recorded must
/// match the file as it is now.
fn check_seal(file: &File, sc: &Sidecar, block_size: u32, blocks: u64) -> Result<(), String> {
    let Some(recorded) = sc.seal else {
        return Err("no seal of the image".into());
    };
    let now = Seal::of(file, &sc.identity.id, block_size, blocks)
        .map_err(|e| format!("cannot read the image to check its seal: {e}"))?;
    match recorded.mismatch(&now) {
        None => Ok(()),
        Some(why) => Err(format!(
            "the image changed since its metadata was written ({why})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn owed_blocks_are_pulled_on_read_and_guest_writes_win() {
        let dir = std::env::temp_dir().join(format!("ferry-owed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        let _ = std::fs::remove_file(&path);
        let (disk, _) = DiskImage::open_or_create(&path, 4096, 8).unwrap();
        let disk = Arc::new(disk);
        let pulls = Arc::new(AtomicU64::new(0));
        let mut owed = Bitmap::new(8);
        owed.set(2);
        owed.set(5);
        let (p, d2) = (Arc::clone(&pulls), Arc::clone(&disk));
        // The "source" answers a pull by delivering the block from another thread.
        disk.set_owed(
            0,
            owed,
            Arc::new(move |_, b| {
                p.fetch_add(1, Ordering::SeqCst);
                let d = Arc::clone(&d2);
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    d.fill_owed(b, &[b as u8 + 100; 4096]).unwrap();
                });
            }),
        );
        // A read of an owed block waits for the source's copy.
        let mut buf = [0u8; 4096];
        disk.read(2, &mut buf).unwrap();
        assert_eq!(buf[0], 102);
        assert_eq!(pulls.load(Ordering::SeqCst), 1);
        // A read of a block that is not owed pulls nothing.
        disk.read(3, &mut buf).unwrap();
        assert_eq!(pulls.load(Ordering::SeqCst), 1);
        // The guest writes block 5 first: the late copy must not overwrite it.
        disk.guest_write(5, &[7; 4096]).unwrap();
        assert!(!disk.fill_owed(5, &[105; 4096]).unwrap());
        disk.read(5, &mut buf).unwrap();
        assert_eq!(buf[0], 7);
        assert_eq!(disk.owed_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn scratch(tag: &str) -> PathBuf {
        let mut id = [0u8; 8];
        ferry_core::engine::fill_random(&mut id);
        let dir =
            std::env::temp_dir().join(format!("ferry-{tag}-{}", ferry_core::report::hex(&id)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_image_in_use_is_locked_until_retired() {
        let dir = scratch("lock");
        let path = dir.join("d.img");
        let (a, created) = DiskImage::open_or_create(&path, 4096, 16).unwrap();
        assert!(created);
        let e = DiskImage::open_or_create(&path, 4096, 16)
            .err()
            .expect("locked");
        assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy);
        assert!(e.to_string().contains("d.img"), "{e}");
        let e = DiskImage::open_incoming(&path, 4096, 16)
            .err()
            .expect("locked");
        assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy);
        a.retire();
        let (_b, created) = DiskImage::open_incoming(&path, 4096, 16).unwrap();
        assert!(!created);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn incoming_images_never_follow_symlinks_or_replace_other_sizes() {
        let dir = scratch("nofollow");
        let outside = dir.join("outside.img");
        std::fs::write(&outside, vec![7u8; 4096 * 4]).unwrap();
        let link = dir.join("link.img");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let e = DiskImage::open_incoming(&link, 4096, 4)
            .err()
            .expect("symlink");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = DiskImage::open_incoming(&outside, 4096, 8)
            .err()
            .expect("size");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read(&outside).unwrap(), vec![7u8; 4096 * 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_closed_or_base_history_is_trusted_only_while_its_seal_matches() {
        let dir = scratch("seal");
        let path = dir.join("d.img");
        let close = |content: u8| {
            let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
            d.guest_write(3, &[content; 4096]).unwrap();
            d.persist(SidecarState::Closed).unwrap();
            d.identity()
        };
        // Untouched: the history continues.
        let id = close(1);
        let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
        assert!(d.history_complete());
        assert_eq!(d.identity(), id);
        assert!(d.written_since(id.generation).unwrap().get(3));
        drop(d);

        // Changed behind Ferry's back (same size, one block): not trusted any more.
        close(2);
        {
            use std::os::unix::fs::FileExt;
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[9u8; 4096], 40 * 4096).unwrap();
        }
        let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
        assert!(
            !d.history_complete(),
            "a modified image must not be trusted"
        );
        assert_eq!(d.base(), Base::Raw);
        drop(d);

        // A base left by a hand-over, then replaced by a copy (another inode).
        let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
        d.start_live().unwrap();
        d.hand_over().unwrap();
        let base_id = d.identity();
        drop(d);
        let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
        assert_eq!(d.base(), Base::Identity(base_id));
        drop(d);
        let copy = dir.join("copy.img");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::rename(&copy, &path).unwrap();
        let (d, _) = DiskImage::open_or_create(&path, 4096, 64).unwrap();
        assert_eq!(d.base(), Base::Raw, "a copy of a base is not the base");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
