//! XOR-delta against the version of a unit last sent, in the spirit of QEMU's XBZRLE: the
//! encoder XORs the new version with the cached old one and writes alternating runs —
//! a ULEB128 length of unchanged bytes, then a ULEB128 length of changed bytes followed by
//! those bytes of the *new* version. The destination's own copy of the unit is the base.
//! An unchanged unit costs a few bytes. When the delta is not smaller than half the unit,
//! the stage steps aside and the next stage sees the raw data.
//!
//! The cache of last-sent versions is bounded (`capacity` bytes per channel); a unit not
//! in it is simply sent without a delta. Every version sent, however it was encoded, updates
//! the cache, so the encoder's idea of the destination's copy never drifts.

use std::collections::{HashMap, VecDeque};

use ferry_core::codec::{CodecError, Unit};

use crate::pipeline::Stage;

/// The `xor-delta` stage.
pub struct XorDelta {
    cache: HashMap<Unit, Box<[u8]>>,
    order: VecDeque<Unit>,
    bytes: usize,
    capacity: usize,
    /// Units whose previous version was in the cache.
    pub hits: u64,
    /// Units looked up.
    pub lookups: u64,
}

impl XorDelta {
    /// A stage keeping at most `capacity` bytes of last-sent versions.
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            capacity,
            hits: 0,
            lookups: 0,
        }
    }

    fn remember(&mut self, unit: Unit, data: &[u8]) {
        if data.len() > self.capacity {
            return;
        }
        if let Some(old) = self.cache.get_mut(&unit) {
            if old.len() == data.len() {
                old.copy_from_slice(data);
                return;
            }
        }
        while self.bytes + data.len() > self.capacity {
            let Some(victim) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.cache.remove(&victim) {
                self.bytes -= v.len();
            }
        }
        if let Some(v) = self.cache.insert(unit, data.into()) {
            self.bytes -= v.len();
        } else {
            self.order.push_back(unit);
        }
        self.bytes += data.len();
    }
}

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
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

fn get_uleb(input: &[u8], pos: &mut usize) -> Result<usize, CodecError> {
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

    fn encode(&mut self, unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        self.lookups += 1;
        let applied = match self.cache.get(&unit) {
            Some(old) if old.len() == input.len() => {
                self.hits += 1;
                encode_runs(old, input, input.len() / 2, out)
            }
            _ => false,
        };
        self.remember(unit, input);
        applied
    }

    fn note_plain(&mut self, unit: Unit, data: &[u8]) {
        self.remember(unit, data);
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn cache_stats(&self) -> (u64, u64) {
        (self.hits, self.lookups)
    }

    fn decode(
        &mut self,
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
