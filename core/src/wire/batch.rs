//! Page and block batches: records with their unit numbers and digests, decoded lazily.

use super::cursor::Cursor;
use super::message::*;

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

/// What a batch carries: the one name for a kind of unit, on the wire and in both drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchKind {
    /// Guest memory pages.
    Pages,
    /// Blocks of disk `n`, before the hand-over.
    Blocks(u16),
    /// Blocks of disk `n` still owed after the hand-over (storage post-copy): written only
    /// where the guest has not written since.
    OwedBlocks(u16),
    /// Guest pages still owed after the hand-over (memory post-copy): installed only
    /// where the destination's guest has not faulted them in yet.
    OwedPages,
}

impl BatchKind {
    /// Whether the units are owed after the hand-over (post-copy).
    pub fn is_owed(self) -> bool {
        matches!(self, BatchKind::OwedBlocks(_) | BatchKind::OwedPages)
    }

    /// The disk, for blocks.
    pub fn disk(self) -> Option<u16> {
        match self {
            BatchKind::Pages | BatchKind::OwedPages => None,
            BatchKind::Blocks(d) | BatchKind::OwedBlocks(d) => Some(d),
        }
    }

    /// The frame type that carries it.
    pub fn frame_type(self) -> u8 {
        match self {
            BatchKind::Pages => super::ty::PAGES,
            BatchKind::Blocks(_) => super::ty::BLOCKS,
            BatchKind::OwedBlocks(_) => super::ty::POSTCOPY_BLOCKS,
            BatchKind::OwedPages => super::ty::POSTCOPY_PAGES,
        }
    }

    /// The unit kind codecs see (an owed block is a block).
    pub fn unit_kind(self) -> crate::codec::UnitKind {
        match self.disk() {
            None => crate::codec::UnitKind::Page,
            Some(d) => crate::codec::UnitKind::Block(d),
        }
    }

    /// "page" or "block", for errors.
    pub fn unit_name(self) -> &'static str {
        match self {
            BatchKind::Pages | BatchKind::OwedPages => "page",
            BatchKind::Blocks(_) | BatchKind::OwedBlocks(_) => "block",
        }
    }
}

/// A batch of pages or of one disk's blocks, decoded lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch<'a> {
    /// What the records are.
    pub kind: BatchKind,
    /// Round the batch belongs to.
    pub round: u32,
    /// Number of records.
    pub count: u32,
    /// The prefix bytes (disk, round, count) for the header CRC.
    pub(super) prefix: &'a [u8],
    pub(super) records: &'a [u8],
    /// With [`FLAG_RECORD_DIGESTS`]: CRC-32C of prefix and record headers to check.
    pub(super) header_crc: Option<u32>,
}

impl<'a> Batch<'a> {
    /// Iterates the records, checking each against `unit_size` and `limit` (unit count).
    pub fn records(&self, unit_size: usize, limit: u64) -> RecordIter<'a> {
        // What the records decode to must fit the receiver's staging bound: a batch of
        // empty records (xor-delta of an unchanged page) must not make it reserve GiBs.
        let most = (MAX_BATCH_BYTES / unit_size.max(1)).max(1);
        RecordIter {
            cur: Cursor::new(self.records, "batch"),
            too_many: (self.count as usize > most).then_some(most),
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
    pub(super) cur: Cursor<'a>,
    /// Set when the count exceeds what a batch may decode to: the first item is an error.
    pub(super) too_many: Option<usize>,
    pub(super) left: u32,
    pub(super) unit_size: usize,
    pub(super) limit: u64,
    /// Running CRC over record headers and the value it must reach.
    pub(super) crc: Option<(u32, u32)>,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<UnitRecord<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(most) = self.too_many.take() {
            let count = self.left;
            self.left = 0;
            self.crc = None;
            self.cur.pos = self.cur.data.len();
            return Some(Err(self.cur.invalid(format!(
                "{count} records of {} bytes exceed a batch (at most {most})",
                self.unit_size
            ))));
        }
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
    pub(super) fn next_record(&mut self) -> Result<UnitRecord<'a>, DecodeError> {
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
