//! Keyed content digests that make verification cost no downtime.
//!
//! Every page and block has a digest `d(i)`: the content hashed with xxh3 under a secret
//! drawn per migration ([`DigestKey`]), the unit's index mixed in, reduced modulo the prime
//! `P = 2^61 − 1`. A [`DigestTable`] keeps one per unit and both sides update theirs as
//! units are sent or received, so the final manifest compares two sums and stop-and-copy
//! re-hashes only what it sends. Mixing in the index makes a page written at the wrong
//! place change the sum.
//!
//! The key matters because a guest's content is chosen by whoever runs in the guest: with
//! an unkeyed hash it could build pages whose digests collide, or whose digests cancel in a
//! sum, and hide a page that went missing or wrong. Under a secret it cannot predict any
//! digest. The key travels only inside the migration's (authenticated, encrypted)
//! channel, never through guest memory. Sums are taken modulo a prime over the
//! *differences* from the all-zero unit, `Σ (d(i) − z(i)) mod P`: a fresh table sums to
//! zero without touching its units, which is what lets a 16 TiB disk of holes have a
//! table whose memory follows the units actually written (see [`DigestTable`]).
//!
//! `--verify full` re-hashes the whole guest on both sides with the same key: that is what
//! catches a dirty page the source never sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use xxhash_rust::xxh3::xxh3_64_with_secret;

/// The prime modulus of digests and sums (a Mersenne prime: reduction is a shift and add).
pub const P: u64 = (1 << 61) - 1;

/// Reduces `x` modulo [`P`].
#[inline]
fn reduce(x: u64) -> u64 {
    let r = (x & P) + (x >> 61);
    if r >= P {
        r - P
    } else {
        r
    }
}

/// `(a + b) mod P` for `a, b < P`.
#[inline]
fn add_mod(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P {
        s - P
    } else {
        s
    }
}

/// `(a − b) mod P` for `a, b < P`.
#[inline]
fn sub_mod(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + P - b
    }
}

/// Final mixer (from SplitMix64): spreads index bits over the whole word.
#[inline]
fn fmix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Mixes an index into a 64-bit value (not keyed: for seeds and content generators; unit
/// digests use [`DigestKey::unit`]).
#[inline]
pub fn mix_index(content_hash: u64, index: u64) -> u64 {
    fmix(content_hash ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Bytes of an xxh3 secret (its default size).
const SECRET_LEN: usize = 192;

/// The secret of one migration's unit digests.
#[derive(Clone)]
pub struct DigestKey {
    bytes: [u8; 32],
    secret: Arc<[u8; SECRET_LEN]>,
}

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.write_str("DigestKey(..)")
    }
}

impl DigestKey {
    /// A fresh random key (the source draws one per migration).
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        crate::engine::fill_random(&mut k);
        Self::from_bytes(k)
    }

    /// The key whose 32 bytes are `bytes` (the destination's, from the hello).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut secret = [0u8; SECRET_LEN];
        blake3::Hasher::new_derive_key("ferry 2026 unit digest secret")
            .update(&bytes)
            .finalize_xof()
            .fill(&mut secret);
        Self {
            bytes,
            secret: Arc::new(secret),
        }
    }

    /// The key's bytes, for the hello.
    pub fn bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// Keyed hash of `data` alone.
    #[inline]
    pub fn content_hash(&self, data: &[u8]) -> u64 {
        xxh3_64_with_secret(data, &self.secret[..])
    }

    /// Digest of content whose keyed hash is `content_hash`, stored at unit `index`.
    #[inline]
    pub fn mix(content_hash: u64, index: u64) -> u64 {
        reduce(mix_index(content_hash, index))
    }

    /// Digest of `data` stored at unit `index`.
    #[inline]
    pub fn unit(&self, index: u64, data: &[u8]) -> u64 {
        Self::mix(self.content_hash(data), index)
    }

    /// Keyed hash of an all-zero unit of `size` bytes.
    pub fn zero_hash(&self, size: usize) -> u64 {
        self.content_hash(&vec![0u8; size])
    }
}

/// A thread's running change to a [`DigestTable`]'s sum (an element of ℤ/P).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DigestDelta(pub u64);

impl DigestDelta {
    /// Adds another delta.
    pub fn add(&mut self, other: DigestDelta) {
        self.0 = add_mod(self.0, other.0 % P);
    }
}

/// Units per lazily allocated part of a table (512 KiB of entries).
const PART: u64 = 1 << 16;

/// Per-unit digests plus their running sum, shared by the threads of one side.
///
/// Entries are partitioned between threads (each unit is pinned to one channel), so an
/// entry has one writer; the running sum is kept per thread as a [`DigestDelta`] and added
/// up at the end, which keeps the hot path free of shared atomics. An entry holds
/// `d(i) XOR z(i)`, so a unit still all-zero holds 0 and a part of the table nobody wrote
/// is never allocated: memory follows the units written, not the disk's size.
#[derive(Debug)]
pub struct DigestTable {
    parts: Box<[OnceLock<Box<[AtomicU64]>>]>,
    units: u64,
    key: DigestKey,
    zero_hash: u64,
}

impl DigestTable {
    /// A table of `units` all-zero units of `unit_size` bytes under `key`: the state of a
    /// fresh destination before anything is received.
    pub fn zeroed(units: u64, unit_size: usize, key: &DigestKey) -> Self {
        let parts = units.div_ceil(PART) as usize;
        Self {
            parts: (0..parts).map(|_| OnceLock::new()).collect(),
            units,
            key: key.clone(),
            zero_hash: key.zero_hash(unit_size),
        }
    }

    /// Number of units.
    pub fn len(&self) -> u64 {
        self.units
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.units == 0
    }

    /// The key digests are taken under.
    pub fn key(&self) -> &DigestKey {
        &self.key
    }

    /// Digest of `data` at `index` under this table's key.
    #[inline]
    pub fn digest(&self, index: u64, data: &[u8]) -> u64 {
        self.key.unit(index, data)
    }

    /// Digest of a zero unit at `index`.
    #[inline]
    pub fn zero_digest(&self, index: u64) -> u64 {
        DigestKey::mix(self.zero_hash, index)
    }

    fn entry(&self, index: u64, allocate: bool) -> Option<&AtomicU64> {
        if index >= self.units {
            return None;
        }
        let part = self.parts.get((index / PART) as usize)?;
        let entries = if allocate {
            part.get_or_init(|| (0..PART).map(|_| AtomicU64::new(0)).collect())
        } else {
            part.get()?
        };
        entries.get((index % PART) as usize)
    }

    /// Records that unit `index` now has digest `digest`, accumulating the sum change in
    /// `delta`. Out-of-range indices are ignored (callers bounds-check first).
    #[inline]
    pub fn record(&self, index: u64, digest: u64, delta: &mut DigestDelta) {
        let z = self.zero_digest(index);
        let digest = digest % P;
        let Some(e) = self.entry(index, digest != z) else {
            // An untouched part already holds the zero digest.
            return;
        };
        let old = e.swap(digest ^ z, Ordering::Relaxed) ^ z;
        delta.0 = add_mod(delta.0, sub_mod(digest, old));
    }

    /// The digest currently recorded for `index`.
    pub fn get(&self, index: u64) -> Option<u64> {
        if index >= self.units {
            return None;
        }
        let z = self.zero_digest(index);
        Some(
            self.entry(index, false)
                .map_or(z, |e| e.load(Ordering::Relaxed) ^ z),
        )
    }

    /// The table's sum given every thread's delta.
    pub fn sum_with(&self, deltas: impl IntoIterator<Item = DigestDelta>) -> u64 {
        deltas.into_iter().fold(0, |s, d| add_mod(s, d.0 % P))
    }

    /// Recomputes the sum from the entries (slow; for tests and audits).
    pub fn recompute_sum(&self) -> u64 {
        let mut s = 0;
        for (p, part) in self.parts.iter().enumerate() {
            let Some(entries) = part.get() else { continue };
            for (k, e) in entries.iter().enumerate() {
                let i = p as u64 * PART + k as u64;
                if i < self.units {
                    let z = self.zero_digest(i);
                    s = add_mod(s, sub_mod(e.load(Ordering::Relaxed) ^ z, z));
                }
            }
        }
        s
    }
}

/// Sum of the digests of units `0..count` read by `read(i, buf)`, as differences from the
/// zero unit and computed in parallel: the `--verify full` digest of a whole memory or
/// disk, equal to a [`DigestTable`]'s sum over the same content.
pub fn full_sum<F>(key: &DigestKey, count: u64, unit_size: usize, read: F) -> u64
where
    F: Fn(u64, &mut [u8]) + Sync,
{
    use rayon::prelude::*;
    const CHUNK: u64 = 1024;
    let zero_hash = key.zero_hash(unit_size);
    let chunks = count.div_ceil(CHUNK);
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut buf = vec![0u8; unit_size];
            let mut s = 0u64;
            for i in c * CHUNK..((c + 1) * CHUNK).min(count) {
                read(i, &mut buf);
                let d = key.unit(i, &buf);
                s = add_mod(s, sub_mod(d, DigestKey::mix(zero_hash, i)));
            }
            s
        })
        .reduce(|| 0, add_mod)
}

/// The `--verify full` sums of a whole guest under `key`: pages, then each disk, reading
/// units with `read_page(i, buf)` and `read_block(disk, i, buf)`. Both sides call this
/// one function, so they cannot disagree on what is hashed. An unreadable unit hashes as
/// all `0xff`, which a healthy peer's copy will not match.
pub fn guest_sums(
    layout: &crate::guest::GuestLayout,
    key: &DigestKey,
    read_page: impl Fn(u64, &mut [u8]) -> bool + Sync,
    read_block: impl Fn(usize, u64, &mut [u8]) -> bool + Sync,
) -> (u64, Vec<u64>) {
    let pages = full_sum(key, layout.pages, layout.page_size as usize, |i, b| {
        if !read_page(i, b) {
            b.fill(0xff);
        }
    });
    let disks = layout
        .disks
        .iter()
        .enumerate()
        .map(|(d, dl)| {
            full_sum(key, dl.blocks, dl.block_size as usize, |i, b| {
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

    fn key() -> DigestKey {
        DigestKey::from_bytes([9; 32])
    }

    #[test]
    fn table_sum_tracks_updates_and_matches_full_sum() {
        let k = key();
        let t = DigestTable::zeroed(100, 64, &k);
        assert_eq!(t.sum_with([]), 0, "a fresh table sums to zero");
        let mut d1 = DigestDelta::default();
        let mut d2 = DigestDelta::default();
        let mut content = vec![vec![0u8; 64]; 100];
        for i in 0..100u64 {
            if i % 3 == 0 {
                content[i as usize][0] = i as u8 + 1;
                let d = t.digest(i, &content[i as usize]);
                if i % 2 == 0 {
                    t.record(i, d, &mut d1);
                } else {
                    t.record(i, d, &mut d2);
                }
            }
        }
        // Re-recording the same value changes nothing; writing a zero back restores it.
        t.record(3, t.digest(3, &content[3]), &mut d1);
        t.record(6, t.zero_digest(6), &mut d1);
        content[6].fill(0);
        let sum = t.sum_with([d1, d2]);
        assert_eq!(sum, t.recompute_sum());
        assert_eq!(
            sum,
            full_sum(&k, 100, 64, |i, b| b.copy_from_slice(&content[i as usize]))
        );
        assert_eq!(t.zero_digest(5), k.unit(5, &[0u8; 64]));
        assert_eq!(t.get(6), Some(t.zero_digest(6)));
        assert_eq!(t.get(9), Some(k.unit(9, &content[9])));
        assert_eq!(t.get(100), None);
    }

    #[test]
    fn swapped_pages_change_the_sum_and_keys_change_every_digest() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let k = key();
        let s1 = add_mod(k.unit(0, &a), k.unit(1, &b));
        let s2 = add_mod(k.unit(0, &b), k.unit(1, &a));
        assert_ne!(s1, s2);
        let other = DigestKey::from_bytes([10; 32]);
        assert_ne!(k.unit(0, &a), other.unit(0, &a));
        assert!(k.unit(7, &a) < P);
    }

    #[test]
    fn a_table_of_a_huge_disk_costs_only_what_is_written() {
        // 16 TiB of 4 KiB blocks: 4 Gi units.
        let k = key();
        let t = DigestTable::zeroed(1 << 32, 4096, &k);
        let mut d = DigestDelta::default();
        let block = [0x5au8; 4096];
        for i in [0, 1 << 20, (1 << 32) - 1] {
            t.record(i, t.digest(i, &block), &mut d);
        }
        assert_eq!(t.parts.iter().filter(|p| p.get().is_some()).count(), 3);
        assert_eq!(t.sum_with([d]), t.recompute_sum());
    }

    #[test]
    fn modular_arithmetic_stays_in_range() {
        assert_eq!(reduce(u64::MAX), (u64::MAX % P));
        assert_eq!(reduce(P), 0);
        assert_eq!(add_mod(P - 1, 1), 0);
        assert_eq!(sub_mod(0, 1), P - 1);
    }
}
