//! Pipelines: an ordered list of stages, built per channel. The tag sent with a unit is the
//! bit set of the stages that were applied (bit i = stage i), so a stage that does not pay
//! for a unit is skipped for that unit alone; tag 0 means raw and [`TAG_REFERENCE`] a
//! `dedup` reference. With `dedup` first, its bit means "register this unit's content".
//!
//! A batch is encoded and decoded on rayon's pool: `dedup` hashes in parallel and then
//! looks up and registers in batch order (so both sides number contents alike); every
//! other stage runs per unit in parallel, with history kept per unit. A channel hands its
//! next batch over only when this one is done, so memory stays bounded by the batch and a
//! unit's versions never overtake each other.

use std::ops::Range;
use std::time::{Duration, Instant};

use ferry_core::codec::{
    BatchDecodeError, CodecError, CodecFactory, DecodeItem, Decoder, EncodeItem, Encoder,
    StageStats, Unit, TAG_RAW, TAG_REFERENCE,
};
use ferry_core::wire::CODEC_SLACK;
use rayon::prelude::*;

use crate::auto::Auto;
use crate::dedup::{self, DedupIndex, DedupStore, Lookup};
use crate::group;
use crate::lz4::Lz4;
use crate::spec::{parse_spec, Parsed, SpecError, StageSpec, MAX_STAGES, ZSTD_LEVEL};
use crate::stage::Stage;
use crate::xor_delta::XorDelta;
use crate::zstd_stage::Zstd;

/// Batches smaller than this are coded on the calling thread: handing one or two units
/// to the pool costs more than it saves.
const PARALLEL_FROM: usize = 4;

/// Default bytes of last-sent versions the `xor-delta` stage keeps per channel.
pub const XOR_CACHE: usize = 64 << 20;

/// A parsed `--codec` value; builds per-channel encoders and decoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    parsed: Parsed,
    xor_cache: usize,
}

/// Parses a `--codec` value such as `lz4`, `raw`, `auto` or `dedup,xor-delta,zstd:9`.
pub fn parse(spec: &str) -> Result<Pipeline, SpecError> {
    Ok(Pipeline {
        parsed: parse_spec(spec)?,
        xor_cache: XOR_CACHE,
    })
}

/// The stages `auto` chooses among, in tag order: history stages, then compressors.
pub(crate) fn auto_stages() -> Vec<StageSpec> {
    vec![
        StageSpec::Dedup {
            capacity: dedup::DEFAULT_CAPACITY,
        },
        StageSpec::XorDelta,
        StageSpec::Lz4,
        StageSpec::Zstd(ZSTD_LEVEL),
    ]
}

impl Pipeline {
    /// Sets the bytes of last-sent versions `xor-delta` keeps per channel (`--xor-cache`);
    /// only the source uses it, so it is not part of the negotiated spec.
    pub fn with_xor_cache(mut self, bytes: usize) -> Self {
        self.xor_cache = bytes;
        self
    }

    /// The stages, in order (empty for raw; auto's full set for `auto`).
    pub fn stages(&self) -> Vec<StageSpec> {
        match &self.parsed {
            Parsed::Fixed(s) => s.clone(),
            Parsed::Auto => auto_stages(),
        }
    }

    /// Whether the codec is chosen per batch.
    pub fn is_auto(&self) -> bool {
        self.parsed == Parsed::Auto
    }

    fn build(&self) -> Built {
        let specs = self.stages();
        let dedup = match specs.first() {
            Some(StageSpec::Dedup { capacity }) => Some(*capacity),
            _ => None,
        };
        let stages = specs
            .iter()
            .filter_map(|s| -> Option<Box<dyn Stage>> {
                match s {
                    StageSpec::Dedup { .. } => None,
                    StageSpec::XorDelta => Some(Box::new(XorDelta::new(self.xor_cache))),
                    StageSpec::Lz4 => Some(Box::new(Lz4)),
                    StageSpec::Zstd(level) => Some(Box::new(Zstd::new(*level))),
                }
            })
            .collect();
        Built {
            dedup,
            stages,
            names: specs.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A pipeline's stages, built.
pub(crate) struct Built {
    /// The `dedup` store size when `dedup` is stage 0.
    pub(crate) dedup: Option<usize>,
    /// The other stages; stage `j` has tag bit `j + offset()`.
    pub(crate) stages: Vec<Box<dyn Stage>>,
    /// Canonical names of all stages, `dedup` included.
    pub(crate) names: Vec<String>,
}

impl Built {
    fn offset(&self) -> usize {
        usize::from(self.dedup.is_some())
    }

    fn all(&self) -> u8 {
        ((1u16 << self.names.len()) - 1) as u8
    }

    /// The tag bit `dedup` uses to mean "register this unit" (none without `dedup`).
    fn register_bit(&self) -> u8 {
        u8::from(self.dedup.is_some())
    }

    /// The stage that compresses in groups under `mask`: the last enabled stage, when it
    /// is a compressor ([`crate::group`]).
    fn group_stage(&self, mask: u8) -> Option<usize> {
        let later = mask >> self.offset();
        if later == 0 {
            return None;
        }
        let j = 7 - later.leading_zeros() as usize;
        self.stages.get(j).filter(|s| s.groups()).map(|_| j)
    }

    /// The group stage a received unit's tag names, if any (references never group).
    fn group_of(&self, tag: u8) -> Option<usize> {
        if tag & TAG_REFERENCE != 0 {
            return None;
        }
        self.group_stage(tag)
    }
}

impl CodecFactory for Pipeline {
    fn spec(&self) -> String {
        match &self.parsed {
            Parsed::Auto => "auto".into(),
            Parsed::Fixed(s) if s.is_empty() => "raw".into(),
            Parsed::Fixed(s) => s
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    fn encoder(&self) -> Box<dyn Encoder> {
        let built = self.build();
        Box::new(PipelineEncoder {
            index: built.dedup.map(DedupIndex::new),
            stats: built
                .names
                .iter()
                .map(|n| StageStats {
                    stage: n.clone(),
                    ..StageStats::default()
                })
                .collect(),
            auto: self.is_auto().then(Auto::new),
            mask: built.all(),
            built,
        })
    }

    fn decoder(&self) -> Box<dyn Decoder> {
        let built = self.build();
        Box::new(PipelineDecoder {
            store: built.dedup.map(DedupStore::new),
            decode_s: vec![0.0; built.names.len()],
            built,
        })
    }
}

/// One batch's figures per stage, summed across worker threads.
pub(crate) type Deltas = [StageStats; MAX_STAGES];

fn no_deltas() -> Deltas {
    std::array::from_fn(|_| StageStats::default())
}

fn add(mut a: Deltas, b: Deltas) -> Deltas {
    for (x, y) in a.iter_mut().zip(&b) {
        x.add(y);
    }
    a
}

struct PipelineEncoder {
    built: Built,
    index: Option<DedupIndex>,
    stats: Vec<StageStats>,
    auto: Option<Auto>,
    /// Stages enabled for the last batch.
    mask: u8,
}

/// Encodes one unit through the enabled stages after `dedup`.
fn encode_one(
    built: &Built,
    mask: u8,
    it: &mut EncodeItem<'_>,
    register: bool,
    a: &mut Vec<u8>,
    b: &mut Vec<u8>,
) -> Deltas {
    let mut d = no_deltas();
    let off = built.offset();
    if it.tag == TAG_REFERENCE {
        // The destination's copy is now this content: history stages follow it.
        for st in &built.stages {
            st.note_plain(it.unit, it.data);
        }
        return d;
    }
    let mut tag = 0u8;
    let mut have = false; // whether `a` holds the current intermediate
    for (j, st) in built.stages.iter().enumerate() {
        let bit = 1u8 << (j + off);
        if mask & bit == 0 {
            st.forget(it.unit);
            continue;
        }
        let input: &[u8] = if have { a } else { it.data };
        let started = Instant::now();
        let applied = st.encode(it.unit, input, b);
        let s = &mut d[j + off];
        s.encode_s += started.elapsed().as_secs_f64();
        s.units_in += 1;
        s.bytes_in += input.len() as u64;
        if applied {
            s.units_applied += 1;
            s.bytes_in_applied += input.len() as u64;
            s.bytes_out += b.len() as u64;
            std::mem::swap(a, b);
            have = true;
            tag |= bit;
        }
    }
    let register_bit = u8::from(register);
    if have && a.len() < it.data.len() {
        it.tag = tag | register_bit;
        std::mem::swap(&mut it.out, a);
    } else if register {
        it.tag = register_bit;
        it.out.extend_from_slice(it.data);
    } else {
        it.tag = TAG_RAW;
    }
    d
}

impl PipelineEncoder {
    /// When `auto` switches to raw, the engine stops showing units to the encoder: history
    /// that would go stale is dropped now. (`dedup`'s index stays valid: it names content
    /// the destination registered, whatever happens to the units that held it.)
    fn follow_auto(&mut self) {
        let Some(auto) = &self.auto else { return };
        let mask = auto.mask();
        if mask == 0 && self.mask != 0 {
            for st in &self.built.stages {
                st.reset();
            }
        }
        self.mask = mask;
    }

    /// Runs `dedup` over the batch: hashes in parallel, then looks up and registers in
    /// order. Returns which units were registered.
    fn dedup(&mut self, items: &mut [EncodeItem<'_>], d: &mut Deltas) -> Vec<bool> {
        let mut registered = vec![false; items.len()];
        let Some(index) = self.index.as_mut().filter(|_| self.mask & 1 != 0) else {
            return registered;
        };
        let shared: &DedupIndex = index;
        let hash = |it: &EncodeItem<'_>| {
            let started = Instant::now();
            let h = shared.hash(it.data);
            (h, started.elapsed().as_secs_f64())
        };
        let hashes: Vec<(u128, f64)> = if items.len() < PARALLEL_FROM {
            items.iter().map(hash).collect()
        } else {
            items.par_iter().map(hash).collect()
        };
        let s = &mut d[0];
        for ((it, (h, ns)), reg) in items.iter_mut().zip(hashes).zip(&mut registered) {
            s.units_in += 1;
            s.bytes_in += it.data.len() as u64;
            s.encode_s += ns;
            match index.lookup(h, it.data.len()) {
                Lookup::Known(distance) => {
                    it.tag = TAG_REFERENCE;
                    dedup::encode_reference(distance, &mut it.out);
                    s.units_applied += 1;
                    s.bytes_in_applied += it.data.len() as u64;
                    s.bytes_out += it.out.len() as u64;
                }
                Lookup::Registered => *reg = true,
                Lookup::TooLarge => {}
            }
        }
        registered
    }
}

impl Encoder for PipelineEncoder {
    fn encode_batch(&mut self, items: &mut [EncodeItem<'_>]) {
        let started = Instant::now();
        for it in items.iter_mut() {
            it.tag = TAG_RAW;
            it.out.clear();
        }
        let mut deltas = no_deltas();
        let registered = self.dedup(items, &mut deltas);
        let built = &self.built;
        let off = built.offset();
        // The group stage runs over the batch once the per-unit stages are done.
        let group = built.group_stage(self.mask);
        let mask = match group {
            Some(j) => self.mask & !(1 << (j + off)),
            None => self.mask,
        };
        let rest = if items.len() < PARALLEL_FROM {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            items
                .iter_mut()
                .zip(&registered)
                .map(|(it, reg)| encode_one(built, mask, it, *reg, &mut a, &mut b))
                .fold(no_deltas(), add)
        } else {
            items
                .par_iter_mut()
                .zip(registered.par_iter())
                .map_init(
                    || (Vec::new(), Vec::new()),
                    |(a, b), (it, reg)| encode_one(built, mask, it, *reg, a, b),
                )
                .reduce(no_deltas, add)
        };
        let mut deltas = add(deltas, rest);
        if let Some(j) = group {
            let bit = 1u8 << (j + off);
            let earlier = (bit - 1) & !built.register_bit();
            group::encode(&*built.stages[j], bit, earlier, items, &mut deltas[j + off]);
        }
        for (st, d) in self.stats.iter_mut().zip(&deltas) {
            st.add(d);
        }
        if let Some(auto) = &mut self.auto {
            auto.after_batch(items, &deltas, started.elapsed());
        }
        self.follow_auto();
    }

    fn is_raw(&self) -> bool {
        self.built.names.is_empty() || self.auto.as_ref().is_some_and(|a| a.mask() == 0)
    }

    fn decodes_against_base(&self) -> bool {
        self.built.stages.iter().any(|s| s.needs_base())
    }

    fn sample_raw(&mut self, unit: Unit, data: &[u8]) -> bool {
        match &mut self.auto {
            Some(auto) if auto.wants_sample() => {
                auto.trial_unit(unit, data);
                self.follow_auto();
                true
            }
            _ => false,
        }
    }

    fn note_sent_plain(&mut self, unit: Unit, data: &[u8]) {
        let off = self.built.offset();
        for (j, st) in self.built.stages.iter().enumerate() {
            if self.mask & (1 << (j + off)) != 0 {
                st.note_plain(unit, data);
            } else {
                st.forget(unit);
            }
        }
    }

    fn note_link(&mut self, wire_bytes: u64, send: Duration, wall: Duration) {
        if let Some(auto) = &mut self.auto {
            auto.note_link(wire_bytes, send, wall);
        }
        self.follow_auto();
    }

    fn stats(&self) -> Vec<StageStats> {
        let off = self.built.offset();
        let mut out = self.stats.clone();
        if let (Some(index), Some(s)) = (&self.index, out.first_mut()) {
            s.cache_hits = index.hits;
            s.cache_lookups = index.lookups;
        }
        for (j, st) in self.built.stages.iter().enumerate() {
            let (hits, lookups) = st.cache_stats();
            out[j + off].cache_hits = hits;
            out[j + off].cache_lookups = lookups;
        }
        out
    }

    fn choices(&self) -> Vec<(String, u64)> {
        self.auto.as_ref().map(Auto::choices).unwrap_or_default()
    }
}

struct PipelineDecoder {
    built: Built,
    store: Option<DedupStore>,
    decode_s: Vec<f64>,
}

/// Decodes one unit through the stages its tag names (references are resolved later, in
/// order). A group member arrives with `grouped`: its group stage and what decoding the
/// group gave for it.
fn decode_one(
    built: &Built,
    it: &mut DecodeItem<'_>,
    grouped: Option<(usize, &[u8])>,
    a: &mut Vec<u8>,
    b: &mut Vec<u8>,
) -> Result<Deltas, CodecError> {
    let mut d = no_deltas();
    let size = it.target.len();
    let mut later = it.tag >> built.offset();
    if it.tag == TAG_REFERENCE {
        return Ok(d);
    }
    let mut first = it.input;
    if let Some((j, intermediate)) = grouped {
        later &= !(1 << j);
        first = intermediate;
    }
    if later == 0 {
        // Raw, or registered raw.
        if first.len() != size {
            return Err(CodecError::WrongSize {
                got: first.len(),
                expected: size,
            });
        }
        it.target.copy_from_slice(first);
        return Ok(d);
    }
    let max_len = size + CODEC_SLACK;
    let mut have = false; // whether `a` holds the current intermediate
    for j in (0..built.stages.len()).rev() {
        if later & (1 << j) == 0 {
            continue;
        }
        let input: &[u8] = if have { a } else { first };
        let started = Instant::now();
        built.stages[j].decode(it.unit, input, it.target, b, max_len)?;
        d[j + built.offset()].decode_s += started.elapsed().as_secs_f64();
        std::mem::swap(a, b);
        have = true;
    }
    if a.len() != size {
        return Err(CodecError::WrongSize {
            got: a.len(),
            expected: size,
        });
    }
    it.target.copy_from_slice(a);
    Ok(d)
}

/// What decoding a batch's groups gave: the decoded groups, for each item its group stage,
/// group and the range of its intermediate there (None outside groups), and the seconds
/// each group stage took.
struct Grouped {
    blocks: Vec<Vec<u8>>,
    members: Vec<Option<(usize, usize, Range<usize>)>>,
    secs: Vec<(usize, f64)>,
}

impl Grouped {
    /// Item `i`'s group stage and intermediate, if it was in a group.
    fn of(&self, i: usize) -> Option<(usize, &[u8])> {
        let (j, b, r) = self.members.get(i)?.as_ref()?;
        Some((*j, &self.blocks[*b][r.clone()]))
    }
}

/// Decodes the groups of a batch ([`crate::group`]) in parallel.
fn decode_groups(built: &Built, items: &[DecodeItem<'_>]) -> Result<Grouped, BatchDecodeError> {
    let mut grouped = Grouped {
        blocks: Vec::new(),
        members: vec![None; items.len()],
        secs: Vec::new(),
    };
    let failed = |i: usize, error| BatchDecodeError {
        unit: items[i].unit,
        error,
    };
    let groups = group::find(items, |tag| built.group_of(tag)).map_err(|(i, e)| failed(i, e))?;
    if groups.is_empty() {
        return Ok(grouped);
    }
    let one = |(j, members): &(usize, Vec<usize>)| {
        let started = Instant::now();
        let unit = items[members[0]].target.len();
        group::decode(&*built.stages[*j], items, members, unit)
            .map(|decoded| (decoded, started.elapsed().as_secs_f64()))
            .map_err(|e| failed(members[0], e))
    };
    let decoded: Vec<_> = if groups.len() < 2 {
        groups.iter().map(one).collect::<Result<_, _>>()?
    } else {
        groups.par_iter().map(one).collect::<Result<_, _>>()?
    };
    for ((j, members), ((block, parts), s)) in groups.iter().zip(decoded) {
        let b = grouped.blocks.len();
        grouped.blocks.push(block);
        grouped.secs.push((*j, s));
        for (&i, part) in members.iter().zip(parts) {
            grouped.members[i] = Some((*j, b, part));
        }
    }
    Ok(grouped)
}

impl Decoder for PipelineDecoder {
    fn decode_batch(&mut self, items: &mut [DecodeItem<'_>]) -> Result<(), BatchDecodeError> {
        let n = self.built.names.len();
        for it in items.iter() {
            let known = if it.tag == TAG_REFERENCE {
                self.store.is_some()
            } else {
                it.tag & TAG_REFERENCE == 0 && u32::from(it.tag) >> n == 0
            };
            if !known {
                return Err(BatchDecodeError {
                    unit: it.unit,
                    error: CodecError::UnknownTag(it.tag),
                });
            }
        }
        let built = &self.built;
        let grouped = decode_groups(built, items)?;
        let one = |k: usize, it: &mut DecodeItem<'_>, a: &mut Vec<u8>, b: &mut Vec<u8>| {
            decode_one(built, it, grouped.of(k), a, b).map_err(|error| BatchDecodeError {
                unit: it.unit,
                error,
            })
        };
        let mut deltas = if items.len() < PARALLEL_FROM {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            items
                .iter_mut()
                .enumerate()
                .try_fold(no_deltas(), |acc, (k, it)| {
                    one(k, it, &mut a, &mut b).map(|d| add(acc, d))
                })?
        } else {
            items
                .par_iter_mut()
                .enumerate()
                .map_init(
                    || (Vec::new(), Vec::new()),
                    |(a, b), (k, it)| one(k, it, a, b),
                )
                .try_reduce(no_deltas, |x, y| Ok(add(x, y)))?
        };
        for (j, secs) in &grouped.secs {
            deltas[j + built.offset()].decode_s += secs;
        }
        for (s, d) in self.decode_s.iter_mut().zip(&deltas) {
            *s += d.decode_s;
        }
        if let Some(store) = &mut self.store {
            let started = Instant::now();
            for it in items.iter_mut() {
                let r = if it.tag == TAG_REFERENCE {
                    store.resolve(it.input).and_then(|content| {
                        if content.len() == it.target.len() {
                            it.target.copy_from_slice(content);
                            Ok(())
                        } else {
                            Err(CodecError::WrongSize {
                                got: content.len(),
                                expected: it.target.len(),
                            })
                        }
                    })
                } else if it.tag & 1 != 0 {
                    store.register(it.target)
                } else {
                    Ok(())
                };
                r.map_err(|error| BatchDecodeError {
                    unit: it.unit,
                    error,
                })?;
            }
            self.decode_s[0] += started.elapsed().as_secs_f64();
        }
        Ok(())
    }

    fn is_raw(&self) -> bool {
        self.built.names.is_empty()
    }

    fn needs_base(&self) -> bool {
        self.built.stages.iter().any(|s| s.needs_base())
    }

    fn decode_seconds(&self) -> Vec<f64> {
        self.decode_s.clone()
    }
}
