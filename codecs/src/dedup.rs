//! Content deduplication. A unit whose content this channel already delivered goes as a
//! reference: the ULEB128 distance back to that content in a bounded store the destination
//! keeps, a mirror of the index the source keeps.
//!
//! The source never stores content, only keyed hashes: BLAKE3 keyed with a random key drawn
//! per encoder and never sent, so a guest cannot craft two pages that collide. Both sides
//! number the contents they register in the same order (the order of the units in the
//! channel's batches) and evict oldest first against the same byte budget, so a reference
//! the source makes always names content the destination still holds; a reference to
//! anything else is a protocol error.

use std::collections::{HashMap, VecDeque};

use ferry_core::codec::CodecError;

/// Default bytes of content the destination keeps per channel.
pub const DEFAULT_CAPACITY: usize = 64 << 20;
/// The largest store a peer may ask for: the destination keeps one per channel, sized by
/// the source's spec, so it is bounded here whatever the source sends.
pub const MAX_CAPACITY: usize = 4 << 30;

/// The source's side: keyed hash → registration number.
pub struct DedupIndex {
    key: [u8; 32],
    map: HashMap<u128, u64>,
    /// Registration number, hash and size of each entry, oldest first.
    order: VecDeque<(u64, u128, usize)>,
    next: u64,
    bytes: usize,
    capacity: usize,
    /// Lookups that found the content.
    pub hits: u64,
    /// Lookups.
    pub lookups: u64,
}

/// What the index says about a unit's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Already delivered: send this reference distance.
    Known(u64),
    /// Newly registered: the destination must register it too.
    Registered,
    /// Larger than the whole store: neither side registers it.
    TooLarge,
}

impl DedupIndex {
    /// An index mirroring a store of `capacity` bytes, keyed with fresh randomness.
    pub fn new(capacity: usize) -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No OS randomness: fall back to the address-space and clock entropy std hashes
            // with; still unknown to the guest.
            use std::hash::{BuildHasher, Hasher};
            for chunk in key.chunks_mut(8) {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default(),
                );
                chunk.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        Self {
            key,
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            bytes: 0,
            capacity,
            hits: 0,
            lookups: 0,
        }
    }

    /// The keyed hash of a unit's content (pure: safe to run on many threads).
    pub fn hash(&self, data: &[u8]) -> u128 {
        let h = blake3::keyed_hash(&self.key, data);
        let mut first = [0u8; 16];
        first.copy_from_slice(&h.as_bytes()[..16]);
        u128::from_le_bytes(first)
    }

    /// Looks `hash` up, registering it when new.
    pub fn lookup(&mut self, hash: u128, len: usize) -> Lookup {
        self.lookups += 1;
        if let Some(&n) = self.map.get(&hash) {
            self.hits += 1;
            return Lookup::Known(self.next - n);
        }
        if len > self.capacity {
            return Lookup::TooLarge;
        }
        while self.bytes + len > self.capacity {
            let Some((n, h, l)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&h) == Some(&n) {
                self.map.remove(&h);
            }
            self.bytes -= l;
        }
        self.map.insert(hash, self.next);
        self.order.push_back((self.next, hash, len));
        self.next += 1;
        self.bytes += len;
        Lookup::Registered
    }
}

/// The destination's side: registered contents, oldest first.
pub struct DedupStore {
    entries: VecDeque<Box<[u8]>>,
    /// Registration number of `entries[0]`.
    first: u64,
    bytes: usize,
    capacity: usize,
}

fn malformed(reason: String) -> CodecError {
    CodecError::Malformed {
        codec: "dedup",
        reason,
    }
}

impl DedupStore {
    /// A store of at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            first: 0,
            bytes: 0,
            capacity,
        }
    }

    /// Registers a delivered unit's content, evicting as the index does.
    pub fn register(&mut self, data: &[u8]) -> Result<(), CodecError> {
        if data.len() > self.capacity {
            return Err(malformed(format!(
                "{} bytes registered, the store holds {}",
                data.len(),
                self.capacity
            )));
        }
        while self.bytes + data.len() > self.capacity {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.len();
            self.first += 1;
        }
        self.bytes += data.len();
        self.entries.push_back(data.into());
        Ok(())
    }

    /// The content a reference (as encoded by [`encode_reference`]) names.
    pub fn resolve(&self, reference: &[u8]) -> Result<&[u8], CodecError> {
        let mut pos = 0;
        let distance = crate::xor_delta::get_uleb(reference, &mut pos)
            .map_err(|_| malformed("truncated reference".into()))? as u64;
        if pos != reference.len() {
            return Err(malformed("trailing bytes after a reference".into()));
        }
        let next = self.first + self.entries.len() as u64;
        let n = next
            .checked_sub(distance)
            .filter(|n| distance > 0 && *n >= self.first)
            .ok_or_else(|| {
                malformed(format!(
                    "reference to unknown content ({distance} back, {} held)",
                    self.entries.len()
                ))
            })?;
        usize::try_from(n - self.first)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|b| &b[..])
            .ok_or_else(|| malformed("reference to unknown content".into()))
    }
}

/// Encodes a reference distance.
pub fn encode_reference(distance: u64, out: &mut Vec<u8>) {
    out.clear();
    crate::xor_delta::put_uleb(out, distance as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_store_stay_mirrored_through_eviction() {
        let mut index = DedupIndex::new(3 * 8);
        let mut store = DedupStore::new(3 * 8);
        let contents: Vec<[u8; 8]> = (0u8..6).map(|i| [i; 8]).collect();
        // Register a, b, c, d (a is evicted), then look each up.
        for c in &contents[..4] {
            assert_eq!(index.lookup(index.hash(c), 8), Lookup::Registered);
            store.register(c).unwrap();
        }
        assert_eq!(
            index.lookup(index.hash(&contents[0]), 8),
            Lookup::Registered,
            "evicted content is new again"
        );
        store.register(&contents[0]).unwrap();
        for c in &contents[2..4] {
            let Lookup::Known(d) = index.lookup(index.hash(c), 8) else {
                panic!("{c:?} should be known");
            };
            let mut r = Vec::new();
            encode_reference(d, &mut r);
            assert_eq!(store.resolve(&r).unwrap(), c);
        }
    }

    #[test]
    fn hostile_references_are_errors() {
        let mut store = DedupStore::new(64);
        store.register(&[1; 8]).unwrap();
        for bad in [&[][..], &[0], &[2], &[0x80], &[1, 0], &[0xff; 12]] {
            assert!(store.resolve(bad).is_err(), "{bad:?}");
        }
        assert_eq!(store.resolve(&[1]).unwrap(), &[1; 8]);
        assert!(store.register(&[0; 65]).is_err());
    }

    #[test]
    fn keys_differ_per_index() {
        let a = DedupIndex::new(64);
        let b = DedupIndex::new(64);
        assert_ne!(a.hash(b"same"), b.hash(b"same"));
    }
}
