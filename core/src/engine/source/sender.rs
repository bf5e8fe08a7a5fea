//! The per-channel sender threads: read units, encode, frame, send.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::codec::{EncodeItem, Encoder, Unit, TAG_RAW};
use crate::digest::{DigestDelta, DigestTable};
use crate::guest::{GuestLayout, SourceGuest};
use crate::pacer::Pacer;
use crate::wire::frame::{FLAG_RECORD_DIGESTS, HEADER_LEN};
use crate::wire::BatchKind;
use crate::wire::{
    frame::write_frame, BatchBuilder, FrameBuf, Message, RoundEnd, CODEC_SLACK, RECORD_HEADER,
};
use crate::zero::is_zero;

/// Bytes of unit data per frame at most (keeps frames far below the wire limit).
pub(super) const FRAME_DATA: usize = 256 << 10;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) pages: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) blocks: AtomicU64,
    pub(super) zero_blocks: AtomicU64,
    pub(super) skipped_blocks: AtomicU64,
    pub(super) payload: AtomicU64,
    pub(super) encoded: AtomicU64,
    pub(super) units_done: AtomicU64,
}

pub(super) struct Shared {
    pub(super) guest: Arc<dyn SourceGuest>,
    /// `FERRY_FAULT`'s switches on this migration's link.
    pub(super) faults: crate::fault::Faults,
    pub(super) layout: GuestLayout,
    pub(super) pages: DigestTable,
    pub(super) disks: Vec<DigestTable>,
    /// `--max-bandwidth` (`None`: no cap); an operator may set or lift it while the
    /// migration runs.
    pub(super) pacer: Mutex<Option<Pacer>>,
    pub(super) counters: Counters,
    pub(super) wire_bytes: Arc<AtomicU64>,
    pub(super) failed: AtomicBool,
    pub(super) error: Mutex<Option<String>>,
    /// Memory post-copy: channel 0 carries only pages a guest waits for. They are
    /// counted against `--max-bandwidth` but never wait for it (the background push,
    /// which keeps little queued, pays for them).
    pub(super) urgent_channel0: AtomicBool,
}

impl Shared {
    pub(super) fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
    }

    pub(super) fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub(super) enum Work {
    Units {
        kind: BatchKind,
        round: u32,
        indices: Vec<u64>,
        /// First storage pass: zero blocks are skipped, the destination starts zeroed.
        skip_zero: bool,
    },
    Barrier {
        end: RoundEnd,
        reply: Sender<BarrierDone>,
    },
    /// A control frame, already encoded; aborts go out even after a failure.
    Control {
        ty: u8,
        body: Vec<u8>,
        abort: bool,
    },
    Flush {
        reply: Sender<BarrierDone>,
    },
}

/// What a channel's encoder did: per-stage figures and, for `auto`, its choices.
pub(super) type CodecFigures = (Vec<crate::codec::StageStats>, Vec<(String, u64)>);

/// One unit of a staged batch.
pub(super) enum Slot {
    Zero,
    Raw,
    Encoded { tag: u8, out: Vec<u8> },
}

pub(super) struct BarrierDone {
    pub(super) ok: bool,
    pub(super) pages: DigestDelta,
    pub(super) disks: Vec<DigestDelta>,
}

pub(super) struct SenderWorker {
    pub(super) tx: Box<dyn Write + Send>,
    pub(super) encoder: Box<dyn Encoder>,
    pub(super) shared: Arc<Shared>,
    pub(super) frame: FrameBuf,
    /// A batch's units as read, when a codec encodes them as a batch.
    pub(super) staging: Vec<u8>,
    /// What became of each unit of the staged batch.
    pub(super) slots: Vec<Slot>,
    /// Output buffers to reuse.
    pub(super) spare: Vec<Vec<u8>>,
    /// When the previous frame left (for the codec's link feedback).
    pub(super) last_sent: Option<Instant>,
    pub(super) pages: DigestDelta,
    pub(super) disks: Vec<DigestDelta>,
    pub(super) channel: usize,
}

impl SenderWorker {
    pub(super) fn run(mut self, work: Receiver<Work>) -> CodecFigures {
        for w in work {
            let failed = self.shared.failed.load(Ordering::Acquire);
            match w {
                Work::Units {
                    kind,
                    round,
                    indices,
                    skip_zero,
                } => {
                    if !failed {
                        if let Err(e) = self.send_units(kind, round, &indices, skip_zero) {
                            self.shared.fail(format!("channel {}: {e}", self.channel));
                        }
                    }
                }
                Work::Barrier { end, reply } => {
                    let ok = !failed && self.send_message(&Message::RoundEnd(end)).is_ok();
                    if !ok {
                        self.shared
                            .fail(format!("channel {}: sending barrier failed", self.channel));
                    }
                    let _ = reply.send(self.done(ok));
                }
                Work::Control { ty, body, abort } => {
                    if !failed || abort {
                        let r = write_frame(&mut self.tx, ty, &body)
                            .map_err(std::io::Error::other)
                            .and_then(|_| self.tx.flush());
                        if let Err(e) = r {
                            if !abort {
                                self.shared.fail(format!("channel {}: {e}", self.channel));
                            }
                        }
                    }
                }
                Work::Flush { reply } => {
                    let ok = !self.shared.failed.load(Ordering::Acquire);
                    let _ = reply.send(self.done(ok));
                }
            }
        }
        (self.encoder.stats(), self.encoder.choices())
    }

    pub(super) fn done(&self, ok: bool) -> BarrierDone {
        BarrierDone {
            ok,
            pages: self.pages,
            disks: self.disks.clone(),
        }
    }

    pub(super) fn send_message(&mut self, m: &Message<'_>) -> std::io::Result<()> {
        let mut body = Vec::new();
        let ty = m.encode(&mut body);
        write_frame(&mut self.tx, ty, &body).map_err(std::io::Error::other)?;
        self.tx.flush()
    }

    /// Reads a batch's units into the staging buffer and encodes the non-zero ones as one
    /// batch (in parallel inside the codec). Fills `self.slots` in `indices` order.
    fn stage_and_encode(
        &mut self,
        batch: BatchKind,
        indices: &[u64],
        size: usize,
    ) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let kind = batch.unit_kind();
        self.staging.resize(indices.len() * size, 0);
        for (&i, chunk) in indices.iter().zip(self.staging.chunks_mut(size)) {
            match batch.disk() {
                None => shared.guest.read_page(i, chunk),
                Some(d) => shared.guest.read_block(d as usize, i, chunk),
            }
            .map_err(|e| format!("reading {} {i}: {e}", batch.unit_name()))?;
        }
        for s in self.slots.drain(..) {
            if let Slot::Encoded { out, .. } = s {
                self.spare.push(out);
            }
        }
        let mut items = Vec::with_capacity(indices.len());
        let mut at = Vec::with_capacity(indices.len());
        for (k, (&i, chunk)) in indices.iter().zip(self.staging.chunks(size)).enumerate() {
            let unit = Unit { kind, index: i };
            if is_zero(chunk) {
                self.encoder.note_sent_plain(unit, chunk);
                self.slots.push(Slot::Zero);
            } else {
                self.slots.push(Slot::Raw);
                at.push(k);
                items.push(EncodeItem {
                    unit,
                    data: chunk,
                    tag: TAG_RAW,
                    out: self.spare.pop().unwrap_or_default(),
                });
            }
        }
        self.encoder.encode_batch(&mut items);
        for (it, k) in items.into_iter().zip(at) {
            if it.tag != TAG_RAW && it.out.len() < size + CODEC_SLACK {
                self.slots[k] = Slot::Encoded {
                    tag: it.tag,
                    out: it.out,
                };
            } else {
                if it.tag != TAG_RAW {
                    self.encoder.note_sent_plain(it.unit, it.data);
                }
                self.spare.push(it.out);
            }
        }
        Ok(())
    }

    pub(super) fn send_units(
        &mut self,
        batch: BatchKind,
        round: u32,
        indices: &[u64],
        skip_zero: bool,
    ) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let (disk, kind) = (batch.disk(), batch.unit_kind());
        let (size, table) = match disk {
            None => (shared.layout.page_size as usize, &shared.pages),
            Some(d) => (
                shared.layout.disks[d as usize].block_size as usize,
                &shared.disks[d as usize],
            ),
        };
        // With a codec, the batch is read and encoded first; raw units are read straight
        // into their place in the frame, never copied twice. Owed units go raw when the
        // codec decodes against the destination's copy: it would need the very unit that
        // is owed (a page would fault on itself), and a guest there may have written a
        // block since. Compressors need no copy and apply to them as to any unit.
        let owed = batch.is_owed() && self.encoder.decodes_against_base();
        let staged = !self.encoder.is_raw() && !owed;
        if staged {
            self.stage_and_encode(batch, indices, size)?;
        }
        // An adaptive encoder sending raw may want a few units to measure its candidates.
        let mut sampling = !staged && !owed;
        let c = &shared.counters;
        let body = self.frame.start();
        let at = BatchBuilder::begin(body, disk, round);
        // The frame CRC covers the prefix and the record headers; the data of each unit is
        // covered by its digest (FLAG_RECORD_DIGESTS).
        let mut crc = 0u32;
        let mut count = 0u32;
        let (mut payload, mut encoded, mut zeros, mut skipped) = (0u64, 0u64, 0u64, 0u64);
        for (k, &i) in indices.iter().enumerate() {
            let rec = body.len();
            let data_at = rec + RECORD_HEADER;
            body.resize(data_at + size, 0);
            let data: &[u8] = if staged {
                &self.staging[k * size..(k + 1) * size]
            } else {
                match disk {
                    None => shared.guest.read_page(i, &mut body[data_at..]),
                    Some(d) => shared.guest.read_block(d as usize, i, &mut body[data_at..]),
                }
                .map_err(|e| format!("reading {} {i}: {e}", batch.unit_name()))?;
                &body[data_at..]
            };
            let delta = match disk {
                None => &mut self.pages,
                Some(d) => &mut self.disks[d as usize],
            };
            let zero = if staged {
                matches!(self.slots[k], Slot::Zero)
            } else {
                let zero = is_zero(data);
                if !zero && sampling {
                    sampling = self.encoder.sample_raw(Unit { kind, index: i }, data);
                }
                zero
            };
            if zero {
                body.truncate(rec);
                if skip_zero {
                    skipped += 1;
                    continue;
                }
                let d = table.zero_digest(i);
                table.record(i, d, delta);
                BatchBuilder::record(body, i, true, 0, 0, d);
                zeros += 1;
            } else {
                let digest = table.digest(i, data);
                table.record(i, digest, delta);
                match self.slots.get(k).filter(|_| staged) {
                    Some(Slot::Encoded { tag, out }) => {
                        body.truncate(rec);
                        BatchBuilder::record(body, i, false, *tag, out.len(), digest);
                        body.extend_from_slice(out);
                        encoded += out.len() as u64;
                    }
                    _ => {
                        if staged {
                            body[data_at..].copy_from_slice(&self.staging[k * size..][..size]);
                        }
                        body[rec..data_at].copy_from_slice(&BatchBuilder::header(
                            i, false, TAG_RAW, size, digest,
                        ));
                        encoded += size as u64;
                    }
                }
                payload += size as u64;
            }
            crc = crc32c::crc32c_append(crc, &body[rec..rec + RECORD_HEADER]);
            count += 1;
        }
        BatchBuilder::finish(body, at, count);
        if count > 0 {
            // CRC(prefix ‖ headers), the prefix taken after the count was patched in.
            let crc = crc32c::crc32c_combine(
                crc32c::crc32c(&body[HEADER_LEN..at + 4]),
                crc,
                count as usize * RECORD_HEADER,
            );
            let len = (self.frame.body_len() + HEADER_LEN) as u64;
            let send_started = Instant::now();
            let urgent = self.channel == 0
                && batch == BatchKind::OwedPages
                && shared.urgent_channel0.load(Ordering::Relaxed);
            let wait = shared
                .pacer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .map_or(std::time::Duration::ZERO, |p| {
                    p.reserve(Instant::now(), len)
                });
            if !wait.is_zero() && !urgent {
                std::thread::sleep(wait);
            }
            let frame = self
                .frame
                .finish_with(batch.frame_type(), FLAG_RECORD_DIGESTS, crc);
            self.tx
                .write_all(frame)
                .map_err(|e| format!("send failed: {e}"))?;
            let now = Instant::now();
            let wall = self
                .last_sent
                .map_or(now - send_started, |t| now.saturating_duration_since(t));
            self.encoder.note_link(len, now - send_started, wall);
            self.last_sent = Some(now);
        }
        let sent = u64::from(count);
        if disk.is_some() {
            c.blocks.fetch_add(sent, Ordering::Relaxed);
            c.zero_blocks.fetch_add(zeros, Ordering::Relaxed);
            c.skipped_blocks.fetch_add(skipped, Ordering::Relaxed);
        } else {
            c.pages.fetch_add(sent, Ordering::Relaxed);
            c.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        }
        c.payload.fetch_add(payload, Ordering::Relaxed);
        c.encoded.fetch_add(encoded, Ordering::Relaxed);
        c.units_done
            .fetch_add(indices.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
