//! The per-channel receiver threads: read frames, decode, check digests, write.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::{read_frame_until, Control, Flush, ReadError};
use crate::codec::{DecodeItem, Decoder, Unit, TAG_RAW};
use crate::digest::{DigestDelta, DigestTable};
use crate::guest::{DestGuest, GuestError, GuestLayout};
use crate::machine::ChannelOrder;
use crate::wire::BatchKind;
use crate::wire::{frame::write_frame, Batch, FrameReader, Message, Phase};

use super::*;

pub(super) enum Event {
    FinalBarrier {
        channel: usize,
        pages: DigestDelta,
        disks: Vec<DigestDelta>,
        /// Decoding CPU seconds per codec stage on this channel so far.
        decode_s: Vec<f64>,
    },
    PostcopyBarrier {
        pages: DigestDelta,
        disks: Vec<DigestDelta>,
    },
    /// A channel processed everything of pre-copy round `round`.
    RoundBarrier {
        round: u32,
        phase: crate::wire::Phase,
    },
    Control(Control),
    Failed(String),
    Closed(usize),
}

pub(super) struct Received {
    pub(super) pages: AtomicU64,
    pub(super) blocks: AtomicU64,
    pub(super) last_activity_ms: AtomicU64,
}

pub(super) struct ReceiverWorker {
    pub(super) channel: usize,
    pub(super) guest: Arc<dyn DestGuest>,
    pub(super) decoder: Box<dyn Decoder>,
    pub(super) layout: GuestLayout,
    pub(super) pages: Arc<DigestTable>,
    pub(super) disks: Arc<Vec<DigestTable>>,
    pub(super) received: Arc<Received>,
    pub(super) epoch: Instant,
    pub(super) order: ChannelOrder,
    /// Asks the background flusher to make what arrived so far durable (at every round
    /// barrier and every 32 MiB of blocks), so the final flush inside the downtime has
    /// little left.
    pub(super) flush: Sender<Flush>,
    /// Block bytes written since this worker last asked for a flush.
    pub(super) unflushed: u64,
    pub(super) page_delta: DigestDelta,
    pub(super) disk_deltas: Vec<DigestDelta>,
    /// A batch's decoded units.
    pub(super) staging: Vec<u8>,
    /// An all-zero unit, for telling codecs a zero unit arrived.
    pub(super) zeros: Vec<u8>,
}

impl ReceiverWorker {
    pub(super) fn run(
        mut self,
        mut reader: FrameReader<Box<dyn std::io::Read + Send>>,
        out: Sender<Event>,
        stop: Arc<AtomicBool>,
    ) {
        loop {
            let h = match read_frame_until(&mut reader, None, &stop) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    let _ = out.send(Event::Closed(self.channel));
                    return;
                }
                Err(ReadError::Stopped) => return,
                Err(e) => {
                    let _ = out.send(Event::Failed(format!(
                        "channel {}: {}",
                        self.channel,
                        crate::engine::error_chain(&e)
                    )));
                    return;
                }
            };
            self.received
                .last_activity_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            let ty = h.ty;
            let result = match Message::decode_frame(&h, reader.body()) {
                Err(e) => Err(e.to_string()),
                Ok(Message::Batch(b)) => self.batch(&b),
                Ok(Message::RoundEnd(end)) if end.phase == Phase::PostCopy => {
                    match self.order.on_round_end(end) {
                        Ok(_) => {
                            let _ = out.send(Event::PostcopyBarrier {
                                pages: self.page_delta,
                                disks: self.disk_deltas.clone(),
                            });
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Ok(Message::RoundEnd(end)) => match self.order.on_round_end(end) {
                    Ok(true) => {
                        let _ = out.send(Event::FinalBarrier {
                            channel: self.channel,
                            pages: self.page_delta,
                            disks: self.disk_deltas.clone(),
                            decode_s: self.decoder.decode_seconds(),
                        });
                        Ok(())
                    }
                    Ok(false) => {
                        let _ = out.send(Event::RoundBarrier {
                            round: end.round,
                            phase: end.phase,
                        });
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                },
                Ok(m) => match m.into_control() {
                    Some(c) if self.channel == 0 => {
                        let _ = out.send(Event::Control(c));
                        Ok(())
                    }
                    Some(c) => Err(format!("{} on data channel {}", c.name(), self.channel)),
                    None => Err(format!("unexpected message type {ty}")),
                },
            };
            if let Err(e) = result {
                let _ = out.send(Event::Failed(format!("channel {}: {e}", self.channel)));
                return;
            }
        }
    }

    pub(super) fn batch(&mut self, b: &Batch<'_>) -> Result<(), String> {
        if b.kind.is_owed() {
            self.order.on_postcopy_data().map_err(|e| e.to_string())?;
        } else {
            self.order.on_data(b.round).map_err(|e| e.to_string())?;
        }
        let kind = b.kind.unit_kind();
        let (size, limit, table) = match b.kind.disk() {
            None => (
                self.layout.page_size as usize,
                self.layout.pages,
                &self.pages.as_ref(),
            ),
            Some(d) => {
                let dl = self
                    .layout
                    .disks
                    .get(d as usize)
                    .ok_or_else(|| format!("blocks for unknown disk {d}"))?;
                (dl.block_size as usize, dl.blocks, &&self.disks[d as usize])
            }
        };
        let guest = Arc::clone(&self.guest);
        let what = b.kind.unit_name();
        let records = b
            .records(size, limit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        // Encoded units are decoded as one batch (in parallel inside the codec) into the
        // staging buffer; raw ones are written straight from the frame.
        let encoded = |r: &&crate::wire::UnitRecord<'_>| !r.zero && r.tag != TAG_RAW;
        let mut decoded: Vec<Option<usize>> = vec![None; records.len()];
        let n = records.iter().filter(encoded).count();
        if n > 0 {
            self.staging.resize(n * size, 0);
            let mut slots = self.staging.chunks_mut(size);
            let mut items = Vec::with_capacity(n);
            for (k, rec) in records.iter().enumerate().filter(|(_, r)| encoded(r)) {
                let Some(target) = slots.next() else { break };
                if self.decoder.needs_base() {
                    match b.kind.disk() {
                        None => guest.read_page(rec.index, target),
                        Some(d) => guest.read_block(d as usize, rec.index, target),
                    }
                    .map_err(|e| format!("reading {what} {}: {e}", rec.index))?;
                }
                decoded[k] = Some(items.len());
                items.push(DecodeItem {
                    unit: Unit {
                        kind,
                        index: rec.index,
                    },
                    tag: rec.tag,
                    input: rec.data,
                    target,
                });
            }
            self.decoder
                .decode_batch(&mut items)
                .map_err(|e| format!("decoding {what} {}: {}", e.unit.index, e.error))?;
        }
        let delta = match b.kind.disk() {
            None => &mut self.page_delta,
            Some(d) => &mut self.disk_deltas[d as usize],
        };
        let mut n = 0u64;
        for (rec, slot) in records.iter().zip(decoded) {
            let i = rec.index;
            let digest = if rec.zero {
                match b.kind {
                    BatchKind::Pages => guest.zero_page(i),
                    BatchKind::Blocks(d) => guest.zero_block(d as usize, i),
                    BatchKind::OwedBlocks(d) => guest
                        .fill_owed(d as usize, i, &self.zeros[..size])
                        .map(|_| ()),
                    BatchKind::OwedPages => guest.fill_owed_page(i, None).map(|_| ()),
                }
                .map_err(|e| format!("writing {what} {i}: {e}"))?;
                if rec.digest != table.zero_digest(i) {
                    return Err(format!("zero {what} {i} carries a wrong digest"));
                }
                rec.digest
            } else {
                let data = match slot {
                    Some(k) => &self.staging[k * size..(k + 1) * size],
                    None if rec.tag == TAG_RAW => rec.data,
                    None => return Err(format!("{what} {i} arrived encoded without a codec")),
                };
                let d = table.digest(i, data);
                if d != rec.digest {
                    return Err(if rec.tag == TAG_RAW {
                        format!("{what} {i} arrived corrupted (digest mismatch)")
                    } else {
                        format!("{what} {i} decoded to the wrong content (digest mismatch)")
                    });
                }
                write_unit(&*guest, b.kind, i, data)
                    .map_err(|e| format!("writing {what} {i}: {e}"))?;
                d
            };
            table.record(i, digest, delta);
            n += 1;
        }
        match b.kind.disk() {
            None => self.received.pages.fetch_add(n, Ordering::Relaxed),
            Some(_) => {
                // Keep write-back going during pre-copy, so the flush inside the downtime
                // finds little left to write.
                self.unflushed += n * size as u64;
                if self.unflushed >= FLUSH_EVERY {
                    self.unflushed = 0;
                    let _ = self.flush.try_send(Flush::Writeback);
                }
                self.received.blocks.fetch_add(n, Ordering::Relaxed)
            }
        };
        Ok(())
    }
}

/// Writes a unit; a post-copy block only where the guest has not written it since.
pub(super) fn write_unit(
    guest: &dyn DestGuest,
    kind: BatchKind,
    i: u64,
    data: &[u8],
) -> Result<(), GuestError> {
    match kind {
        BatchKind::Pages => guest.write_page(i, data),
        BatchKind::Blocks(d) => guest.write_block(d as usize, i, data),
        BatchKind::OwedBlocks(d) => guest.fill_owed(d as usize, i, data).map(|_| ()),
        BatchKind::OwedPages => guest.fill_owed_page(i, Some(data)).map(|_| ()),
    }
}

pub(super) fn send_shared(tx: &SharedTx, m: &Message<'_>) -> Result<(), String> {
    let mut g = tx.lock().unwrap_or_else(|p| p.into_inner());
    send(g.as_mut(), m)
}

/// Channel 0's sending half, shared with the post-copy puller.
pub(super) type SharedTx = Arc<std::sync::Mutex<Box<dyn Write + Send>>>;

pub(super) fn send(tx: &mut (dyn Write + Send), m: &Message<'_>) -> Result<(), String> {
    let mut body = Vec::new();
    let ty = m.encode(&mut body);
    write_frame(tx, ty, &body)
        .map_err(|e| crate::engine::error_chain(&e))
        .and_then(|_| tx.flush().map_err(|e| e.to_string()))
}
