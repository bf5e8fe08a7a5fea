//! Content digests that make verification cost no downtime.
//!
//! Every page and block has a digest `d(i) = mix(xxh3(content), i)`; a [`DigestTable`]
//! keeps one per unit and the wrapping sum of all of them. Both sides update their table as
//! units are sent or received, so the final manifest compares two sums and stop-and-copy
//! re-hashes only what it sends. Mixing in the index makes a page written at the wrong
//! place change the sum. A zero unit's digest needs no hashing: the zero hash is computed
//! once per unit size.
//!
//! This catches what the wire or a codec corrupts. It is not a defence against an attacker
//! (the peers are authenticated by the transport) and cannot see a dirty page the source
//! never sent: that is what `--verify full` is for.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

/// Final mixer (from SplitMix64): spreads index bits over the whole word.
#[inline]
fn fmix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Digest of content whose plain hash is `content_hash`, stored at unit `index`.
#[inline]
pub fn mix_index(content_hash: u64, index: u64) -> u64 {
    fmix(content_hash ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Digest of `data` stored at unit `index`.
#[inline]
pub fn unit_digest(index: u64, data: &[u8]) -> u64 {
    mix_index(xxh3_64(data), index)
}

/// Plain hash of an all-zero unit of `size` bytes.
pub fn zero_hash(size: usize) -> u64 {
    xxh3_64(&vec![0u8; size])
}

/// Per-unit digests plus their running sum, shared by the threads of one side.
///
/// Entries are partitioned between threads (each unit is pinned to one channel), so an
/// entry has one writer; the running sum is kept per thread as a [`DigestDelta`] and added
/// up at the end, which keeps the hot path free of shared atomics.
#[derive(Debug)]
pub struct DigestTable {
    entries: Box<[AtomicU64]>,
    zero_hash: u64,
    base_sum: u64,
}

/// A thread's running change to a [`DigestTable`]'s sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DigestDelta(pub u64);

impl DigestDelta {
    /// Adds another delta.
    pub fn add(&mut self, other: DigestDelta) {
        self.0 = self.0.wrapping_add(other.0);
    }
}

impl DigestTable {
    /// A table of `units` all-zero units of `unit_size` bytes: the state of a fresh
    /// destination before anything is received.
    pub fn zeroed(units: u64, unit_size: usize) -> Self {
        let zero_hash = zero_hash(unit_size);
        let mut sum = 0u64;
        let entries = (0..units)
            .map(|i| {
                let d = mix_index(zero_hash, i);
                sum = sum.wrapping_add(d);
                AtomicU64::new(d)
            })
            .collect();
        Self {
            entries,
            zero_hash,
            base_sum: sum,
        }
    }

    /// Number of units.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Digest of a zero unit at `index`.
    #[inline]
    pub fn zero_digest(&self, index: u64) -> u64 {
        mix_index(self.zero_hash, index)
    }

    /// Records that unit `index` now has digest `digest`, accumulating the sum change in
    /// `delta`. Out-of-range indices are ignored (callers bounds-check first).
    #[inline]
    pub fn record(&self, index: u64, digest: u64, delta: &mut DigestDelta) {
        if let Some(e) = self.entries.get(index as usize) {
            let old = e.swap(digest, Ordering::Relaxed);
            delta.0 = delta.0.wrapping_add(digest).wrapping_sub(old);
        }
    }

    /// The digest currently recorded for `index`.
    pub fn get(&self, index: u64) -> Option<u64> {
        self.entries
            .get(index as usize)
            .map(|e| e.load(Ordering::Relaxed))
    }

    /// The table's sum given every thread's delta.
    pub fn sum_with(&self, deltas: impl IntoIterator<Item = DigestDelta>) -> u64 {
        deltas
            .into_iter()
            .fold(self.base_sum, |s, d| s.wrapping_add(d.0))
    }

    /// Recomputes the sum from the entries (slow; for tests and audits).
    pub fn recompute_sum(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |s, e| s.wrapping_add(e.load(Ordering::Relaxed)))
    }
}

/// Sum of the digests of units `0..count` read by `read(i, buf)`, computed in parallel:
/// the `--verify full` digest of a whole memory or disk.
pub fn full_sum<F>(count: u64, unit_size: usize, read: F) -> u64
where
    F: Fn(u64, &mut [u8]) + Sync,
{
    use rayon::prelude::*;
    const CHUNK: u64 = 1024;
    let chunks = count.div_ceil(CHUNK);
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut buf = vec![0u8; unit_size];
            let mut s = 0u64;
            for i in c * CHUNK..((c + 1) * CHUNK).min(count) {
                read(i, &mut buf);
                s = s.wrapping_add(unit_digest(i, &buf));
            }
            s
        })
        .reduce(|| 0, u64::wrapping_add)
}

/// The `--verify full` sums of a whole guest: pages, then each disk, reading units with
/// `read_page(i, buf)` and `read_block(disk, i, buf)`. Both sides call this one function,
/// so they cannot disagree on what is hashed. An unreadable unit hashes as all `0xff`,
/// which a healthy peer's copy will not match.
pub fn guest_sums(
    layout: &crate::guest::GuestLayout,
    read_page: impl Fn(u64, &mut [u8]) -> bool + Sync,
    read_block: impl Fn(usize, u64, &mut [u8]) -> bool + Sync,
) -> (u64, Vec<u64>) {
    let pages = full_sum(layout.pages, layout.page_size as usize, |i, b| {
        if !read_page(i, b) {
            b.fill(0xff);
        }
    });
    let disks = layout
        .disks
        .iter()
        .enumerate()
        .map(|(d, dl)| {
            full_sum(dl.blocks, dl.block_size as usize, |i, b| {
                if !read_block(d, i, b) {
                    b.fill(0xff);
                }
            })
        })
        .collect();
    (pages, disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sum_tracks_updates_and_matches_full_sum() {
        let t = DigestTable::zeroed(100, 64);
        let mut d1 = DigestDelta::default();
        let mut d2 = DigestDelta::default();
        let mut content = vec![vec![0u8; 64]; 100];
        for i in 0..100u64 {
            if i % 3 == 0 {
                content[i as usize][0] = i as u8 + 1;
                let d = unit_digest(i, &content[i as usize]);
                if i % 2 == 0 {
                    t.record(i, d, &mut d1);
                } else {
                    t.record(i, d, &mut d2);
                }
            }
        }
        // Re-recording the same value changes nothing.
        t.record(3, unit_digest(3, &content[3]), &mut d1);
        let sum = t.sum_with([d1, d2]);
        assert_eq!(sum, t.recompute_sum());
        assert_eq!(
            sum,
            full_sum(100, 64, |i, b| b.copy_from_slice(&content[i as usize]))
        );
        assert_eq!(t.zero_digest(5), unit_digest(5, &[0u8; 64]));
    }

    #[test]
    fn swapped_pages_change_the_sum() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let s1 = unit_digest(0, &a).wrapping_add(unit_digest(1, &b));
        let s2 = unit_digest(0, &b).wrapping_add(unit_digest(1, &a));
        assert_ne!(s1, s2);
    }
}
