//! The codec seam. Implementations live in `ferry-codecs`; the engine only knows these
//! traits. Zero units never reach a codec: the engine sends them as a flag.

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

/// Encodes units for one channel. Stateful encoders see a unit's versions in order,
/// because the engine pins every unit to one channel.
pub trait Encoder: Send {
    /// Encodes `data`, appending to `out`, and returns a non-zero tag the decoder needs;
    /// or returns [`TAG_RAW`] with `out` untouched when encoding does not pay (a codec
    /// never makes a unit bigger than raw).
    fn encode(&mut self, unit: Unit, data: &[u8], out: &mut Vec<u8>) -> u8;
    /// Tells the encoder the unit was sent raw or as zero (so history stays in step).
    fn note_sent_plain(&mut self, _unit: Unit, _data: &[u8]) {}
    /// What each stage did so far on this channel.
    fn stats(&self) -> Vec<StageStats> {
        Vec::new()
    }
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
    /// For history-keeping stages: lookups that found a previous version.
    pub cache_hits: u64,
    /// For history-keeping stages: lookups.
    pub cache_lookups: u64,
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
        self.cache_hits += o.cache_hits;
        self.cache_lookups += o.cache_lookups;
    }

    /// Compression ratio where the stage applied (input over output).
    pub fn ratio(&self) -> f64 {
        if self.bytes_out == 0 {
            0.0
        } else {
            self.bytes_in_applied as f64 / self.bytes_out as f64
        }
    }
}

/// Decodes units for one channel.
pub trait Decoder: Send {
    /// Decodes `input` encoded with `tag` into `target`, whose current content is the
    /// destination's copy of the unit (the base for delta codecs). Input is hostile: any
    /// inconsistency is an error, never a panic.
    fn decode(
        &mut self,
        unit: Unit,
        tag: u8,
        input: &[u8],
        target: &mut [u8],
    ) -> Result<(), CodecError>;
    /// Whether `target` must hold the current content before `decode` (delta codecs).
    fn needs_base(&self) -> bool {
        false
    }
    /// Tells the decoder a unit arrived raw or as zero.
    fn note_received_plain(&mut self, _unit: Unit, _data: &[u8]) {}
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
