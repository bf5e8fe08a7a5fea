//! The codec seam. Implementations live in `ferry-codecs`; the engine only knows these
//! traits. Zero units never reach a codec: the engine sends them as a flag.

use std::time::Duration;

/// What a unit of data is, so stateful codecs can key their history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// A guest memory page.
    Page,
    /// A block of disk number `n`.
    Block(u16),
}

/// A page or block by kind and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Unit {
    /// Page or block.
    pub kind: UnitKind,
    /// Page frame number or block number.
    pub index: u64,
}

/// The tag that means "stored raw": the engine copies such data itself.
pub const TAG_RAW: u8 = 0;

/// The tag bit that means "a reference to content the destination already holds" (the
/// `dedup` stage); the other seven bits name the pipeline stages that were applied.
pub const TAG_REFERENCE: u8 = 0x80;

/// One unit of a batch handed to [`Encoder::encode_batch`].
#[derive(Debug)]
pub struct EncodeItem<'a> {
    /// Which unit.
    pub unit: Unit,
    /// Its current content (never all zero: zero units travel as a flag).
    pub data: &'a [u8],
    /// Set by the encoder: [`TAG_RAW`] (send `data` as is, `out` left empty) or the tag the
    /// decoder needs for `out`.
    pub tag: u8,
    /// Set by the encoder: the encoded unit (empty for [`TAG_RAW`]).
    pub out: Vec<u8>,
}

/// Encodes units for one channel. Stateful encoders see a unit's versions in order,
/// because the engine pins every unit to one channel and hands batches over in order.
pub trait Encoder: Send {
    /// Encodes every item of one batch, in any order or in parallel, but with history
    /// updated as if the items were encoded one after another in slice order. An encoder
    /// never makes a unit bigger than raw by more than a few bytes of framing.
    fn encode_batch(&mut self, items: &mut [EncodeItem<'_>]);
    /// Encodes one unit into `out` (appending) and returns its tag; [`TAG_RAW`] leaves
    /// `out` untouched.
    fn encode(&mut self, unit: Unit, data: &[u8], out: &mut Vec<u8>) -> u8 {
        let mut item = [EncodeItem {
            unit,
            data,
            tag: TAG_RAW,
            out: Vec::new(),
        }];
        self.encode_batch(&mut item);
        let [item] = item;
        if item.tag != TAG_RAW {
            out.extend_from_slice(&item.out);
        }
        item.tag
    }
    /// Whether this encoder encodes nothing for the next batch: the engine then sends the
    /// batch raw without showing it to the encoder (only offering units to
    /// [`Encoder::sample_raw`]). An encoder with history must drop what would go stale
    /// before saying so.
    fn is_raw(&self) -> bool {
        false
    }
    /// Whether the destination decodes some unit against its own current copy (delta
    /// stages). Post-copy units then go raw: a page's copy is the very page owed (it would
    /// fault on itself), and an owed block's copy may be the guest's newer write.
    /// Conservative by default.
    fn decodes_against_base(&self) -> bool {
        true
    }
    /// Offers a unit sent raw while [`Encoder::is_raw`] holds, for adaptive encoders that
    /// measure candidates; returns whether it wants more.
    fn sample_raw(&mut self, _unit: Unit, _data: &[u8]) -> bool {
        false
    }
    /// Tells the encoder the unit was sent raw or as zero without passing through it
    /// (so history stays in step).
    fn note_sent_plain(&mut self, _unit: Unit, _data: &[u8]) {}
    /// What the link did with the last batch: `wire_bytes` left in `send` time (waiting
    /// for the socket or the bandwidth cap) out of `wall` time since the previous batch.
    /// Adaptive encoders measure the link with it.
    fn note_link(&mut self, _wire_bytes: u64, _send: Duration, _wall: Duration) {}
    /// What each stage did so far on this channel.
    fn stats(&self) -> Vec<StageStats> {
        Vec::new()
    }
    /// For adaptive encoders: batches encoded with each choice so far.
    fn choices(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// One unit of a batch handed to [`Decoder::decode_batch`]. Units that arrived raw or zero
/// never reach a decoder (no codec keeps history of them on the destination: deltas use the
/// destination's own copy, and `dedup` registers only what the encoder marked).
#[derive(Debug)]
pub struct DecodeItem<'a> {
    /// Which unit.
    pub unit: Unit,
    /// The tag it arrived with.
    pub tag: u8,
    /// The bytes that arrived.
    pub input: &'a [u8],
    /// Where the decoded unit goes; it holds the destination's current copy on entry when
    /// [`Decoder::needs_base`] says so.
    pub target: &'a mut [u8],
}

/// A decoding failure of one item of a batch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{unit:?}: {error}")]
pub struct BatchDecodeError {
    /// The unit that failed.
    pub unit: Unit,
    /// Why.
    #[source]
    pub error: CodecError,
}

/// One pipeline stage's figures on one channel (summed over channels in the report).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Stage spec (`lz4`, `zstd:3`, `xor-delta`).
    pub stage: String,
    /// Units offered to the stage.
    pub units_in: u64,
    /// Units for which the stage paid off (its output was used).
    pub units_applied: u64,
    /// Bytes offered to the stage.
    pub bytes_in: u64,
    /// Bytes it produced for the units it applied to.
    pub bytes_out: u64,
    /// Bytes offered for the units it applied to (for its ratio).
    pub bytes_in_applied: u64,
    /// CPU time spent in the stage's encoder, seconds.
    pub encode_s: f64,
    /// CPU time spent in the stage's decoder on the destination, seconds.
    #[serde(default)]
    pub decode_s: f64,
    /// For history-keeping stages: lookups that found a previous version.
    pub cache_hits: u64,
    /// For history-keeping stages: lookups.
    pub cache_lookups: u64,
    /// `bytes_in_applied / bytes_out` (set when the figures are final).
    #[serde(default)]
    pub ratio: f64,
}

impl StageStats {
    /// Adds another channel's figures for the same stage.
    pub fn add(&mut self, o: &StageStats) {
        self.units_in += o.units_in;
        self.units_applied += o.units_applied;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.bytes_in_applied += o.bytes_in_applied;
        self.encode_s += o.encode_s;
        self.decode_s += o.decode_s;
        self.cache_hits += o.cache_hits;
        self.cache_lookups += o.cache_lookups;
    }

    /// Compression ratio where the stage applied (input over output).
    pub fn applied_ratio(&self) -> f64 {
        if self.bytes_out == 0 {
            0.0
        } else {
            self.bytes_in_applied as f64 / self.bytes_out as f64
        }
    }
}

/// Decodes units for one channel.
pub trait Decoder: Send {
    /// Decodes every item of one batch (in any order or in parallel, with history updated
    /// in slice order). Input is hostile: any inconsistency is an error, never a panic.
    fn decode_batch(&mut self, items: &mut [DecodeItem<'_>]) -> Result<(), BatchDecodeError>;
    /// Decodes one unit encoded with `tag` into `target`.
    fn decode(
        &mut self,
        unit: Unit,
        tag: u8,
        input: &[u8],
        target: &mut [u8],
    ) -> Result<(), CodecError> {
        let mut item = [DecodeItem {
            unit,
            tag,
            input,
            target,
        }];
        self.decode_batch(&mut item).map_err(|e| e.error)
    }
    /// Whether this decoder never decodes anything (the engine then writes raw units
    /// straight from the frame).
    fn is_raw(&self) -> bool {
        false
    }
    /// Whether `target` must hold the current content before decoding (delta codecs).
    fn needs_base(&self) -> bool {
        false
    }
    /// Decoding CPU seconds per stage so far, in pipeline order.
    fn decode_seconds(&self) -> Vec<f64> {
        Vec::new()
    }
}

/// Builds the encoders and decoders of one codec pipeline.
pub trait CodecFactory: Send + Sync {
    /// The canonical pipeline spec (e.g. `lz4` or `xor-delta,lz4`), sent in the handshake.
    fn spec(&self) -> String;
    /// A fresh encoder for one channel.
    fn encoder(&self) -> Box<dyn Encoder>;
    /// A fresh decoder for one channel.
    fn decoder(&self) -> Box<dyn Decoder>;
}

/// A decoding failure: the peer sent something this codec did not produce.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The tag names stages this pipeline does not have.
    #[error("unknown codec tag {0:#04x}")]
    UnknownTag(u8),
    /// The encoded data is malformed.
    #[error("{codec}: {reason}")]
    Malformed {
        /// Codec name.
        codec: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The decoded size does not match the unit size.
    #[error("decoded {got} bytes, expected {expected}")]
    WrongSize {
        /// Bytes produced.
        got: usize,
        /// Unit size.
        expected: usize,
    },
}
