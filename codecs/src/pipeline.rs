//! Pipelines: an ordered list of stages. The tag sent with a unit is the bit set of the
//! stages that were applied (bit i = stage i), so a stage that does not pay for a unit is
//! skipped for that unit alone; tag 0 means raw and never reaches a decoder.

use ferry_core::codec::{CodecError, CodecFactory, Decoder, Encoder, StageStats, Unit, TAG_RAW};
use ferry_core::wire::CODEC_SLACK;

use crate::lz4::Lz4;
use crate::xor_delta::XorDelta;
use crate::zstd_stage::Zstd;

/// Names of the stages this build knows, in their canonical spelling (`zstd` takes a
/// level: `zstd:1` … `zstd:22`, 3 by default).
pub const STAGE_NAMES: &[&str] = &["raw", "lz4", "zstd", "xor-delta"];

/// Default zstd level.
const ZSTD_LEVEL: i32 = 3;
/// Last-sent versions the `xor-delta` stage keeps per channel.
pub const XOR_CACHE: usize = 64 << 20;

/// Most stages a pipeline may have (the tag is a 7-bit set).
const MAX_STAGES: usize = 7;

/// One step of a pipeline.
pub trait Stage: Send {
    /// Canonical name.
    fn name(&self) -> &'static str;
    /// Encodes `input` into `out` (replacing its content); false when it does not pay.
    fn encode(&mut self, unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool;
    /// Decodes `input` into `out` (replacing its content), producing at most `max_len`
    /// bytes; `base` is the destination's current copy of the unit (for deltas). Hostile
    /// input: errors, never panics.
    fn decode(
        &mut self,
        unit: Unit,
        input: &[u8],
        base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError>;
    /// The unit was sent as `data` without this stage (history stays in step).
    fn note_plain(&mut self, _unit: Unit, _data: &[u8]) {}
    /// Whether decoding needs the destination's current copy.
    fn needs_base(&self) -> bool {
        false
    }
    /// (hits, lookups) of a history cache, for stages that keep one.
    fn cache_stats(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// A bad `--codec` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Nothing given.
    #[error("empty codec list")]
    Empty,
    /// Unknown stage name.
    #[error("unknown codec {name:?} (known: {known})")]
    Unknown {
        /// The name given.
        name: String,
        /// Known names.
        known: String,
    },
    /// A stage listed twice.
    #[error("codec {0:?} is listed twice")]
    Duplicate(String),
    /// `raw` combined with others.
    #[error("\"raw\" means no encoding and cannot be combined with other codecs")]
    RawCombined,
    /// Too many stages.
    #[error("at most {MAX_STAGES} codecs in one pipeline")]
    TooMany,
    /// A bad parameter.
    #[error("{0}")]
    BadParameter(String),
    /// Stages in an order that cannot work.
    #[error("{0}")]
    Order(String),
}

/// A parsed pipeline spec; builds per-channel encoders and decoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// Canonical stage specs (`lz4`, `zstd:3`, `xor-delta`).
    stages: Vec<String>,
}

/// Parses a comma-separated spec such as `lz4` or `raw`.
pub fn parse(spec: &str) -> Result<Pipeline, SpecError> {
    let names: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        return Err(SpecError::Empty);
    }
    if names.len() > MAX_STAGES {
        return Err(SpecError::TooMany);
    }
    let mut stages: Vec<String> = Vec::new();
    for n in &names {
        let (name, param) = match n.split_once(':') {
            Some((a, b)) => (a.trim(), Some(b.trim())),
            None => (*n, None),
        };
        let canon = STAGE_NAMES
            .iter()
            .find(|k| k.eq_ignore_ascii_case(name))
            .ok_or_else(|| SpecError::Unknown {
                name: (*n).to_string(),
                known: STAGE_NAMES.join(", "),
            })?;
        let spec = match (*canon, param) {
            ("zstd", p) => {
                let level = match p {
                    None => ZSTD_LEVEL,
                    Some(p) => p
                        .parse::<i32>()
                        .ok()
                        .filter(|l| (1..=22).contains(l))
                        .ok_or_else(|| {
                            SpecError::BadParameter(format!("zstd level {p:?} is not 1..=22"))
                        })?,
                };
                format!("zstd:{level}")
            }
            (c, Some(p)) => {
                return Err(SpecError::BadParameter(format!(
                    "{c} takes no parameter ({p:?})"
                )))
            }
            (c, None) => c.to_string(),
        };
        let base = spec.split(':').next().unwrap_or_default().to_string();
        if stages
            .iter()
            .any(|s| s.split(':').next() == Some(base.as_str()))
        {
            return Err(SpecError::Duplicate(base));
        }
        stages.push(spec);
    }
    if stages.iter().any(|s| s == "raw") {
        if stages.len() > 1 {
            return Err(SpecError::RawCombined);
        }
        stages.clear();
    }
    // A delta is computed against the raw unit, so it must come before any compressor.
    if let Some(i) = stages.iter().position(|s| s == "xor-delta") {
        if i > 0 {
            return Err(SpecError::Order(format!(
                "xor-delta must come before {} (it compares raw units)",
                stages[..i].join(", ")
            )));
        }
    }
    Ok(Pipeline { stages })
}

/// Builds a stage from its canonical spec (`parse` admits only known, valid ones).
fn build(spec: &str) -> Box<dyn Stage> {
    match spec.split_once(':') {
        Some(("zstd", level)) => Box::new(Zstd::new(level.parse().unwrap_or(ZSTD_LEVEL))),
        _ if spec == "xor-delta" => Box::new(XorDelta::new(XOR_CACHE)),
        _ => Box::new(Lz4),
    }
}

impl Pipeline {
    /// The stage specs, in order (empty for raw).
    pub fn stages(&self) -> &[String] {
        &self.stages
    }
}

impl CodecFactory for Pipeline {
    fn spec(&self) -> String {
        if self.stages.is_empty() {
            "raw".into()
        } else {
            self.stages.join(",")
        }
    }

    fn encoder(&self) -> Box<dyn Encoder> {
        Box::new(PipelineEncoder {
            stages: self.stages.iter().map(|n| build(n)).collect(),
            specs: self.stages.clone(),
            stats: vec![StageStats::default(); self.stages.len()],
            a: Vec::new(),
            b: Vec::new(),
        })
    }

    fn decoder(&self) -> Box<dyn Decoder> {
        Box::new(PipelineDecoder {
            stages: self.stages.iter().map(|n| build(n)).collect(),
            a: Vec::new(),
            b: Vec::new(),
        })
    }
}

struct PipelineEncoder {
    stages: Vec<Box<dyn Stage>>,
    specs: Vec<String>,
    stats: Vec<StageStats>,
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Encoder for PipelineEncoder {
    fn encode(&mut self, unit: Unit, data: &[u8], out: &mut Vec<u8>) -> u8 {
        let mut tag = 0u8;
        let mut have = false; // whether self.a holds the current intermediate
        for (i, st) in self.stages.iter_mut().enumerate() {
            let input: &[u8] = if have { &self.a } else { data };
            let started = std::time::Instant::now();
            let applied = st.encode(unit, input, &mut self.b);
            let stats = &mut self.stats[i];
            stats.encode_s += started.elapsed().as_secs_f64();
            stats.units_in += 1;
            stats.bytes_in += input.len() as u64;
            if applied {
                stats.units_applied += 1;
                stats.bytes_in_applied += input.len() as u64;
                stats.bytes_out += self.b.len() as u64;
                std::mem::swap(&mut self.a, &mut self.b);
                have = true;
                tag |= 1 << i;
            }
        }
        if tag == TAG_RAW || self.a.len() >= data.len() {
            return TAG_RAW;
        }
        out.extend_from_slice(&self.a);
        tag
    }

    fn note_sent_plain(&mut self, unit: Unit, data: &[u8]) {
        for st in &mut self.stages {
            st.note_plain(unit, data);
        }
    }

    fn stats(&self) -> Vec<StageStats> {
        self.stats
            .iter()
            .zip(&self.stages)
            .zip(&self.specs)
            .map(|((s, st), spec)| {
                let (cache_hits, cache_lookups) = st.cache_stats();
                StageStats {
                    stage: spec.clone(),
                    cache_hits,
                    cache_lookups,
                    ..s.clone()
                }
            })
            .collect()
    }
}

struct PipelineDecoder {
    stages: Vec<Box<dyn Stage>>,
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Decoder for PipelineDecoder {
    fn needs_base(&self) -> bool {
        self.stages.iter().any(|s| s.needs_base())
    }

    fn decode(
        &mut self,
        unit: Unit,
        tag: u8,
        input: &[u8],
        target: &mut [u8],
    ) -> Result<(), CodecError> {
        if tag == TAG_RAW || u32::from(tag) >> self.stages.len() != 0 {
            return Err(CodecError::UnknownTag(tag));
        }
        let max_len = target.len() + CODEC_SLACK;
        self.a.clear();
        self.a.extend_from_slice(input);
        for i in (0..self.stages.len()).rev() {
            if tag & (1 << i) != 0 {
                self.stages[i].decode(unit, &self.a, target, &mut self.b, max_len)?;
                std::mem::swap(&mut self.a, &mut self.b);
            }
        }
        if self.a.len() != target.len() {
            return Err(CodecError::WrongSize {
                got: self.a.len(),
                expected: target.len(),
            });
        }
        target.copy_from_slice(&self.a);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::codec::UnitKind;
    use proptest::prelude::*;

    fn unit(i: u64) -> Unit {
        Unit {
            kind: UnitKind::Page,
            index: i,
        }
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!(parse("raw").unwrap().spec(), "raw");
        assert_eq!(parse(" LZ4 ").unwrap().spec(), "lz4");
        assert_eq!(parse(""), Err(SpecError::Empty));
        assert!(matches!(parse("lz5"), Err(SpecError::Unknown { .. })));
        assert!(parse("lz5")
            .unwrap_err()
            .to_string()
            .contains("known: raw, lz4"));
        assert_eq!(parse("lz4,lz4"), Err(SpecError::Duplicate("lz4".into())));
        assert_eq!(parse("raw,lz4"), Err(SpecError::RawCombined));
    }

    fn page(seed: u64, compressible: bool) -> Vec<u8> {
        let mut x = seed | 1;
        (0..4096)
            .map(|i| {
                if compressible && i % 64 > 8 {
                    0x41
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn roundtrip_every_pipeline(seeds in proptest::collection::vec((any::<u64>(), any::<bool>()), 1..20)) {
            for spec in ["raw", "lz4"] {
                let p = parse(spec).unwrap();
                let mut enc = p.encoder();
                let mut dec = p.decoder();
                for (i, (seed, comp)) in seeds.iter().enumerate() {
                    let data = page(*seed, *comp);
                    let mut out = Vec::new();
                    let tag = enc.encode(unit(i as u64), &data, &mut out);
                    if tag == TAG_RAW {
                        prop_assert!(out.is_empty());
                        continue;
                    }
                    prop_assert!(out.len() < data.len());
                    let mut target = vec![0u8; 4096];
                    dec.decode(unit(i as u64), tag, &out, &mut target).unwrap();
                    prop_assert_eq!(&target, &data);
                }
            }
        }

        #[test]
        fn malformed_input_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), tag in 0u8..=255) {
            let p = parse("lz4").unwrap();
            let mut dec = p.decoder();
            let mut target = vec![0u8; 4096];
            let _ = dec.decode(unit(0), tag, &bytes, &mut target);
        }
    }

    const SPECS: &[&str] = &[
        "raw",
        "lz4",
        "zstd",
        "zstd:9",
        "xor-delta",
        "xor-delta,lz4",
        "xor-delta,zstd:1",
    ];

    /// A page that evolves: `flips` bytes change at pseudo-random places.
    fn evolve(page: &mut [u8], seed: u64, flips: usize) {
        let mut x = seed | 1;
        for _ in 0..flips {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % page.len();
            page[i] = (x >> 32) as u8;
        }
    }

    proptest! {
        #[test]
        fn every_pipeline_roundtrips_random_version_histories(
            steps in proptest::collection::vec((0u64..6, any::<u64>(), 0usize..300, any::<bool>()), 1..60)
        ) {
            for spec in SPECS {
                let p = parse(spec).unwrap();
                let mut enc = p.encoder();
                let mut dec = p.decoder();
                // The source's current pages and the destination's copies.
                let mut src: Vec<Vec<u8>> = (0..6).map(|i| page(i, i % 2 == 0)).collect();
                let mut dst: Vec<Vec<u8>> = vec![vec![0u8; 4096]; 6];
                for (u, seed, flips, zero) in &steps {
                    let i = *u as usize;
                    if *zero {
                        src[i].fill(0);
                    } else {
                        evolve(&mut src[i], *seed, *flips);
                    }
                    let unit = unit(*u);
                    let data = src[i].clone();
                    if data.iter().all(|b| *b == 0) {
                        // The engine sends a zero flag and tells the codec.
                        enc.note_sent_plain(unit, &data);
                        dst[i].fill(0);
                        continue;
                    }
                    let mut out = Vec::new();
                    let tag = enc.encode(unit, &data, &mut out);
                    if tag == TAG_RAW {
                        dst[i].copy_from_slice(&data);
                        continue;
                    }
                    prop_assert!(out.len() < data.len(), "{spec}: not smaller");
                    let mut target = dst[i].clone();
                    dec.decode(unit, tag, &out, &mut target).unwrap();
                    prop_assert_eq!(&target, &data, "{} decoded wrong", spec);
                    dst[i] = target;
                }
            }
        }

        #[test]
        fn malformed_input_never_panics_any_pipeline(bytes in proptest::collection::vec(any::<u8>(), 0..600), tag in 1u8..=3) {
            for spec in SPECS {
                let mut dec = parse(spec).unwrap().decoder();
                let mut target = vec![7u8; 4096];
                let _ = dec.decode(unit(0), tag, &bytes, &mut target);
            }
        }
    }

    #[test]
    fn an_unchanged_page_costs_almost_nothing_with_xor_delta() {
        let p = parse("xor-delta").unwrap();
        let mut enc = p.encoder();
        let data = page(3, false);
        let mut out = Vec::new();
        assert_eq!(
            enc.encode(unit(1), &data, &mut out),
            TAG_RAW,
            "first version has no base"
        );
        out.clear();
        let tag = enc.encode(unit(1), &data, &mut out);
        assert_ne!(tag, TAG_RAW);
        assert!(out.len() <= 2, "{} bytes for an unchanged page", out.len());
        let mut d2 = data.clone();
        d2[100] ^= 1;
        d2[3000] ^= 1;
        out.clear();
        enc.encode(unit(1), &d2, &mut out);
        assert!(out.len() < 16, "{} bytes for a two-byte change", out.len());
        let mut target = data.clone();
        p.decoder().decode(unit(1), 1, &out, &mut target).unwrap();
        assert_eq!(target, d2);
    }

    #[test]
    fn specs_with_parameters_and_orders() {
        assert_eq!(parse("zstd").unwrap().spec(), "zstd:3");
        assert_eq!(parse("ZSTD:19").unwrap().spec(), "zstd:19");
        assert!(matches!(parse("zstd:0"), Err(SpecError::BadParameter(_))));
        assert!(matches!(parse("zstd:x"), Err(SpecError::BadParameter(_))));
        assert!(matches!(parse("lz4:2"), Err(SpecError::BadParameter(_))));
        assert!(matches!(parse("lz4,xor-delta"), Err(SpecError::Order(_))));
        assert_eq!(
            parse("zstd:3,zstd:5"),
            Err(SpecError::Duplicate("zstd".into()))
        );
        assert_eq!(parse("xor-delta,lz4").unwrap().spec(), "xor-delta,lz4");
    }

    #[test]
    fn truncated_and_lying_lz4_is_rejected() {
        let p = parse("lz4").unwrap();
        let data = page(5, true);
        let mut out = Vec::new();
        let tag = p.encoder().encode(unit(0), &data, &mut out);
        assert_eq!(tag, 1);
        let mut target = vec![0u8; 4096];
        for cut in 0..out.len() {
            assert!(p
                .decoder()
                .decode(unit(0), tag, &out[..cut], &mut target)
                .is_err());
        }
        let mut lie = out.clone();
        lie[..4].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(p.decoder().decode(unit(0), tag, &lie, &mut target).is_err());
        assert_eq!(
            p.decoder().decode(unit(0), 2, &out, &mut target),
            Err(CodecError::UnknownTag(2))
        );
    }
}
