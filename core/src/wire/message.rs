//! Message bodies. Every decoder bounds-checks and returns [`DecodeError`], never panics.
//! The layout of each message is documented in `docs/protocol.md`.

pub use super::batch::{Batch, BatchBuilder, BatchKind, RecordIter, UnitRecord};
use super::cursor::{put_str, Cursor};
use super::handshake::{decode_hello, encode_hello, get_identity, put_identity};
pub use super::handshake::{Hello, VerifyMode, Welcome};
use crate::basecmp::{Digest, CHUNK_BLOCKS};
use crate::bitmap::Bitmap;
use crate::guest::{Base, DiskPlan};
use crate::wire::frame::{FrameHeader, FLAG_RECORD_DIGESTS};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 5;

/// Capability: zero units travel as a flag.
pub const CAP_ZERO_UNITS: u64 = 1 << 0;
/// Capability: per-unit digests and a final manifest.
pub const CAP_DIGESTS: u64 = 1 << 1;
/// Capability: `--verify full` (whole-guest digest during the pause).
pub const CAP_FULL_VERIFY: u64 = 1 << 2;
/// Capability: disk blocks.
pub const CAP_BLOCKS: u64 = 1 << 3;
/// In a hello: this connection recovers the interrupted storage post-copy of the
/// migration it names (the destination holds the guest and still owes blocks).
pub const CAP_RECOVER: u64 = 1 << 4;
/// Everything this build supports.
pub const CAPABILITIES: u64 = CAP_ZERO_UNITS | CAP_DIGESTS | CAP_FULL_VERIFY | CAP_BLOCKS;
/// Capabilities a peer must have for a migration to start.
pub const REQUIRED_CAPABILITIES: u64 = CAP_ZERO_UNITS | CAP_DIGESTS | CAP_BLOCKS;

/// Largest number of disks a guest may have.
pub const MAX_DISKS: usize = 16;
/// The "disk" number that names guest memory in [`Message::OwedBlocks`] and
/// [`Message::PullBlocks`] (memory post-copy): owed pages travel like owed blocks.
pub const MEMORY_SPACE: u16 = u16::MAX;
/// Largest channel count.
pub const MAX_CHANNELS: u16 = 64;
/// Header bytes per unit record.
pub const RECORD_HEADER: usize = 22;
/// Extra bytes an encoded unit may take beyond its size before it is rejected.
pub const CODEC_SLACK: usize = 64;
/// Chunk digests (or requested chunks) in one frame: 1 MiB of digests.
pub const DIGESTS_PER_FRAME: usize = 1 << 16;
/// Words of an owed-block bitmap in one frame: 1 MiB, 8 Mi blocks.
pub const OWED_WORDS_PER_FRAME: usize = 1 << 17;

/// Part of a bitmap too large for one frame: words `first_word..` of a bitmap of `bits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapPart {
    /// Bits of the whole bitmap.
    pub bits: u64,
    /// The first word of this part.
    pub first_word: u64,
    /// The words.
    pub words: Vec<u64>,
}

/// The owed-blocks messages of `disk` for bitmap `owed`, in order (at least one).
pub fn owed_parts(disk: u16, owed: &Bitmap) -> Vec<Message<'static>> {
    let words = owed.words();
    let mut out: Vec<Message<'static>> = words
        .chunks(OWED_WORDS_PER_FRAME)
        .enumerate()
        .map(|(k, w)| Message::OwedBlocks {
            disk,
            part: BitmapPart {
                bits: owed.len(),
                first_word: (k * OWED_WORDS_PER_FRAME) as u64,
                words: w.to_vec(),
            },
        })
        .collect();
    if out.is_empty() {
        out.push(Message::OwedBlocks {
            disk,
            part: BitmapPart {
                bits: owed.len(),
                first_word: 0,
                words: Vec::new(),
            },
        });
    }
    out
}

/// Puts a bitmap back together from its parts, which must come in order.
#[derive(Debug)]
pub struct BitmapAssembler {
    bits: u64,
    words: Vec<u64>,
}

impl BitmapAssembler {
    /// Expects a bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        Self {
            bits,
            words: Vec::new(),
        }
    }

    /// Adds the next part; the whole bitmap once it is complete.
    pub fn add(&mut self, part: BitmapPart) -> Result<Option<Bitmap>, String> {
        let want = self.bits.div_ceil(64);
        if part.bits != self.bits || part.first_word != self.words.len() as u64 {
            return Err(format!(
                "bitmap part at word {} of {} bits, expected word {} of {}",
                part.first_word,
                part.bits,
                self.words.len(),
                self.bits
            ));
        }
        if self.words.len() as u64 + part.words.len() as u64 > want {
            return Err("bitmap parts run past its end".into());
        }
        self.words.extend_from_slice(&part.words);
        if self.words.len() as u64 == want {
            return Bitmap::from_words(std::mem::take(&mut self.words), self.bits)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        Ok(None)
    }
}

/// The most a batch may decode to (one unit more when units are larger): a sender puts
/// 256 KiB in a frame; a receiver stages at most this much per batch.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Message type numbers.
pub mod ty {
    /// Source → destination: handshake.
    pub const HELLO: u8 = 1;
    /// Destination → source: handshake accepted.
    pub const WELCOME: u8 = 2;
    /// Destination → source: handshake refused.
    pub const REFUSE: u8 = 3;
    /// A batch of pages.
    pub const PAGES: u8 = 4;
    /// A batch of blocks of one disk.
    pub const BLOCKS: u8 = 5;
    /// End-of-round barrier on one channel.
    pub const ROUND_END: u8 = 6;
    /// The vCPU/device state.
    pub const STATE: u8 = 7;
    /// The final digests.
    pub const MANIFEST: u8 = 8;
    /// Destination → source: final state received and verified.
    pub const VERIFIED: u8 = 9;
    /// Source → destination: hand-over; the destination owns the guest now.
    pub const COMMIT: u8 = 10;
    /// Destination → source: the guest runs on the destination.
    pub const RESUMED: u8 = 11;
    /// Destination → source: the guest's own check after resuming.
    pub const VERDICT: u8 = 12;
    /// Either way: the migration is abandoned.
    pub const ABORT: u8 = 13;
    /// Source → destination, after `welcome`: what to do with each disk's base.
    pub const STORAGE_PLAN: u8 = 14;
    /// Destination → source: chunk digests of a base to hash-compare.
    pub const BASE_DIGESTS: u8 = 15;
    /// Source → destination: the chunks whose block digests it needs.
    pub const DIGEST_REQUEST: u8 = 16;
    /// Destination → source: block digests of requested chunks.
    pub const BLOCK_DIGESTS: u8 = 17;
    /// Source → destination, storage post-copy: blocks still owed at the pause.
    pub const OWED_BLOCKS: u8 = 18;
    /// Source → destination after commit: owed blocks (batch format of `BLOCKS`).
    pub const POSTCOPY_BLOCKS: u8 = 19;
    /// Destination → source: owed blocks the running guest is waiting for.
    pub const PULL_BLOCKS: u8 = 20;
    /// Source → destination: every owed block was sent; the final disk digest sums.
    pub const POSTCOPY_DONE: u8 = 21;
    /// Destination → source: every channel's barrier of a pre-copy round was processed.
    pub const ROUND_ACK: u8 = 22;
    /// Destination → source: units received so far (a heartbeat while data flows, so a
    /// slow link is not mistaken for a dead one).
    pub const PROGRESS: u8 = 23;
    /// Source → destination after commit: owed pages (batch format of `PAGES`).
    pub const POSTCOPY_PAGES: u8 = 24;
}

/// Most chunks in one block-digests frame (64 KiB of digests each way per 1000 chunks).
pub const CHUNKS_PER_FRAME: usize = 4096;

/// A decoding error: the peer's bytes are malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ended early.
    #[error("{what}: body truncated")]
    Truncated {
        /// Message being decoded.
        what: &'static str,
    },
    /// Bytes left over after a complete message.
    #[error("{what}: {extra} trailing bytes")]
    Trailing {
        /// Message being decoded.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// An unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A field holds an invalid value.
    #[error("{what}: {reason}")]
    Invalid {
        /// Message being decoded.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
}

pub(super) const MAX_NAME: usize = 255;
pub(super) const MAX_TEXT: usize = 4096;

/// Which phase a round belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Storage pre-copy.
    Storage,
    /// Memory pre-copy.
    Memory,
    /// Stop-and-copy.
    Final,
    /// Owed blocks pushed after the hand-over (storage post-copy).
    PostCopy,
}

impl Phase {
    fn code(self) -> u8 {
        match self {
            Phase::Storage => 1,
            Phase::Memory => 2,
            Phase::Final => 3,
            Phase::PostCopy => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Phase::Storage),
            2 => Some(Phase::Memory),
            3 => Some(Phase::Final),
            4 => Some(Phase::PostCopy),
            _ => None,
        }
    }

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Storage => "storage",
            Phase::Memory => "memory",
            Phase::Final => "stop-and-copy",
            Phase::PostCopy => "post-copy",
        }
    }
}

/// End-of-round barrier on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Phase of the round.
    pub phase: Phase,
    /// Round number within the migration (monotonic across phases).
    pub round: u32,
}

/// The final digests the destination checks before acknowledging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Sum of page digests.
    pub pages: u64,
    /// Sum of block digests per disk.
    pub disks: Vec<u64>,
    /// With `--verify full`: the freshly computed whole-guest sums (pages, then disks).
    pub full: Option<(u64, Vec<u64>)>,
}

/// The destination's result of its guest's own check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the oracle passed (or no oracle exists and the manifest matched).
    pub ok: bool,
    /// Pages checked by the oracle.
    pub pages_checked: u64,
    /// Blocks checked by the oracle.
    pub blocks_checked: u64,
    /// Detail for a human.
    pub detail: String,
    /// Decoding CPU time per codec stage on the destination, nanoseconds, in pipeline
    /// order (summed over channels).
    pub decode_ns: Vec<u64>,
    /// Memory post-copy: the guest's faults on owed pages, and fault-to-installed
    /// latency in microseconds (median, 99th percentile, worst).
    pub faults: u64,
    /// See `faults`.
    pub fault_latency_us: [u64; 3],
}

/// Every message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Handshake.
    Hello(Hello),
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake refused, with the reason.
    Refuse(String),
    /// Pages or blocks.
    Batch(Batch<'a>),
    /// Barrier.
    RoundEnd(RoundEnd),
    /// vCPU/device state with its format version.
    State {
        /// Format version.
        version: u32,
        /// Encoded state (borrowed from the frame when decoded, owned once it is passed
        /// between threads).
        bytes: std::borrow::Cow<'a, [u8]>,
    },
    /// Final digests.
    Manifest(Manifest),
    /// Final state verified; microseconds the destination spent verifying.
    Verified {
        /// Time spent verifying and flushing.
        verify_us: u64,
    },
    /// Hand-over.
    Commit,
    /// Resumed on the destination; microseconds from commit to running.
    Resumed {
        /// Time from receiving commit to the guest running.
        resume_us: u64,
    },
    /// The guest's own check.
    Verdict(Verdict),
    /// Abandoned, with the reason.
    Abort(String),
    /// Per-disk plan.
    StoragePlan(Vec<DiskPlan>),
    /// Chunk digests of disk `disk`'s base, chunks `first..first + digests.len()` of
    /// `total` (a large disk's take several frames, in order).
    BaseDigests {
        /// Disk number.
        disk: u16,
        /// The first chunk of this part.
        first: u32,
        /// Chunks of the disk.
        total: u32,
        /// One digest per chunk.
        digests: Vec<Digest>,
    },
    /// Some of the chunks of `disk` whose block digests the source needs; `last` ends the
    /// request. Each part is answered (block digests, ending `last`) before the next.
    DigestRequest {
        /// Disk number.
        disk: u16,
        /// Whether this is the last part of the request.
        last: bool,
        /// Chunk numbers.
        chunks: Vec<u32>,
    },
    /// Part of the blocks of `disk` still owed at the pause (storage post-copy); the
    /// parts come in order ([`owed_parts`], [`BitmapAssembler`]).
    OwedBlocks {
        /// Disk number.
        disk: u16,
        /// This part of the bitmap.
        part: BitmapPart,
    },
    /// Owed blocks the destination's guest is waiting for.
    PullBlocks {
        /// Disk number.
        disk: u16,
        /// Block numbers.
        blocks: Vec<u64>,
    },
    /// Every owed unit was sent: the source's digest sum per disk, then guest memory's
    /// (one more than the guest has disks).
    PostcopyDone(Vec<u64>),
    /// The destination processed round `0` on every channel.
    RoundAck(u32),
    /// Units the destination received so far.
    Progress(u64),
    /// Block digests of requested chunks; `last` ends the answer.
    BlockDigests {
        /// Disk number.
        disk: u16,
        /// Whether this is the last frame of the answer.
        last: bool,
        /// (chunk, the digests of its blocks).
        chunks: Vec<(u32, Vec<Digest>)>,
    },
}

impl Message<'_> {
    /// The message with its data owned, to pass between threads; `None` for data
    /// (batches, barriers) and handshakes, which are handled where they are read.
    pub fn into_control(self) -> Option<Message<'static>> {
        Some(match self {
            Message::Hello(_) | Message::Batch(_) | Message::RoundEnd(_) => return None,
            Message::State { version, bytes } => Message::State {
                version,
                bytes: std::borrow::Cow::Owned(bytes.into_owned()),
            },
            Message::Welcome(w) => Message::Welcome(w),
            Message::Refuse(s) => Message::Refuse(s),
            Message::Manifest(m) => Message::Manifest(m),
            Message::Verified { verify_us } => Message::Verified { verify_us },
            Message::Commit => Message::Commit,
            Message::Resumed { resume_us } => Message::Resumed { resume_us },
            Message::Verdict(v) => Message::Verdict(v),
            Message::Abort(s) => Message::Abort(s),
            Message::StoragePlan(p) => Message::StoragePlan(p),
            Message::BaseDigests {
                disk,
                first,
                total,
                digests,
            } => Message::BaseDigests {
                disk,
                first,
                total,
                digests,
            },
            Message::DigestRequest { disk, last, chunks } => {
                Message::DigestRequest { disk, last, chunks }
            }
            Message::OwedBlocks { disk, part } => Message::OwedBlocks { disk, part },
            Message::PullBlocks { disk, blocks } => Message::PullBlocks { disk, blocks },
            Message::PostcopyDone(s) => Message::PostcopyDone(s),
            Message::RoundAck(r) => Message::RoundAck(r),
            Message::Progress(n) => Message::Progress(n),
            Message::BlockDigests { disk, last, chunks } => {
                Message::BlockDigests { disk, last, chunks }
            }
        })
    }

    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refuse(_) => "refuse",
            Message::Batch(_) => "batch",
            Message::RoundEnd(_) => "round-end",
            Message::State { .. } => "state",
            Message::Manifest(_) => "manifest",
            Message::Verified { .. } => "verified",
            Message::Commit => "commit",
            Message::Resumed { .. } => "resumed",
            Message::Verdict(_) => "verdict",
            Message::Abort(_) => "abort",
            Message::StoragePlan(_) => "storage-plan",
            Message::BaseDigests { .. } => "base-digests",
            Message::DigestRequest { .. } => "digest-request",
            Message::BlockDigests { .. } => "block-digests",
            Message::OwedBlocks { .. } => "owed-blocks",
            Message::PullBlocks { .. } => "pull-blocks",
            Message::PostcopyDone(_) => "postcopy-done",
            Message::RoundAck(_) => "round-ack",
            Message::Progress(_) => "progress",
        }
    }

    /// Decodes a frame: like [`Message::decode`], honouring the header's flags.
    pub fn decode_frame<'b>(h: &FrameHeader, body: &'b [u8]) -> Result<Message<'b>, DecodeError> {
        if h.flags & FLAG_RECORD_DIGESTS == 0 {
            return Message::decode(h.ty, body);
        }
        if ![
            ty::PAGES,
            ty::BLOCKS,
            ty::POSTCOPY_BLOCKS,
            ty::POSTCOPY_PAGES,
        ]
        .contains(&h.ty)
        {
            return Err(DecodeError::Invalid {
                what: "frame",
                reason: format!("record-digest flag on message type {}", h.ty),
            });
        }
        match Message::decode(h.ty, body)? {
            Message::Batch(mut b) => {
                b.header_crc = Some(h.body_crc);
                Ok(Message::Batch(b))
            }
            _ => Err(DecodeError::UnknownType(h.ty)),
        }
    }

    /// Decodes a frame body of type `ty` whose body CRC was checked.
    pub fn decode(ty: u8, body: &[u8]) -> Result<Message<'_>, DecodeError> {
        use ty::*;
        match ty {
            HELLO => decode_hello(body).map(Message::Hello),
            WELCOME => {
                let mut c = Cursor::new(body, "welcome");
                let version = c.u16()?;
                let capabilities = c.u64()?;
                let migration_id = c.array()?;
                let n = c.u16()? as usize;
                if n > MAX_DISKS {
                    return Err(c.invalid(format!("{n} disks")));
                }
                let bases = (0..n)
                    .map(|_| {
                        if c.data.get(c.pos) == Some(&2) {
                            c.pos += 1;
                            return Ok(Base::Raw);
                        }
                        Ok(match get_identity(&mut c)? {
                            None => Base::None,
                            Some(i) => Base::Identity(i),
                        })
                    })
                    .collect::<Result<Vec<_>, DecodeError>>()?;
                let m = Welcome {
                    version,
                    capabilities,
                    migration_id,
                    bases,
                };
                c.end()?;
                Ok(Message::Welcome(m))
            }
            REFUSE | ABORT => {
                let mut c = Cursor::new(body, if ty == REFUSE { "refuse" } else { "abort" });
                let s = c.string(MAX_TEXT)?;
                c.end()?;
                Ok(if ty == REFUSE {
                    Message::Refuse(s)
                } else {
                    Message::Abort(s)
                })
            }
            PAGES | BLOCKS | POSTCOPY_BLOCKS | POSTCOPY_PAGES => {
                let mut c = Cursor::new(body, "batch");
                let kind = match ty {
                    PAGES => BatchKind::Pages,
                    POSTCOPY_PAGES => BatchKind::OwedPages,
                    BLOCKS => BatchKind::Blocks(c.u16()?),
                    _ => BatchKind::OwedBlocks(c.u16()?),
                };
                let round = c.u32()?;
                let count = c.u32()?;
                // Each record needs at least its header: reject absurd counts up front.
                if (count as usize).saturating_mul(RECORD_HEADER) > body.len() {
                    return Err(c.invalid(format!("{count} records cannot fit")));
                }
                let prefix = &body[..c.pos];
                Ok(Message::Batch(Batch {
                    kind,
                    round,
                    count,
                    prefix,
                    records: c.rest(),
                    header_crc: None,
                }))
            }
            ROUND_END => {
                let mut c = Cursor::new(body, "round-end");
                let p = c.u8()?;
                let phase = Phase::from_code(p).ok_or_else(|| c.invalid(format!("phase {p}")))?;
                let round = c.u32()?;
                c.end()?;
                Ok(Message::RoundEnd(RoundEnd { phase, round }))
            }
            STATE => {
                let mut c = Cursor::new(body, "state");
                let version = c.u32()?;
                Ok(Message::State {
                    version,
                    bytes: std::borrow::Cow::Borrowed(c.rest()),
                })
            }
            MANIFEST => {
                let mut c = Cursor::new(body, "manifest");
                let pages = c.u64()?;
                let n = c.u16()? as usize;
                if n > MAX_DISKS {
                    return Err(c.invalid(format!("{n} disks")));
                }
                let disks = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
                let full = match c.u8()? {
                    0 => None,
                    1 => {
                        let p = c.u64()?;
                        let d = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
                        Some((p, d))
                    }
                    f => return Err(c.invalid(format!("full flag {f}"))),
                };
                c.end()?;
                Ok(Message::Manifest(Manifest { pages, disks, full }))
            }
            VERIFIED | RESUMED => {
                let mut c = Cursor::new(body, "ack");
                let v = c.u64()?;
                c.end()?;
                Ok(if ty == VERIFIED {
                    Message::Verified { verify_us: v }
                } else {
                    Message::Resumed { resume_us: v }
                })
            }
            COMMIT => {
                Cursor::new(body, "commit").end()?;
                Ok(Message::Commit)
            }
            BASE_DIGESTS => {
                let mut c = Cursor::new(body, "base-digests");
                let disk = c.u16()?;
                let first = c.u32()?;
                let total = c.u32()?;
                let n = c.u32()? as usize;
                if n > DIGESTS_PER_FRAME
                    || n.saturating_mul(16) > body.len()
                    || u64::from(first) + n as u64 > u64::from(total)
                {
                    return Err(c.invalid(format!(
                        "{n} digests from chunk {first} of {total} cannot fit"
                    )));
                }
                let digests = (0..n).map(|_| c.array()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::BaseDigests {
                    disk,
                    first,
                    total,
                    digests,
                })
            }
            DIGEST_REQUEST => {
                let mut c = Cursor::new(body, "digest-request");
                let disk = c.u16()?;
                let last = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(c.invalid(format!("last flag {v}"))),
                };
                let n = c.u32()? as usize;
                if n > DIGESTS_PER_FRAME {
                    return Err(c.invalid(format!("{n} chunks in one request")));
                }
                if n.saturating_mul(4) > body.len() {
                    return Err(c.invalid(format!("{n} chunks cannot fit")));
                }
                let chunks = (0..n).map(|_| c.u32()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::DigestRequest { disk, last, chunks })
            }
            BLOCK_DIGESTS => {
                let mut c = Cursor::new(body, "block-digests");
                let disk = c.u16()?;
                let last = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(c.invalid(format!("last flag {v}"))),
                };
                let n = c.u32()? as usize;
                if n > CHUNKS_PER_FRAME {
                    return Err(c.invalid(format!("{n} chunks in one frame")));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    let chunk = c.u32()?;
                    let k = usize::from(c.u8()?);
                    if k == 0 || k as u64 > CHUNK_BLOCKS {
                        return Err(c.invalid(format!("{k} blocks in a chunk")));
                    }
                    let d = (0..k).map(|_| c.array()).collect::<Result<Vec<_>, _>>()?;
                    chunks.push((chunk, d));
                }
                c.end()?;
                Ok(Message::BlockDigests { disk, last, chunks })
            }
            OWED_BLOCKS => {
                let mut c = Cursor::new(body, "owed-blocks");
                let disk = c.u16()?;
                let bits = c.u64()?;
                let first_word = c.u64()?;
                let n = c.u32()? as u64;
                if bits > (1 << 40)
                    || n > OWED_WORDS_PER_FRAME as u64
                    || n.saturating_mul(8) > body.len() as u64
                    || first_word.saturating_add(n) > bits.div_ceil(64)
                {
                    return Err(c.invalid(format!(
                        "{n} words from {first_word} of a {bits}-block bitmap cannot fit"
                    )));
                }
                let words = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::OwedBlocks {
                    disk,
                    part: BitmapPart {
                        bits,
                        first_word,
                        words,
                    },
                })
            }
            PULL_BLOCKS => {
                let mut c = Cursor::new(body, "pull-blocks");
                let disk = c.u16()?;
                let n = c.u32()? as usize;
                if n.saturating_mul(8) > body.len() {
                    return Err(c.invalid(format!("{n} blocks cannot fit")));
                }
                let blocks = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::PullBlocks { disk, blocks })
            }
            PROGRESS => {
                let mut c = Cursor::new(body, "progress");
                let n = c.u64()?;
                c.end()?;
                Ok(Message::Progress(n))
            }
            ROUND_ACK => {
                let mut c = Cursor::new(body, "round-ack");
                let r = c.u32()?;
                c.end()?;
                Ok(Message::RoundAck(r))
            }
            POSTCOPY_DONE => {
                let mut c = Cursor::new(body, "postcopy-done");
                let n = c.u16()? as usize;
                if n > MAX_DISKS + 1 {
                    return Err(c.invalid(format!("{n} sums")));
                }
                let sums = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::PostcopyDone(sums))
            }
            STORAGE_PLAN => {
                let mut c = Cursor::new(body, "storage-plan");
                let n = c.u16()? as usize;
                if n > MAX_DISKS {
                    return Err(c.invalid(format!("{n} disks")));
                }
                let plans = (0..n)
                    .map(|_| match c.u8()? {
                        0 => Ok(DiskPlan::Full),
                        1 => Ok(DiskPlan::Incremental),
                        2 => Ok(DiskPlan::HashCompared),
                        m => Err(c.invalid(format!("disk plan {m}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::StoragePlan(plans))
            }
            VERDICT => {
                let mut c = Cursor::new(body, "verdict");
                let ok = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(c.invalid(format!("ok flag {v}"))),
                };
                let v = Verdict {
                    ok,
                    pages_checked: c.u64()?,
                    blocks_checked: c.u64()?,
                    detail: c.string(MAX_TEXT)?,
                    decode_ns: {
                        let n = c.u8()? as usize;
                        if n > 8 {
                            return Err(c.invalid(format!("{n} codec stages")));
                        }
                        (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?
                    },
                    faults: c.u64()?,
                    fault_latency_us: [c.u64()?, c.u64()?, c.u64()?],
                };
                c.end()?;
                Ok(Message::Verdict(v))
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }

    /// Encodes a control message (not a batch) into `out`; returns its type.
    pub fn encode(&self, out: &mut Vec<u8>) -> u8 {
        use ty::*;
        match self {
            Message::Hello(h) => {
                encode_hello(h, out);
                HELLO
            }
            Message::Welcome(w) => {
                out.extend_from_slice(&w.version.to_le_bytes());
                out.extend_from_slice(&w.capabilities.to_le_bytes());
                out.extend_from_slice(&w.migration_id);
                out.extend_from_slice(&(w.bases.len() as u16).to_le_bytes());
                for b in &w.bases {
                    match b {
                        Base::None => put_identity(out, &None),
                        Base::Identity(i) => put_identity(out, &Some(*i)),
                        Base::Raw => out.push(2),
                    }
                }
                WELCOME
            }
            Message::BaseDigests {
                disk,
                first,
                total,
                digests,
            } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&total.to_le_bytes());
                out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    out.extend_from_slice(d);
                }
                BASE_DIGESTS
            }
            Message::DigestRequest { disk, last, chunks } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.push(u8::from(*last));
                out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for c in chunks {
                    out.extend_from_slice(&c.to_le_bytes());
                }
                DIGEST_REQUEST
            }
            Message::BlockDigests { disk, last, chunks } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.push(u8::from(*last));
                out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for (c, ds) in chunks {
                    out.extend_from_slice(&c.to_le_bytes());
                    out.push(ds.len() as u8);
                    for d in ds {
                        out.extend_from_slice(d);
                    }
                }
                BLOCK_DIGESTS
            }
            Message::OwedBlocks { disk, part } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&part.bits.to_le_bytes());
                out.extend_from_slice(&part.first_word.to_le_bytes());
                out.extend_from_slice(&(part.words.len() as u32).to_le_bytes());
                for w in &part.words {
                    out.extend_from_slice(&w.to_le_bytes());
                }
                OWED_BLOCKS
            }
            Message::PullBlocks { disk, blocks } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
                for b in blocks {
                    out.extend_from_slice(&b.to_le_bytes());
                }
                PULL_BLOCKS
            }
            Message::RoundAck(r) => {
                out.extend_from_slice(&r.to_le_bytes());
                ROUND_ACK
            }
            Message::Progress(n) => {
                out.extend_from_slice(&n.to_le_bytes());
                PROGRESS
            }
            Message::PostcopyDone(sums) => {
                out.extend_from_slice(&(sums.len() as u16).to_le_bytes());
                for x in sums {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                POSTCOPY_DONE
            }
            Message::StoragePlan(plans) => {
                out.extend_from_slice(&(plans.len() as u16).to_le_bytes());
                for p in plans {
                    out.push(match p {
                        DiskPlan::Full => 0,
                        DiskPlan::Incremental => 1,
                        DiskPlan::HashCompared => 2,
                    });
                }
                STORAGE_PLAN
            }
            Message::Refuse(s) => {
                put_str(out, s, MAX_TEXT);
                REFUSE
            }
            Message::Abort(s) => {
                put_str(out, s, MAX_TEXT);
                ABORT
            }
            Message::Batch(b) => {
                if let Some(d) = b.kind.disk() {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&b.round.to_le_bytes());
                out.extend_from_slice(&b.count.to_le_bytes());
                out.extend_from_slice(b.records);
                b.kind.frame_type()
            }
            Message::RoundEnd(r) => {
                out.push(r.phase.code());
                out.extend_from_slice(&r.round.to_le_bytes());
                ROUND_END
            }
            Message::State { version, bytes } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(bytes);
                STATE
            }
            Message::Manifest(m) => {
                out.extend_from_slice(&m.pages.to_le_bytes());
                out.extend_from_slice(&(m.disks.len() as u16).to_le_bytes());
                for d in &m.disks {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                match &m.full {
                    None => out.push(0),
                    Some((p, d)) => {
                        out.push(1);
                        out.extend_from_slice(&p.to_le_bytes());
                        for x in d {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                }
                MANIFEST
            }
            Message::Verified { verify_us } => {
                out.extend_from_slice(&verify_us.to_le_bytes());
                VERIFIED
            }
            Message::Resumed { resume_us } => {
                out.extend_from_slice(&resume_us.to_le_bytes());
                RESUMED
            }
            Message::Commit => COMMIT,
            Message::Verdict(v) => {
                out.push(u8::from(v.ok));
                out.extend_from_slice(&v.pages_checked.to_le_bytes());
                out.extend_from_slice(&v.blocks_checked.to_le_bytes());
                put_str(out, &v.detail, MAX_TEXT);
                let n = v.decode_ns.len().min(8);
                out.push(n as u8);
                for d in &v.decode_ns[..n] {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&v.faults.to_le_bytes());
                for l in v.fault_latency_us {
                    out.extend_from_slice(&l.to_le_bytes());
                }
                VERDICT
            }
        }
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
