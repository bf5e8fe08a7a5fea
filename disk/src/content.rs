//! Initial content shared by the backends: how guest memory starts (`--fill`), memory
//! images, and the pre-fill of a new disk image.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::image::DiskImage;

/// How guest memory starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// All zero (an idle, freshly booted guest).
    Zero,
    /// Incompressible pseudo-random bytes.
    Random,
    /// The content of a file, repeated or cut to size; `.zst` files are decompressed.
    File(PathBuf),
}

impl Fill {
    /// Parses `zero`, `random` or a path.
    pub fn parse(s: &str) -> Fill {
        match s {
            "zero" => Fill::Zero,
            "random" => Fill::Random,
            path => Fill::File(PathBuf::from(path)),
        }
    }
}

/// Fills `buf` with incompressible pseudo-random bytes from `seed` (xorshift64).
pub fn random_bytes(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// Reads up to `limit` bytes of `path`, decompressing `.zst`.
pub fn read_image(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let is_zst = path.extension().is_some_and(|e| e == "zst");
    let r: Box<dyn Read> = if is_zst {
        let mut d =
            zstd::stream::read::Decoder::new(f).map_err(|e| format!("{}: {e}", path.display()))?;
        d.window_log_max(27)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Box::new(d)
    } else {
        Box::new(f)
    };
    r.take(limit)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if out.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(out)
}

/// Writes pseudo-random data into about `fraction` of a new disk, in 256 KiB extents, so
/// storage pre-copy has data to move and holes to skip.
pub fn prefill_disk(disk: &DiskImage, fraction: f64, seed: u64) -> std::io::Result<()> {
    const EXTENT_BLOCKS: u64 = 64;
    let fraction = fraction.clamp(0.0, 1.0);
    let bs = disk.block_size() as usize;
    let mut buf = vec![0u8; bs * EXTENT_BLOCKS as usize];
    let extents = disk.blocks().div_ceil(EXTENT_BLOCKS);
    for e in 0..extents {
        let h = ferry_core::digest::mix_index(seed, e);
        if (h >> 11) as f64 / (1u64 << 53) as f64 >= fraction {
            continue;
        }
        random_bytes(h, &mut buf);
        let first = e * EXTENT_BLOCKS;
        let n = EXTENT_BLOCKS.min(disk.blocks() - first) as usize;
        for (k, block) in buf.chunks(bs).take(n).enumerate() {
            disk.write(first + k as u64, block)?;
        }
    }
    Ok(())
}
