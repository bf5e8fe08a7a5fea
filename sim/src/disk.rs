//! A raw, sparse disk image file with a dirty-block log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ferry_core::bitmap::{Bitmap, DirtyBitmap};

/// One disk image.
pub struct SimDisk {
    file: File,
    path: PathBuf,
    block_size: u32,
    blocks: u64,
    /// Blocks written since block logging (re)started.
    pub log: DirtyBitmap,
}

impl SimDisk {
    /// Opens `path`, creating it sparse with `blocks` blocks when missing; an existing
    /// image must have exactly that size.
    pub fn open_or_create(
        path: &Path,
        block_size: u32,
        blocks: u64,
    ) -> std::io::Result<(Self, bool)> {
        let size = blocks * u64::from(block_size);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
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
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                block_size,
                blocks,
                log: DirtyBitmap::new(blocks),
            },
            created,
        ))
    }

    /// Creates `path` fresh (replacing an existing file), sparse.
    pub fn create_fresh(path: &Path, block_size: u32, blocks: u64) -> std::io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        Ok(Self::open_or_create(path, block_size, blocks)?.0)
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

    /// Reads block `index`.
    pub fn read(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, self.offset(index)?)
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

    /// Bytes actually allocated on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}
