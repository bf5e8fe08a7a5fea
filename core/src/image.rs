//! Disk image identity and generations: the sidecar file `<image>.ferry`.
//!
//! A generation `g` of image `id` names a disk state: the content at the moment generation
//! `g` began. The sidecar records the blocks written since then. A holder of an untouched
//! copy of that state can announce `(id, g)`, and a source whose current generation is `g`
//! sends only the blocks written since (incremental migration back).
//!
//! In the envelope of [`crate::envelope`] (magic `FERRYIMG`, version 3), the body:
//!
//! ```text
//! state:u8 (0 closed, 1 open, 2 base) id:[16] generation:u64 block_size:u32 blocks:u64
//! sealed:u8 size:u64 mtime_s:i64 mtime_ns:u32 inode:u64 sample:[32]
//! written-since-generation bitmap (ceil(blocks/64) u64 words)
//! ```
//!
//! A `closed` or `base` sidecar carries a *seal* of the image as it was when the sidecar
//! was written: its size, modification time, inode and a BLAKE3 digest of sampled blocks.
//! An image whose seal no longer matches was changed behind Ferry's back (copied, edited,
//! restored from a backup) and its history is not trusted.
//!
//! The file is replaced crash-safely (write a temporary file, fsync, rename, fsync the
//! directory). `state` is `open` while a guest writes the image, so a crash leaves a
//! sidecar whose bitmap is known to be incomplete; an open, torn or corrupt sidecar is
//! never trusted for incremental migration.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bitmap::Bitmap;

const MAGIC: &[u8; 8] = b"FERRYIMG";
/// Sidecar format version.
pub const VERSION: u32 = 3;
/// The body's fixed part (the envelope's magic, version, length and CRC are around it).
const HEAD: usize = 1 + 16 + 8 + 4 + 8 + SEAL_LEN;
const SEAL_LEN: usize = 1 + 8 + 8 + 4 + 8 + 32;
/// Blocks read for a seal's sampled digest (the first, the last, and evenly spread ones).
const SEAL_SAMPLES: u64 = 64;

/// What an image file looked like when its sidecar was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// File size in bytes.
    pub size: u64,
    /// Modification time: seconds since the epoch.
    pub mtime_s: i64,
    /// Modification time: nanoseconds.
    pub mtime_ns: u32,
    /// Inode number (a copy of the file is another file).
    pub inode: u64,
    /// BLAKE3 of sampled blocks, keyed by the image id so samples differ per image.
    pub sample: [u8; 32],
}

impl Seal {
    /// Seals `file`, an image of `blocks` blocks of `block_size` with identity `id`.
    pub fn of(file: &File, id: &[u8; 16], block_size: u32, blocks: u64) -> std::io::Result<Seal> {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let m = file.metadata()?;
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(id);
        key[16..].copy_from_slice(b"ferry image seal");
        let mut h = blake3::Hasher::new_keyed(&key);
        let mut buf = vec![0u8; block_size as usize];
        let n = SEAL_SAMPLES.min(blocks);
        // Spread the samples evenly, starting at an offset the id chooses, so a guest
        // cannot know which blocks a seal reads; the first and last block always count.
        let start = u64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]);
        let step = (blocks / n.max(1)).max(1);
        let mut picks: Vec<u64> = (0..n)
            .map(|i| (i * step + start % step) % blocks.max(1))
            .collect();
        picks.push(0);
        picks.push(blocks.saturating_sub(1));
        picks.sort_unstable();
        picks.dedup();
        for b in picks.into_iter().filter(|b| *b < blocks) {
            file.read_exact_at(&mut buf, b * u64::from(block_size))?;
            h.update(&b.to_le_bytes());
            h.update(&buf);
        }
        Ok(Seal {
            size: m.len(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec().clamp(0, 999_999_999) as u32,
            inode: m.ino(),
            sample: *h.finalize().as_bytes(),
        })
    }

    /// What differs between this seal (recorded) and `now` (the file today), if anything.
    pub fn mismatch(&self, now: &Seal) -> Option<&'static str> {
        if self.size != now.size {
            Some("its size changed")
        } else if self.inode != now.inode {
            Some("it is another file (a copy or a replacement)")
        } else if (self.mtime_s, self.mtime_ns) != (now.mtime_s, now.mtime_ns) {
            Some("it was modified")
        } else if self.sample != now.sample {
            Some("its content changed")
        } else {
            None
        }
    }
}

/// An image's identity at a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageIdentity {
    /// Random id given when the image was first managed.
    pub id: [u8; 16],
    /// Current generation.
    pub generation: u64,
}

/// What the image is, and whether its bitmap may be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarState {
    /// A live image stopped cleanly: the bitmap is complete.
    Closed,
    /// A guest was writing the image: the bitmap may miss writes.
    Open,
    /// A copy left behind by a hand-over: exactly the state the generation began with.
    /// It is a base for incremental migration back; running it forks a new identity.
    Base,
}

/// The decoded sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// Open or closed.
    pub state: SidecarState,
    /// Identity and generation.
    pub identity: ImageIdentity,
    /// Block size.
    pub block_size: u32,
    /// Blocks written since the generation began.
    pub written: Bitmap,
    /// The image as it was when a `closed` or `base` sidecar was written.
    pub seal: Option<Seal>,
}

/// What was found next to an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SidecarStatus {
    /// No sidecar.
    Missing,
    /// A valid sidecar.
    Valid(Sidecar),
    /// Unreadable, torn, corrupt or for another geometry: not trusted.
    Corrupt(String),
}

/// A sidecar error on write.
#[derive(Debug, thiserror::Error)]
#[error("writing image metadata {path}")]
pub struct SidecarError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl SidecarError {
    /// An error writing the metadata of `image`.
    pub fn new(image: &Path, source: std::io::Error) -> Self {
        Self {
            path: sidecar_path(image),
            source,
        }
    }
}

/// The sidecar path of an image.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".ferry");
    PathBuf::from(p)
}

impl Sidecar {
    /// Encodes the sidecar.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEAD + self.written.words().len() * 8);
        b.push(match self.state {
            SidecarState::Closed => 0,
            SidecarState::Open => 1,
            SidecarState::Base => 2,
        });
        b.extend_from_slice(&self.identity.id);
        b.extend_from_slice(&self.identity.generation.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.written.len().to_le_bytes());
        let seal = self.seal.unwrap_or(Seal {
            size: 0,
            mtime_s: 0,
            mtime_ns: 0,
            inode: 0,
            sample: [0; 32],
        });
        b.push(u8::from(self.seal.is_some()));
        b.extend_from_slice(&seal.size.to_le_bytes());
        b.extend_from_slice(&seal.mtime_s.to_le_bytes());
        b.extend_from_slice(&seal.mtime_ns.to_le_bytes());
        b.extend_from_slice(&seal.inode.to_le_bytes());
        b.extend_from_slice(&seal.sample);
        for w in self.written.words() {
            b.extend_from_slice(&w.to_le_bytes());
        }
        crate::envelope::seal(MAGIC, VERSION, &b)
    }

    /// Decodes and checks a sidecar for an image of `blocks` blocks of `block_size`.
    pub fn decode(bytes: &[u8], block_size: u32, blocks: u64) -> Result<Sidecar, String> {
        let body =
            crate::envelope::open("sidecar", MAGIC, VERSION, bytes).map_err(|e| e.to_string())?;
        if body.len() < HEAD {
            return Err(format!("{} bytes: truncated", bytes.len()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let state = match body[0] {
            0 => SidecarState::Closed,
            1 => SidecarState::Open,
            2 => SidecarState::Base,
            s => return Err(format!("unknown state {s}")),
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&body[1..17]);
        let generation = u64_at(17);
        let bs = u32_at(25);
        let n = u64_at(29);
        if bs != block_size || n != blocks {
            return Err(format!(
                "describes {n} blocks of {bs} bytes, the image has {blocks} of {block_size}"
            ));
        }
        let seal = match body[37] {
            0 => None,
            1 => {
                let mut sample = [0u8; 32];
                sample.copy_from_slice(&body[66..98]);
                Some(Seal {
                    size: u64_at(38),
                    mtime_s: u64_at(46) as i64,
                    mtime_ns: u32_at(54),
                    inode: u64_at(58),
                    sample,
                })
            }
            f => return Err(format!("unknown seal flag {f}")),
        };
        let words = &body[HEAD..];
        if words.len() % 8 != 0 {
            return Err("bitmap is not whole words".into());
        }
        let words: Vec<u64> = words
            .chunks_exact(8)
            .map(|w| {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                u64::from_le_bytes(a)
            })
            .collect();
        let written = Bitmap::from_words(words, blocks).map_err(|e| e.to_string())?;
        Ok(Sidecar {
            state,
            identity: ImageIdentity { id, generation },
            block_size,
            written,
            seal,
        })
    }

    /// Reads the sidecar of `image`.
    pub fn load(image: &Path, block_size: u32, blocks: u64) -> SidecarStatus {
        match std::fs::read(sidecar_path(image)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SidecarStatus::Missing,
            Err(e) => SidecarStatus::Corrupt(format!("unreadable: {e}")),
            Ok(bytes) => match Self::decode(&bytes, block_size, blocks) {
                Ok(s) => SidecarStatus::Valid(s),
                Err(e) => SidecarStatus::Corrupt(e),
            },
        }
    }

    /// Replaces the sidecar of `image` crash-safely.
    pub fn store(&self, image: &Path) -> Result<(), SidecarError> {
        let path = sidecar_path(image);
        let err = |source| SidecarError {
            path: path.clone(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&self.encode()).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable.
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        Ok(())
    }
}

/// Hex of an image id.
pub fn id_hex(id: &[u8; 16]) -> String {
    crate::report::hex(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sidecar {
        let mut written = Bitmap::new(100);
        written.set(3);
        written.set(99);
        Sidecar {
            state: SidecarState::Closed,
            identity: ImageIdentity {
                id: [9; 16],
                generation: 4,
            },
            block_size: 4096,
            written,
            seal: Some(Seal {
                size: 409_600,
                mtime_s: 1_700_000_000,
                mtime_ns: 5,
                inode: 77,
                sample: [3; 32],
            }),
        }
    }

    #[test]
    fn roundtrip_and_every_corruption_or_truncation_is_refused() {
        let s = sample();
        let b = s.encode();
        assert_eq!(Sidecar::decode(&b, 4096, 100).unwrap(), s);
        crate::envelope::assert_every_byte_guarded(&b, |b| Sidecar::decode(b, 4096, 100));
        assert!(Sidecar::decode(&b, 4096, 101).is_err(), "wrong geometry");
    }

    #[test]
    fn store_replaces_atomically_and_load_reports_status() {
        let dir = tempfile_dir();
        let img = dir.join("disk.img");
        assert_eq!(Sidecar::load(&img, 4096, 100), SidecarStatus::Missing);
        let mut s = sample();
        s.store(&img).unwrap();
        assert_eq!(
            Sidecar::load(&img, 4096, 100),
            SidecarStatus::Valid(s.clone())
        );
        s.identity.generation = 5;
        s.store(&img).unwrap();
        assert_eq!(Sidecar::load(&img, 4096, 100), SidecarStatus::Valid(s));
        std::fs::write(sidecar_path(&img), b"FERRYIMG garbage").unwrap();
        assert!(matches!(
            Sidecar::load(&img, 4096, 100),
            SidecarStatus::Corrupt(_)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let mut id = [0u8; 8];
        crate::engine::fill_random(&mut id);
        let d = std::env::temp_dir().join(format!("ferry-sidecar-{}", crate::report::hex(&id)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
