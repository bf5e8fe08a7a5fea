//! XOR-delta against the version of a unit last sent, in the spirit of QEMU's XBZRLE: the
//! encoder XORs the new version with the cached old one and writes alternating runs —
//! a ULEB128 length of unchanged bytes, then a ULEB128 length of changed bytes followed by
//! those bytes of the *new* version. The destination's own copy of the unit is the base.
//! An unchanged unit costs a few bytes. When the delta is not smaller than half the unit,
//! the stage steps aside and the next stage sees the raw data.
//!
//! The cache of last-sent versions is bounded (`capacity` bytes per channel, split into
//! shards so the threads encoding one batch rarely meet on a lock) and favours the units
//! sent most often; a unit not in it is simply sent without a delta. Every version sent, however it was encoded, updates the
//! cache, so the encoder's idea of the destination's copy never drifts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_core::codec::{CodecError, Unit, UnitKind};

use crate::stage::Stage;

/// Cache shards (a power of two).
const SHARDS: usize = 16;

/// A cached version and when it was last sent.
struct Entry {
    data: Box<[u8]>,
    stamp: u64,
}

/// One shard of last-sent versions. When full, a unit may replace the least recently sent
/// one only if it was sent more often (so a unit sent for the first time only takes free
/// room). A pass over more memory than the cache holds would otherwise evict every entry
/// just before it is needed again; this way the units sent again and again (the ones a
/// delta pays for) stay.
#[derive(Default)]
struct Shard {
    cache: HashMap<Unit, Entry>,
    /// (unit, stamp) in sending order; entries whose stamp is stale are skipped.
    order: VecDeque<(Unit, u64)>,
    /// How often each unit was sent (saturating).
    seen: HashMap<Unit, u8>,
    bytes: usize,
    clock: u64,
}

impl Shard {
    fn remember(&mut self, unit: Unit, data: &[u8], capacity: usize) {
        self.clock += 1;
        let stamp = self.clock;
        if self.seen.len() >= 8 * self.cache.len().max(4096) {
            // Bounded bookkeeping, and ageing: forget the counts of units not cached and
            // halve the rest.
            let cache = &self.cache;
            self.seen.retain(|u, n| {
                *n /= 2;
                cache.contains_key(u)
            });
        }
        let count = self.seen.entry(unit).or_insert(0);
        *count = count.saturating_add(1);
        let count = *count;
        match self.cache.get_mut(&unit) {
            Some(e) if e.data.len() == data.len() => {
                e.data.copy_from_slice(data);
                e.stamp = stamp;
                self.order.push_back((unit, stamp));
                self.compact();
                return;
            }
            Some(_) => self.forget(unit),
            None => {}
        }
        if data.len() > capacity {
            return;
        }
        while self.bytes + data.len() > capacity {
            let Some(&(victim, s)) = self.order.front() else {
                break;
            };
            if self.cache.get(&victim).is_some_and(|e| e.stamp == s) {
                // Only a unit sent more often than the least recent one may replace it.
                if self.seen.get(&victim).copied().unwrap_or(0) >= count {
                    return;
                }
                self.forget(victim);
            }
            self.order.pop_front();
        }
        self.cache.insert(
            unit,
            Entry {
                data: data.into(),
                stamp,
            },
        );
        self.order.push_back((unit, stamp));
        self.bytes += data.len();
        self.compact();
    }

    /// Drops stale places from `order` once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.cache.len() + 64 {
            let cache = &self.cache;
            self.order
                .retain(|(u, s)| cache.get(u).is_some_and(|e| e.stamp == *s));
        }
    }

    fn forget(&mut self, unit: Unit) {
        if let Some(e) = self.cache.remove(&unit) {
            self.bytes -= e.data.len();
            // Its places in `order` are skipped when they come up.
        }
    }
}

/// The `xor-delta` stage.
pub struct XorDelta {
    shards: Vec<Mutex<Shard>>,
    /// Bytes each shard may hold.
    shard_capacity: usize,
    hits: AtomicU64,
    lookups: AtomicU64,
}

impl XorDelta {
    /// A stage keeping at most `capacity` bytes of last-sent versions.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_capacity: capacity / SHARDS,
            hits: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
        }
    }

    fn shard(&self, unit: Unit) -> std::sync::MutexGuard<'_, Shard> {
        let disk = match unit.kind {
            UnitKind::Page => 0,
            UnitKind::Block(d) => u64::from(d) + 1,
        };
        let i = (unit.index.wrapping_add(disk.wrapping_mul(0x9e37_79b9))) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub(crate) fn get_uleb(input: &[u8], pos: &mut usize) -> Result<usize, CodecError> {
    let mut v = 0usize;
    for shift in (0..35).step_by(7) {
        let b = *input.get(*pos).ok_or(CodecError::Malformed {
            codec: "xor-delta",
            reason: "truncated run length".into(),
        })?;
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Malformed {
        codec: "xor-delta",
        reason: "run length too long".into(),
    })
}

/// Encodes the runs of `new` that differ from `old`; false when that reaches `limit` bytes.
fn encode_runs(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    let n = new.len();
    let mut i = 0;
    while i < n {
        let start = i;
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i == n {
            break; // trailing unchanged bytes need no run
        }
        put_uleb(out, i - start);
        let lit = i;
        while i < n && old[i] != new[i] {
            i += 1;
        }
        put_uleb(out, i - lit);
        out.extend_from_slice(&new[lit..i]);
        if out.len() >= limit {
            return false;
        }
    }
    true
}

impl Stage for XorDelta {
    fn name(&self) -> &'static str {
        "xor-delta"
    }

    fn encode(&self, unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.shard(unit);
        let applied = match shard.cache.get(&unit) {
            Some(old) if old.data.len() == input.len() => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                encode_runs(&old.data, input, input.len() / 2, out)
            }
            _ => false,
        };
        shard.remember(unit, input, self.shard_capacity);
        applied
    }

    fn note_plain(&self, unit: Unit, data: &[u8]) {
        self.shard(unit).remember(unit, data, self.shard_capacity);
    }

    fn forget(&self, unit: Unit) {
        self.shard(unit).forget(unit);
    }

    fn reset(&self) {
        for s in &self.shards {
            *s.lock().unwrap_or_else(|p| p.into_inner()) = Shard::default();
        }
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.lookups.load(Ordering::Relaxed),
        )
    }

    fn decode(
        &self,
        _unit: Unit,
        input: &[u8],
        base: &[u8],
        out: &mut Vec<u8>,
        _max_len: usize,
    ) -> Result<(), CodecError> {
        out.clear();
        out.extend_from_slice(base);
        let mut pos = 0;
        let mut at = 0usize;
        while pos < input.len() {
            let skip = get_uleb(input, &mut pos)?;
            let len = get_uleb(input, &mut pos)?;
            at = at
                .checked_add(skip)
                .filter(|a| *a <= out.len())
                .ok_or(CodecError::Malformed {
                    codec: "xor-delta",
                    reason: "run past the end of the unit".into(),
                })?;
            let end =
                at.checked_add(len)
                    .filter(|e| *e <= out.len())
                    .ok_or(CodecError::Malformed {
                        codec: "xor-delta",
                        reason: "run past the end of the unit".into(),
                    })?;
            let lit = input.get(pos..pos + len).ok_or(CodecError::Malformed {
                codec: "xor-delta",
                reason: "truncated literal".into(),
            })?;
            out[at..end].copy_from_slice(lit);
            pos += len;
            at = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(i: u64) -> Unit {
        Unit {
            kind: UnitKind::Page,
            index: i,
        }
    }

    #[test]
    fn passes_bigger_than_the_cache_keep_the_units_sent_again() {
        // One shard's worth: 8 units of 64 bytes fit. Versions differ in one byte.
        let x = XorDelta::new(SHARDS * 8 * 64);
        let data = |i: u64, v: u8| {
            let mut d = [i as u8; 64];
            d[0] = v;
            d
        };
        let mut out = Vec::new();
        // Units 0, 16, 32, ... all land in shard 0. First pass: 32 units; the first 8 stay.
        let units: Vec<u64> = (0..32).map(|k| k * SHARDS as u64).collect();
        for &u in &units {
            x.encode(unit(u), &data(u, 1), &mut out);
        }
        // A hot set inside and outside the cached part is sent again and again.
        let hot = [units[0], units[1], units[20], units[21]];
        for v in 2..6 {
            for &u in &hot {
                x.encode(unit(u), &data(u, v), &mut out);
            }
        }
        let before = x.hits.load(Ordering::Relaxed);
        // Another full pass: the cold units sent again may evict, but the hot ones stay.
        for &u in &units {
            x.encode(unit(u), &data(u, 9), &mut out);
        }
        for &u in &hot {
            assert!(x.encode(unit(u), &data(u, 10), &mut out), "unit {u} lost");
        }
        assert!(x.hits.load(Ordering::Relaxed) > before);
    }
}
