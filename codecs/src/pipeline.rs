//! Pipelines: an ordered list of stages. The tag sent with a unit is the bit set of the
//! stages that were applied (bit i = stage i), so a stage that does not pay for a unit is
//! skipped for that unit alone; tag 0 means raw and never reaches a decoder.

use ferry_core::codec::{CodecError, CodecFactory, Decoder, Encoder, Unit, TAG_RAW};
use ferry_core::wire::CODEC_SLACK;

use crate::lz4::Lz4;

/// Names of the stages this build knows, in their canonical spelling.
pub const STAGE_NAMES: &[&str] = &["raw", "lz4"];

/// Most stages a pipeline may have (the tag is a 7-bit set).
const MAX_STAGES: usize = 7;

/// One step of a pipeline.
pub trait Stage: Send {
    /// Canonical name.
    fn name(&self) -> &'static str;
    /// Encodes `input` into `out` (replacing its content); false when it does not pay.
    fn encode(&mut self, unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool;
    /// Decodes `input` into `out` (replacing its content), producing at most `max_len`
    /// bytes. Hostile input: errors, never panics.
    fn decode(
        &mut self,
        unit: Unit,
        input: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError>;
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
}

/// A parsed pipeline spec; builds per-channel encoders and decoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    stages: Vec<&'static str>,
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
    let mut stages = Vec::new();
    for n in &names {
        let canon = STAGE_NAMES
            .iter()
            .find(|k| k.eq_ignore_ascii_case(n))
            .ok_or_else(|| SpecError::Unknown {
                name: (*n).to_string(),
                known: STAGE_NAMES.join(", "),
            })?;
        if stages.contains(canon) {
            return Err(SpecError::Duplicate((*canon).to_string()));
        }
        stages.push(*canon);
    }
    if stages.contains(&"raw") {
        if stages.len() > 1 {
            return Err(SpecError::RawCombined);
        }
        stages.clear();
    }
    Ok(Pipeline { stages })
}

/// Builds a stage by canonical name. `parse` admits only known names, and lz4 is the
/// only non-raw stage so far; the next codecs add arms here.
fn build(_name: &str) -> Box<dyn Stage> {
    Box::new(Lz4)
}

impl Pipeline {
    /// The stage names, in order (empty for raw).
    pub fn stages(&self) -> &[&'static str] {
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
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Encoder for PipelineEncoder {
    fn encode(&mut self, unit: Unit, data: &[u8], out: &mut Vec<u8>) -> u8 {
        let mut tag = 0u8;
        let mut have = false; // whether self.a holds the current intermediate
        for (i, st) in self.stages.iter_mut().enumerate() {
            let input: &[u8] = if have { &self.a } else { data };
            if st.encode(unit, input, &mut self.b) {
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
}

struct PipelineDecoder {
    stages: Vec<Box<dyn Stage>>,
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Decoder for PipelineDecoder {
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
                self.stages[i].decode(unit, &self.a, &mut self.b, max_len)?;
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
