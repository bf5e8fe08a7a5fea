//! Message bodies. Every decoder bounds-checks and returns [`DecodeError`], never panics.
//! The layout of each message is documented in `docs/protocol.md`.

use crate::basecmp::{Digest, CHUNK_BLOCKS};
use crate::bitmap::Bitmap;
use crate::guest::{Base, DiskLayout, DiskPlan, GuestLayout};
use crate::image::ImageIdentity;
use crate::wire::frame::{FrameHeader, FLAG_RECORD_DIGESTS};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 1;

/// Capability: zero units travel as a flag.
pub const CAP_ZERO_UNITS: u64 = 1 << 0;
/// Capability: per-unit digests and a final manifest.
pub const CAP_DIGESTS: u64 = 1 << 1;
/// Capability: `--verify full` (whole-guest digest during the pause).
pub const CAP_FULL_VERIFY: u64 = 1 << 2;
/// Capability: disk blocks.
pub const CAP_BLOCKS: u64 = 1 << 3;
/// Everything this build supports.
pub const CAPABILITIES: u64 = CAP_ZERO_UNITS | CAP_DIGESTS | CAP_FULL_VERIFY | CAP_BLOCKS;
/// Capabilities a peer must have for a migration to start.
pub const REQUIRED_CAPABILITIES: u64 = CAP_ZERO_UNITS | CAP_DIGESTS | CAP_BLOCKS;

/// Largest number of disks a guest may have.
pub const MAX_DISKS: usize = 16;
/// Largest channel count.
pub const MAX_CHANNELS: u16 = 64;
/// Header bytes per unit record.
pub const RECORD_HEADER: usize = 22;
/// Extra bytes an encoded unit may take beyond its size before it is rejected.
pub const CODEC_SLACK: usize = 64;

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

/// A bounds-checked little-endian reader over a body.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(DecodeError::Truncated { what: self.what })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn invalid(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            what: self.what,
            reason: reason.into(),
        }
    }

    /// A string with a u16 length prefix, at most `max` bytes, UTF-8.
    fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(self.invalid(format!("string of {len} bytes exceeds {max}")));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.invalid("string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.pos..];
        self.pos = self.data.len();
        s
    }

    fn end(&self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    // Callers never pass more than `max`; cut defensively (at a char boundary).
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Verification mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Per-unit digests kept as units move, compared as sums: no extra downtime.
    Digest,
    /// Also hash the whole guest during the pause (catches missed dirty pages).
    Full,
}

/// The handshake a source opens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Capability bits.
    pub capabilities: u64,
    /// Random id of this migration; every channel carries it (see the transport preamble).
    pub migration_id: [u8; 16],
    /// Number of channels the source opened.
    pub channels: u16,
    /// Verification mode.
    pub verify: VerifyMode,
    /// Codec pipeline spec.
    pub codec: String,
    /// The guest's shape.
    pub layout: GuestLayout,
}

/// Accepted handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Version the destination speaks.
    pub version: u16,
    /// Its capability bits.
    pub capabilities: u64,
    /// Echo of the migration id.
    pub migration_id: [u8; 16],
    /// What the destination already holds, per disk of the hello's layout.
    pub bases: Vec<Base>,
}

fn put_identity(out: &mut Vec<u8>, id: &Option<ImageIdentity>) {
    match id {
        None => out.push(0),
        Some(i) => {
            out.push(1);
            out.extend_from_slice(&i.id);
            out.extend_from_slice(&i.generation.to_le_bytes());
        }
    }
}

fn get_identity(c: &mut Cursor<'_>) -> Result<Option<ImageIdentity>, DecodeError> {
    match c.u8()? {
        0 => Ok(None),
        1 => Ok(Some(ImageIdentity {
            id: c.array()?,
            generation: c.u64()?,
        })),
        f => Err(c.invalid(format!("identity flag {f}"))),
    }
}

/// A unit record inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitRecord<'a> {
    /// Page or block number.
    pub index: u64,
    /// All-zero unit: no data follows.
    pub zero: bool,
    /// Codec tag (0 = raw).
    pub tag: u8,
    /// Digest of the decoded content at this index.
    pub digest: u64,
    /// Encoded bytes.
    pub data: &'a [u8],
}

/// A batch of pages or of one disk's blocks, decoded lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch<'a> {
    /// Disk number for block batches, `None` for pages.
    pub disk: Option<u16>,
    /// Round the batch belongs to.
    pub round: u32,
    /// Number of records.
    pub count: u32,
    /// Owed blocks pushed after the hand-over (storage post-copy).
    pub postcopy: bool,
    /// The prefix bytes (disk, round, count) for the header CRC.
    prefix: &'a [u8],
    records: &'a [u8],
    /// With [`FLAG_RECORD_DIGESTS`]: CRC-32C of prefix and record headers to check.
    header_crc: Option<u32>,
}

impl<'a> Batch<'a> {
    /// Iterates the records, checking each against `unit_size` and `limit` (unit count).
    pub fn records(&self, unit_size: usize, limit: u64) -> RecordIter<'a> {
        RecordIter {
            cur: Cursor::new(self.records, "batch"),
            left: self.count,
            unit_size,
            limit,
            crc: self
                .header_crc
                .map(|want| (crc32c::crc32c(self.prefix), want)),
        }
    }
}

/// Iterator over a batch's records; see [`Batch::records`].
pub struct RecordIter<'a> {
    cur: Cursor<'a>,
    left: u32,
    unit_size: usize,
    limit: u64,
    /// Running CRC over record headers and the value it must reach.
    crc: Option<(u32, u32)>,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<UnitRecord<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            if let Some((got, want)) = self.crc.take() {
                if got != want {
                    self.cur.pos = self.cur.data.len();
                    return Some(Err(self.cur.invalid("record headers fail their checksum")));
                }
            }
            return match self.cur.end() {
                Ok(()) => None,
                Err(e) => {
                    // Report trailing bytes once, then stop.
                    self.cur.pos = self.cur.data.len();
                    Some(Err(e))
                }
            };
        }
        self.left -= 1;
        let r = self.next_record();
        if r.is_err() {
            self.left = 0;
            self.cur.pos = self.cur.data.len();
        }
        Some(r)
    }
}

impl<'a> RecordIter<'a> {
    fn next_record(&mut self) -> Result<UnitRecord<'a>, DecodeError> {
        if let Some((crc, _)) = &mut self.crc {
            let start = self.cur.pos;
            let end = (start + RECORD_HEADER).min(self.cur.data.len());
            *crc = crc32c::crc32c_append(*crc, &self.cur.data[start..end]);
        }
        let index = self.cur.u64()?;
        let kind = self.cur.u8()?;
        let tag = self.cur.u8()?;
        let len = self.cur.u32()? as usize;
        let digest = self.cur.u64()?;
        if index >= self.limit {
            return Err(self
                .cur
                .invalid(format!("unit {index} out of range ({} units)", self.limit)));
        }
        let zero = match kind {
            0 => true,
            1 => false,
            k => return Err(self.cur.invalid(format!("unknown record kind {k}"))),
        };
        if zero && (len != 0 || tag != 0) {
            return Err(self.cur.invalid("zero record carries data"));
        }
        if !zero && tag == 0 && len != self.unit_size {
            return Err(self.cur.invalid(format!(
                "raw record of {len} bytes, unit is {}",
                self.unit_size
            )));
        }
        if len > self.unit_size + CODEC_SLACK {
            return Err(self
                .cur
                .invalid(format!("record of {len} bytes is too large")));
        }
        let data = self.cur.take(len)?;
        Ok(UnitRecord {
            index,
            zero,
            tag,
            digest,
            data,
        })
    }
}

/// Appends records to a batch body being built in a frame buffer.
pub struct BatchBuilder;

impl BatchBuilder {
    /// Writes the batch prefix; returns the offset of the count field to patch.
    pub fn begin(out: &mut Vec<u8>, disk: Option<u16>, round: u32) -> usize {
        if let Some(d) = disk {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&round.to_le_bytes());
        let at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        at
    }

    /// Writes a record header; the caller appends `len` data bytes after it.
    pub fn record(out: &mut Vec<u8>, index: u64, zero: bool, tag: u8, len: usize, digest: u64) {
        out.extend_from_slice(&Self::header(index, zero, tag, len, digest));
    }

    /// A record header.
    pub fn header(index: u64, zero: bool, tag: u8, len: usize, digest: u64) -> [u8; RECORD_HEADER] {
        let mut h = [0u8; RECORD_HEADER];
        h[0..8].copy_from_slice(&index.to_le_bytes());
        h[8] = u8::from(!zero);
        h[9] = tag;
        h[10..14].copy_from_slice(&(len as u32).to_le_bytes());
        h[14..22].copy_from_slice(&digest.to_le_bytes());
        h
    }

    /// Patches the record count at `at`.
    pub fn finish(out: &mut [u8], at: usize, count: u32) {
        out[at..at + 4].copy_from_slice(&count.to_le_bytes());
    }

    /// Byte offset of a record's `len` field relative to the record start (for patching
    /// the length after encoding in place).
    pub const LEN_OFFSET: usize = 10;
}

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
        /// Encoded state.
        bytes: &'a [u8],
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
    /// Chunk digests of disk `disk`'s base.
    BaseDigests {
        /// Disk number.
        disk: u16,
        /// One digest per chunk.
        digests: Vec<Digest>,
    },
    /// The chunks of `disk` whose block digests the source needs.
    DigestRequest {
        /// Disk number.
        disk: u16,
        /// Chunk numbers.
        chunks: Vec<u32>,
    },
    /// Blocks of `disk` still owed at the pause (storage post-copy).
    OwedBlocks {
        /// Disk number.
        disk: u16,
        /// The owed blocks.
        owed: Bitmap,
    },
    /// Owed blocks the destination's guest is waiting for.
    PullBlocks {
        /// Disk number.
        disk: u16,
        /// Block numbers.
        blocks: Vec<u64>,
    },
    /// Every owed block was sent: the source's digest sum per disk.
    PostcopyDone(Vec<u64>),
    /// The destination processed round `0` on every channel.
    RoundAck(u32),
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

const MAX_NAME: usize = 255;
const MAX_TEXT: usize = 4096;

fn check_size(c: &Cursor<'_>, what: &str, v: u32) -> Result<(), DecodeError> {
    if !v.is_power_of_two() || !(512..=(2 << 20)).contains(&v) {
        return Err(c.invalid(format!("{what} {v} is not a power of two in 512..=2MiB")));
    }
    Ok(())
}

impl Message<'_> {
    /// Decodes a frame: like [`Message::decode`], honouring the header's flags.
    pub fn decode_frame<'b>(h: &FrameHeader, body: &'b [u8]) -> Result<Message<'b>, DecodeError> {
        if h.flags & FLAG_RECORD_DIGESTS == 0 {
            return Message::decode(h.ty, body);
        }
        if ![ty::PAGES, ty::BLOCKS, ty::POSTCOPY_BLOCKS].contains(&h.ty) {
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
            PAGES | BLOCKS | POSTCOPY_BLOCKS => {
                let mut c = Cursor::new(body, "batch");
                let disk = if ty == PAGES { None } else { Some(c.u16()?) };
                let round = c.u32()?;
                let count = c.u32()?;
                // Each record needs at least its header: reject absurd counts up front.
                if (count as usize).saturating_mul(RECORD_HEADER) > body.len() {
                    return Err(c.invalid(format!("{count} records cannot fit")));
                }
                let prefix = &body[..c.pos];
                Ok(Message::Batch(Batch {
                    disk,
                    round,
                    count,
                    postcopy: ty == POSTCOPY_BLOCKS,
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
                    bytes: c.rest(),
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
                let n = c.u32()? as usize;
                if n.saturating_mul(16) > body.len() {
                    return Err(c.invalid(format!("{n} digests cannot fit")));
                }
                let digests = (0..n).map(|_| c.array()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::BaseDigests { disk, digests })
            }
            DIGEST_REQUEST => {
                let mut c = Cursor::new(body, "digest-request");
                let disk = c.u16()?;
                let n = c.u32()? as usize;
                if n.saturating_mul(4) > body.len() {
                    return Err(c.invalid(format!("{n} chunks cannot fit")));
                }
                let chunks = (0..n).map(|_| c.u32()).collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                Ok(Message::DigestRequest { disk, chunks })
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
                if bits > (1 << 40) || (bits.div_ceil(64)).saturating_mul(8) > body.len() as u64 {
                    return Err(c.invalid(format!("{bits} blocks cannot fit")));
                }
                let words = (0..bits.div_ceil(64))
                    .map(|_| c.u64())
                    .collect::<Result<Vec<_>, _>>()?;
                c.end()?;
                let owed = Bitmap::from_words(words, bits).map_err(|e| c.invalid(e.to_string()))?;
                Ok(Message::OwedBlocks { disk, owed })
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
            ROUND_ACK => {
                let mut c = Cursor::new(body, "round-ack");
                let r = c.u32()?;
                c.end()?;
                Ok(Message::RoundAck(r))
            }
            POSTCOPY_DONE => {
                let mut c = Cursor::new(body, "postcopy-done");
                let n = c.u16()? as usize;
                if n > MAX_DISKS {
                    return Err(c.invalid(format!("{n} disks")));
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
            Message::BaseDigests { disk, digests } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    out.extend_from_slice(d);
                }
                BASE_DIGESTS
            }
            Message::DigestRequest { disk, chunks } => {
                out.extend_from_slice(&disk.to_le_bytes());
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
            Message::OwedBlocks { disk, owed } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&owed.len().to_le_bytes());
                for w in owed.words() {
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
                if let Some(d) = b.disk {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&b.round.to_le_bytes());
                out.extend_from_slice(&b.count.to_le_bytes());
                out.extend_from_slice(b.records);
                match (b.disk, b.postcopy) {
                    (None, _) => PAGES,
                    (Some(_), false) => BLOCKS,
                    (Some(_), true) => POSTCOPY_BLOCKS,
                }
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
                VERDICT
            }
        }
    }
}

fn encode_hello(h: &Hello, out: &mut Vec<u8>) {
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(&h.capabilities.to_le_bytes());
    out.extend_from_slice(&h.migration_id);
    out.extend_from_slice(&h.channels.to_le_bytes());
    out.push(match h.verify {
        VerifyMode::Digest => 0,
        VerifyMode::Full => 1,
    });
    put_str(out, &h.codec, MAX_TEXT);
    put_str(out, &h.layout.backend, MAX_NAME);
    out.extend_from_slice(&h.layout.page_size.to_le_bytes());
    out.extend_from_slice(&h.layout.pages.to_le_bytes());
    out.extend_from_slice(&(h.layout.disks.len() as u16).to_le_bytes());
    for d in &h.layout.disks {
        put_str(out, &d.name, MAX_NAME);
        out.extend_from_slice(&d.block_size.to_le_bytes());
        out.extend_from_slice(&d.blocks.to_le_bytes());
        put_identity(out, &d.identity);
    }
}

fn decode_hello(body: &[u8]) -> Result<Hello, DecodeError> {
    let mut c = Cursor::new(body, "hello");
    let version = c.u16()?;
    if version != PROTOCOL_VERSION {
        // Nothing after the version is meaningful in another version: stop here.
        return Err(c.invalid(format!(
            "protocol version {version} not supported (this build speaks {PROTOCOL_VERSION})"
        )));
    }
    let capabilities = c.u64()?;
    let migration_id = c.array()?;
    let channels = c.u16()?;
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(c.invalid(format!("{channels} channels (1..={MAX_CHANNELS})")));
    }
    let verify = match c.u8()? {
        0 => VerifyMode::Digest,
        1 => VerifyMode::Full,
        v => return Err(c.invalid(format!("verify mode {v}"))),
    };
    let codec = c.string(MAX_TEXT)?;
    let backend = c.string(MAX_NAME)?;
    let page_size = c.u32()?;
    check_size(&c, "page size", page_size)?;
    let pages = c.u64()?;
    if pages == 0 || pages > (1 << 40) {
        return Err(c.invalid(format!("{pages} pages")));
    }
    let n = c.u16()? as usize;
    if n > MAX_DISKS {
        return Err(c.invalid(format!("{n} disks (at most {MAX_DISKS})")));
    }
    let mut disks = Vec::with_capacity(n);
    for _ in 0..n {
        let name = c.string(MAX_NAME)?;
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(c.invalid(format!("disk name {name:?} is not a plain file name")));
        }
        let block_size = c.u32()?;
        check_size(&c, "block size", block_size)?;
        let blocks = c.u64()?;
        if blocks > (1 << 40) {
            return Err(c.invalid(format!("{blocks} blocks")));
        }
        let identity = get_identity(&mut c)?;
        disks.push(DiskLayout {
            name,
            block_size,
            blocks,
            identity,
        });
    }
    c.end()?;
    Ok(Hello {
        version,
        capabilities,
        migration_id,
        channels,
        verify,
        codec,
        layout: GuestLayout {
            backend,
            page_size,
            pages,
            disks,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            capabilities: CAPABILITIES,
            migration_id: [7; 16],
            channels: 2,
            verify: VerifyMode::Full,
            codec: "lz4".into(),
            layout: GuestLayout {
                backend: "sim".into(),
                page_size: 4096,
                pages: 1000,
                disks: vec![DiskLayout {
                    name: "disk0.img".into(),
                    block_size: 4096,
                    blocks: 10,
                    identity: Some(ImageIdentity {
                        id: [3; 16],
                        generation: 7,
                    }),
                }],
            },
        }
    }

    fn all_messages() -> Vec<Message<'static>> {
        vec![
            Message::Hello(hello()),
            Message::Welcome(Welcome {
                version: 1,
                capabilities: 3,
                migration_id: [1; 16],
                bases: vec![
                    Base::None,
                    Base::Raw,
                    Base::Identity(ImageIdentity {
                        id: [2; 16],
                        generation: 5,
                    }),
                ],
            }),
            Message::StoragePlan(vec![
                DiskPlan::Full,
                DiskPlan::Incremental,
                DiskPlan::HashCompared,
            ]),
            Message::BaseDigests {
                disk: 1,
                digests: vec![[4; 16], [5; 16]],
            },
            Message::OwedBlocks {
                disk: 0,
                owed: {
                    let mut b = Bitmap::new(130);
                    b.set(1);
                    b.set(129);
                    b
                },
            },
            Message::PullBlocks {
                disk: 0,
                blocks: vec![1, 129],
            },
            Message::PostcopyDone(vec![7, 8]),
            Message::RoundAck(12),
            Message::DigestRequest {
                disk: 0,
                chunks: vec![3, 9],
            },
            Message::BlockDigests {
                disk: 0,
                last: true,
                chunks: vec![(3, vec![[1; 16]; 64]), (9, vec![[2; 16]; 5])],
            },
            Message::Refuse("no".into()),
            Message::RoundEnd(RoundEnd {
                phase: Phase::Memory,
                round: 4,
            }),
            Message::State {
                version: 2,
                bytes: b"blob",
            },
            Message::Manifest(Manifest {
                pages: 1,
                disks: vec![2, 3],
                full: Some((4, vec![5, 6])),
            }),
            Message::Manifest(Manifest {
                pages: 1,
                disks: vec![],
                full: None,
            }),
            Message::Verified { verify_us: 9 },
            Message::Commit,
            Message::Resumed { resume_us: 10 },
            Message::Verdict(Verdict {
                ok: true,
                pages_checked: 5,
                blocks_checked: 6,
                detail: "fine".into(),
            }),
            Message::Abort("bye".into()),
        ]
    }

    #[test]
    fn every_control_message_roundtrips() {
        for m in all_messages() {
            let mut body = Vec::new();
            let t = m.encode(&mut body);
            assert_eq!(Message::decode(t, &body).unwrap(), m);
        }
    }

    #[test]
    fn truncated_and_extended_bodies_are_errors() {
        for m in all_messages() {
            let mut body = Vec::new();
            let t = m.encode(&mut body);
            // State takes the rest of the body: only the version prefix can be truncated.
            let cuts = if t == ty::STATE { 0..4 } else { 0..body.len() };
            for cut in cuts {
                assert!(Message::decode(t, &body[..cut]).is_err(), "{m:?} cut {cut}");
            }
            if t != ty::STATE {
                let mut longer = body.clone();
                longer.push(0);
                assert!(Message::decode(t, &longer).is_err(), "{m:?} + trailing");
            }
        }
    }

    #[test]
    fn wrong_version_and_bad_fields_are_refused() {
        let mut body = Vec::new();
        Message::Hello(hello()).encode(&mut body);
        let mut v2 = body.clone();
        v2[0] = 2;
        let e = Message::decode(ty::HELLO, &v2).unwrap_err();
        assert!(e.to_string().contains("version 2 not supported"), "{e}");

        let mut h = hello();
        h.layout.disks[0].name = "../etc/passwd".into();
        let mut b = Vec::new();
        Message::Hello(h).encode(&mut b);
        assert!(Message::decode(ty::HELLO, &b).is_err());

        let mut h = hello();
        h.layout.page_size = 4095;
        let mut b = Vec::new();
        Message::Hello(h).encode(&mut b);
        assert!(Message::decode(ty::HELLO, &b).is_err());

        assert_eq!(Message::decode(99, &[]), Err(DecodeError::UnknownType(99)));
    }

    fn batch_body(records: &[(u64, bool, u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let at = BatchBuilder::begin(&mut out, None, 3);
        for (i, z, t, d) in records {
            BatchBuilder::record(&mut out, *i, *z, *t, d.len(), 42);
            out.extend_from_slice(d);
        }
        BatchBuilder::finish(&mut out, at, records.len() as u32);
        out
    }

    fn collect(body: &[u8]) -> Result<Vec<(u64, bool, usize)>, DecodeError> {
        let Message::Batch(b) = Message::decode(ty::PAGES, body)? else {
            panic!("not a batch")
        };
        b.records(8, 100)
            .map(|r| r.map(|r| (r.index, r.zero, r.data.len())))
            .collect()
    }

    #[test]
    fn digest_flagged_batches_check_their_headers() {
        use crate::wire::frame::{header_with, parse_header, FLAG_RECORD_DIGESTS};
        let body = batch_body(&[(1, false, 0, vec![1; 8]), (2, true, 0, vec![])]);
        // CRC over prefix (round, count) and the two 22-byte headers, not the data.
        let mut covered = body[..8].to_vec();
        covered.extend_from_slice(&body[8..30]);
        covered.extend_from_slice(&body[38..60]);
        let crc = crc32c::crc32c(&covered);
        let decode = |body: &[u8], ty: u8| -> Result<usize, DecodeError> {
            let h = parse_header(&header_with(ty, FLAG_RECORD_DIGESTS, body.len(), crc)).unwrap();
            match Message::decode_frame(&h, body)? {
                Message::Batch(b) => b
                    .records(8, 100)
                    .collect::<Result<Vec<_>, _>>()
                    .map(|v| v.len()),
                _ => unreachable!(),
            }
        };
        assert_eq!(decode(&body, ty::PAGES), Ok(2));
        // Data bytes are not covered by the CRC (their digests are checked after decoding)...
        let mut data_flip = body.clone();
        data_flip[30] ^= 1;
        assert_eq!(decode(&data_flip, ty::PAGES), Ok(2));
        // ...but every header byte and the prefix are.
        for i in (0..30).chain(38..60) {
            let mut b = body.clone();
            b[i] ^= 0x10;
            assert!(decode(&b, ty::PAGES).is_err(), "flip at {i} unnoticed");
        }
        // The flag is meaningless (and refused) on anything but a batch.
        let h = parse_header(&header_with(ty::COMMIT, FLAG_RECORD_DIGESTS, 0, 0)).unwrap();
        assert!(Message::decode_frame(&h, &[]).is_err());
    }

    #[test]
    fn batches_decode_and_reject_bad_records() {
        let ok = batch_body(&[
            (1, false, 0, vec![1; 8]),
            (2, true, 0, vec![]),
            (3, false, 5, vec![9; 3]),
        ]);
        assert_eq!(
            collect(&ok).unwrap(),
            vec![(1, false, 8), (2, true, 0), (3, false, 3)]
        );
        for cut in 0..ok.len() {
            assert!(collect(&ok[..cut]).is_err(), "cut at {cut}");
        }
        // index out of range
        assert!(collect(&batch_body(&[(100, false, 0, vec![1; 8])])).is_err());
        // raw record of the wrong size
        assert!(collect(&batch_body(&[(1, false, 0, vec![1; 7])])).is_err());
        // zero record with data
        assert!(collect(&batch_body(&[(1, true, 0, vec![1; 8])])).is_err());
        // oversized encoded record
        assert!(collect(&batch_body(&[(1, false, 3, vec![1; 8 + CODEC_SLACK + 1])])).is_err());
        // count larger than the records present
        let mut lie = ok.clone();
        lie[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(collect(&lie).is_err());
        // trailing garbage
        let mut tail = ok.clone();
        tail.push(1);
        assert!(collect(&tail).is_err());
        // absurd count
        let mut huge = ok;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(collect(&huge).is_err());
    }
}
