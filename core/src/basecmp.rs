//! Comparing a disk with a base the destination holds, when no write history connects
//! them: keyed BLAKE3 digests per block, summarised per chunk of 64 blocks, so identical
//! regions cost one 16-byte digest per 256 KiB (a two-level Merkle tree). The key is
//! derived from the migration id, so a guest cannot prepare colliding blocks in advance.

use rayon::prelude::*;

use crate::bitmap::Bitmap;

/// Blocks per chunk.
pub const CHUNK_BLOCKS: u64 = 64;
/// A truncated BLAKE3 digest.
pub type Digest = [u8; 16];

/// The digest key for a migration.
pub fn key_for(migration_id: &[u8; 16]) -> [u8; 32] {
    blake3::derive_key("ferry 2026 base block digests v1", migration_id)
}

fn truncate(h: blake3::Hash) -> Digest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&h.as_bytes()[..16]);
    d
}

/// A disk to compare: its geometry, which blocks may hold data (holes read as zeros and
/// are never read), and how to read a block (false: unreadable, its digest matches
/// nothing).
pub struct Disk<'a, F> {
    /// Blocks.
    pub blocks: u64,
    /// Bytes per block.
    pub block_size: usize,
    /// Blocks that may hold data (e.g. from `SEEK_DATA`); `None`: every block.
    pub allocated: Option<&'a Bitmap>,
    /// Reads a block.
    pub read: F,
}

impl<F: Fn(u64, &mut [u8]) -> bool + Sync> Disk<'_, F> {
    fn may_hold_data(&self, b: u64) -> bool {
        self.allocated.is_none_or(|a| a.get(b))
    }

    /// Digests of the blocks of `chunk` (a hole's without reading it).
    pub fn chunk_blocks(&self, key: &[u8; 32], chunk: u32, buf: &mut Vec<u8>) -> Vec<Digest> {
        let first = u64::from(chunk) * CHUNK_BLOCKS;
        let end = (first + CHUNK_BLOCKS).min(self.blocks);
        buf.resize(self.block_size, 0);
        let zero = zero_digest(key, self.block_size);
        (first..end)
            .map(|b| {
                if !self.may_hold_data(b) {
                    zero
                } else if (self.read)(b, buf) {
                    truncate(blake3::keyed_hash(key, buf))
                } else {
                    [0xff; 16]
                }
            })
            .collect()
    }

    /// Digests of every chunk, in parallel: a chunk with no data is a hole on both sides
    /// and costs one precomputed digest, so a 16 TiB disk of holes is compared in the
    /// time its data takes to read.
    pub fn chunk_digests(&self, key: &[u8; 32]) -> Vec<Digest> {
        let chunks = self.blocks.div_ceil(CHUNK_BLOCKS);
        let zero = zero_digest(key, self.block_size);
        let hole_chunk = chunk_digest(key, &[zero; CHUNK_BLOCKS as usize]);
        (0..chunks)
            .into_par_iter()
            .map_init(Vec::new, |buf, c| {
                let first = c * CHUNK_BLOCKS;
                let end = (first + CHUNK_BLOCKS).min(self.blocks);
                let full = end - first == CHUNK_BLOCKS;
                if full && !(first..end).any(|b| self.may_hold_data(b)) {
                    return hole_chunk;
                }
                chunk_digest(key, &self.chunk_blocks(key, c as u32, buf))
            })
            .collect()
    }
}

/// The digest of an all-zero block of `block_size` bytes.
pub fn zero_digest(key: &[u8; 32], block_size: usize) -> Digest {
    truncate(blake3::keyed_hash(key, &vec![0u8; block_size]))
}

/// A chunk's digest over its block digests.
pub fn chunk_digest(key: &[u8; 32], blocks: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new_keyed(key);
    for d in blocks {
        h.update(d);
    }
    truncate(h.finalize())
}

/// Chunks whose digests differ (a missing digest on either side differs).
pub fn differing_chunks(mine: &[Digest], theirs: &[Digest]) -> Vec<u32> {
    (0..mine.len().max(theirs.len()))
        .filter(|&i| mine.get(i) != theirs.get(i) || mine.get(i).is_none())
        .map(|i| i as u32)
        .collect()
}

/// Marks the blocks of `chunk` whose digests differ.
pub fn mark_differing(out: &mut Bitmap, chunk: u32, mine: &[Digest], theirs: &[Digest]) {
    let first = u64::from(chunk) * CHUNK_BLOCKS;
    for (k, d) in mine.iter().enumerate() {
        if theirs.get(k) != Some(d) {
            out.set(first + k as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_changed_blocks_and_holes_cost_nothing() {
        let key = key_for(&[1; 16]);
        let n = 1000u64;
        let base = |b: u64, buf: &mut [u8]| {
            buf.fill((b % 251) as u8);
            true
        };
        let changed = [3u64, 64, 65, 999];
        let mine = |b: u64, buf: &mut [u8]| {
            base(b, buf);
            if changed.contains(&b) {
                buf[7] ^= 1;
            }
            true
        };
        let theirs = Disk {
            blocks: n,
            block_size: 512,
            allocated: None,
            read: base,
        };
        let ours = Disk {
            blocks: n,
            block_size: 512,
            allocated: None,
            read: mine,
        };
        let chunks = differing_chunks(&ours.chunk_digests(&key), &theirs.chunk_digests(&key));
        assert_eq!(chunks, vec![0, 1, 15]);
        let mut diff = Bitmap::new(n);
        let mut buf = Vec::new();
        for c in chunks {
            let m = ours.chunk_blocks(&key, c, &mut buf);
            let t = theirs.chunk_blocks(&key, c, &mut buf);
            mark_differing(&mut diff, c, &m, &t);
        }
        assert_eq!(diff.iter_ones().collect::<Vec<_>>(), changed.to_vec());
        // Another migration id gives unrelated digests.
        assert_ne!(
            theirs.chunk_digests(&key_for(&[2; 16])),
            theirs.chunk_digests(&key)
        );

        // Holes: a disk with data in one block of a 2^26-block disk is hashed by reading
        // that block alone, and equals a dense read of the same content.
        let big = 1u64 << 26;
        let mut allocated = Bitmap::new(big);
        allocated.set(12_345_678);
        let reads = std::sync::atomic::AtomicU64::new(0);
        let data = |b: u64, buf: &mut [u8]| {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            buf.fill(u8::from(b == 12_345_678));
            true
        };
        let sparse = Disk {
            blocks: big,
            block_size: 512,
            allocated: Some(&allocated),
            read: data,
        };
        let digests = sparse.chunk_digests(&key);
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
        let dense = Disk {
            blocks: 128,
            block_size: 512,
            allocated: None,
            read: |_: u64, buf: &mut [u8]| {
                buf.fill(0);
                true
            },
        };
        assert_eq!(digests[0], dense.chunk_digests(&key)[0]);
        assert_ne!(digests[12_345_678 / 64], digests[0]);
    }
}
