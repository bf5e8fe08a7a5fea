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

/// Digests of every block, computed in parallel; `read` fills a block (an unreadable
/// block gets a digest that matches nothing).
pub fn block_digests<F>(key: &[u8; 32], blocks: u64, block_size: usize, read: F) -> Vec<Digest>
where
    F: Fn(u64, &mut [u8]) -> bool + Sync,
{
    (0..blocks)
        .into_par_iter()
        .map_init(
            || vec![0u8; block_size],
            |buf, b| {
                if read(b, buf) {
                    truncate(blake3::keyed_hash(key, buf))
                } else {
                    [0xff; 16]
                }
            },
        )
        .collect()
}

/// Chunk digests over the block digests.
pub fn chunk_digests(key: &[u8; 32], blocks: &[Digest]) -> Vec<Digest> {
    blocks
        .chunks(CHUNK_BLOCKS as usize)
        .map(|c| {
            let mut h = blake3::Hasher::new_keyed(key);
            for d in c {
                h.update(d);
            }
            truncate(h.finalize())
        })
        .collect()
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
    fn finds_exactly_the_changed_blocks() {
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
        let bd_theirs = block_digests(&key, n, 512, base);
        let bd_mine = block_digests(&key, n, 512, mine);
        let cd_theirs = chunk_digests(&key, &bd_theirs);
        let cd_mine = chunk_digests(&key, &bd_mine);
        let chunks = differing_chunks(&cd_mine, &cd_theirs);
        assert_eq!(chunks, vec![0, 1, 15]);
        let mut diff = Bitmap::new(n);
        for c in chunks {
            let r = c as usize * 64..((c as usize + 1) * 64).min(n as usize);
            mark_differing(&mut diff, c, &bd_mine[r.clone()], &bd_theirs[r]);
        }
        assert_eq!(diff.iter_ones().collect::<Vec<_>>(), changed.to_vec());
        // Another migration id gives unrelated digests.
        assert_ne!(
            block_digests(&key_for(&[2; 16]), 1, 512, base),
            bd_theirs[..1].to_vec()
        );
    }
}
