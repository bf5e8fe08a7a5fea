//! The source driver: runs [`SourcePlan`] over a transport and a source guest.
//!
//! Safety rule: until the destination acknowledged a verified final state the source owns
//! the guest; any error, timeout or cancel resumes it (and merges back the dirty bits of the
//! round that failed). After `commit` is sent the source never resumes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use super::{block_channel, ms, page_channel, read_frame_until, Control, ReadError};
use crate::basecmp::{
    block_digests, chunk_digests, differing_chunks, key_for, mark_differing, CHUNK_BLOCKS,
};
use crate::bitmap::Bitmap;
use crate::codec::{CodecFactory, Encoder, Unit, UnitKind, TAG_RAW};
use crate::digest::{full_sum, unit_digest, DigestDelta, DigestTable};
use crate::guest::{Base, DiskPlan, GuestLayout, SourceGuest};
use crate::machine::{SourcePlan, SourceStep};
use crate::pacer::Pacer;
use crate::policy::{ConvergencePolicy, RoundFigures};
use crate::report::{hex, OracleSummary, Progress, Report, RoundReport};
use crate::transport::{Channel, CountingWriter, Transport};
use crate::wire::frame::{FLAG_RECORD_DIGESTS, HEADER_LEN};
use crate::wire::{
    frame::write_frame, BatchBuilder, FrameBuf, FrameReader, Hello, Manifest, Message, Phase,
    RoundEnd, VerifyMode, CAPABILITIES, CODEC_SLACK, PROTOCOL_VERSION, RECORD_HEADER,
    REQUIRED_CAPABILITIES,
};
use crate::zero::is_zero;

/// How a migration is run.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Destination address, in the transport's syntax.
    pub addr: String,
    /// Number of channels.
    pub channels: usize,
    /// Convergence policy.
    pub policy: ConvergencePolicy,
    /// Bandwidth cap in bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Verification mode.
    pub verify: VerifyMode,
    /// How long to wait for the destination's answers.
    pub io_timeout: Duration,
    /// Set to cancel; the source then resumes.
    pub cancel: Arc<AtomicBool>,
    /// Disk write throttling.
    pub throttle: Throttle,
    /// When the last dirty blocks move: during the pause, or after the hand-over.
    pub storage_mode: StorageMode,
}

/// When the disk blocks still dirty at the pause move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMode {
    /// In the pause, with the last dirty pages.
    PreCopy,
    /// After the hand-over: the pause sends only the bitmap of owed blocks; the
    /// destination resumes at once and the source pushes them in the background, serving
    /// the guest's reads of owed blocks first.
    PostCopy,
}

/// Write-rate control of the guest's disk while it migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Never throttle.
    Off,
    /// Throttle when the guest dirties blocks faster than half the link carries them:
    /// to a quarter of the link, halved again while it still outpaces the link.
    Auto,
    /// Limit disk writes to this many bytes per second for the whole migration.
    Cap(u64),
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            addr: String::new(),
            channels: 1,
            policy: ConvergencePolicy::default(),
            max_bandwidth: None,
            verify: VerifyMode::Digest,
            io_timeout: Duration::from_secs(10),
            cancel: Arc::new(AtomicBool::new(false)),
            throttle: Throttle::Auto,
            storage_mode: StorageMode::PreCopy,
        }
    }
}

/// Bytes of unit data per frame at most (keeps frames far below the wire limit).
const FRAME_DATA: usize = 256 << 10;

#[derive(Default)]
struct Counters {
    pages: AtomicU64,
    zero_pages: AtomicU64,
    blocks: AtomicU64,
    zero_blocks: AtomicU64,
    skipped_blocks: AtomicU64,
    payload: AtomicU64,
    encoded: AtomicU64,
    units_done: AtomicU64,
}

struct Shared {
    guest: Arc<dyn SourceGuest>,
    layout: GuestLayout,
    pages: DigestTable,
    disks: Vec<DigestTable>,
    pacer: Option<Mutex<Pacer>>,
    counters: Counters,
    wire_bytes: Arc<AtomicU64>,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

enum Work {
    Units {
        disk: Option<u16>,
        round: u32,
        indices: Vec<u64>,
        /// First storage pass: zero blocks are skipped, the destination starts zeroed.
        skip_zero: bool,
        /// Owed blocks pushed after the hand-over.
        postcopy: bool,
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

struct BarrierDone {
    ok: bool,
    pages: DigestDelta,
    disks: Vec<DigestDelta>,
}

struct SenderWorker {
    tx: Box<dyn Write + Send>,
    encoder: Box<dyn Encoder>,
    shared: Arc<Shared>,
    frame: FrameBuf,
    scratch: Vec<u8>,
    pages: DigestDelta,
    disks: Vec<DigestDelta>,
    channel: usize,
}

impl SenderWorker {
    fn run(mut self, work: Receiver<Work>) {
        for w in work {
            let failed = self.shared.failed.load(Ordering::Acquire);
            match w {
                Work::Units {
                    disk,
                    round,
                    indices,
                    skip_zero,
                    postcopy,
                } => {
                    if !failed {
                        if let Err(e) = self.send_units(disk, round, &indices, skip_zero, postcopy)
                        {
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
    }

    fn done(&self, ok: bool) -> BarrierDone {
        BarrierDone {
            ok,
            pages: self.pages,
            disks: self.disks.clone(),
        }
    }

    fn send_message(&mut self, m: &Message<'_>) -> std::io::Result<()> {
        let mut body = Vec::new();
        let ty = m.encode(&mut body);
        write_frame(&mut self.tx, ty, &body).map_err(std::io::Error::other)?;
        self.tx.flush()
    }

    fn send_units(
        &mut self,
        disk: Option<u16>,
        round: u32,
        indices: &[u64],
        skip_zero: bool,
        postcopy: bool,
    ) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let (size, table, kind) = match disk {
            None => (
                shared.layout.page_size as usize,
                &shared.pages,
                UnitKind::Page,
            ),
            Some(d) => (
                shared.layout.disks[d as usize].block_size as usize,
                &shared.disks[d as usize],
                UnitKind::Block(d),
            ),
        };
        let c = &shared.counters;
        let body = self.frame.start();
        let at = BatchBuilder::begin(body, disk, round);
        // The frame CRC covers the prefix and the record headers; the data of each unit is
        // covered by its digest (FLAG_RECORD_DIGESTS).
        let mut crc = 0u32;
        let mut count = 0u32;
        let (mut payload, mut encoded, mut zeros, mut skipped) = (0u64, 0u64, 0u64, 0u64);
        for &i in indices {
            // Read the unit straight into its place in the frame: a raw unit is never
            // copied twice.
            let rec = body.len();
            let data_at = rec + RECORD_HEADER;
            body.resize(data_at + size, 0);
            match disk {
                None => shared.guest.read_page(i, &mut body[data_at..]),
                Some(d) => shared.guest.read_block(d as usize, i, &mut body[data_at..]),
            }
            .map_err(|e| format!("reading {kind:?} {i}: {e}"))?;
            let unit = Unit { kind, index: i };
            let delta = match disk {
                None => &mut self.pages,
                Some(d) => &mut self.disks[d as usize],
            };
            if is_zero(&body[data_at..]) {
                self.encoder.note_sent_plain(unit, &body[data_at..]);
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
                let digest = unit_digest(i, &body[data_at..]);
                table.record(i, digest, delta);
                self.scratch.clear();
                let tag = self
                    .encoder
                    .encode(unit, &body[data_at..], &mut self.scratch);
                if tag != TAG_RAW && self.scratch.len() < size + CODEC_SLACK {
                    body.truncate(rec);
                    BatchBuilder::record(body, i, false, tag, self.scratch.len(), digest);
                    body.extend_from_slice(&self.scratch);
                    encoded += self.scratch.len() as u64;
                } else {
                    if tag != TAG_RAW {
                        self.encoder.note_sent_plain(unit, &body[data_at..]);
                    }
                    body[rec..data_at]
                        .copy_from_slice(&BatchBuilder::header(i, false, TAG_RAW, size, digest));
                    encoded += size as u64;
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
            if let Some(p) = &shared.pacer {
                let wait = p
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reserve(Instant::now(), len);
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            let ty = match (disk, postcopy) {
                (None, _) => crate::wire::ty::PAGES,
                (Some(_), false) => crate::wire::ty::BLOCKS,
                (Some(_), true) => crate::wire::ty::POSTCOPY_BLOCKS,
            };
            let frame = self.frame.finish_with(ty, FLAG_RECORD_DIGESTS, crc);
            self.tx
                .write_all(frame)
                .map_err(|e| format!("send failed: {e}"))?;
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

/// A failure, with whether the guest was paused when it happened.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

struct Session<'a> {
    cfg: &'a SourceConfig,
    shared: Arc<Shared>,
    work: Vec<Sender<Work>>,
    ctl: Receiver<Result<Control, String>>,
    progress: &'a (dyn Fn(Progress) + Sync),
    report: Report,
    last_deltas: (DigestDelta, Vec<DigestDelta>),
    /// Dirty sets fetched but not yet sent: merged back into the guest if we fail.
    pending: Pending,
    migration_id: [u8; 16],
    /// When throttling began, and the current limit in blocks per second.
    throttled: Option<(Instant, u64)>,
    /// The round number of the post-copy push, once it started.
    postcopy_round: Option<u32>,
    /// Round acknowledgements that arrived while we polled for something else.
    acks: std::cell::RefCell<Vec<u32>>,
}

fn phase_is_postcopy(round: u32, postcopy_round: Option<u32>) -> bool {
    postcopy_round == Some(round)
}

#[derive(Default)]
struct Pending {
    pages: Option<Bitmap>,
    blocks: Option<Vec<Bitmap>>,
}

struct RoundResult {
    sent: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Session<'_> {
    fn check_abort(&self) -> Result<(), Failure> {
        if self.cfg.cancel.load(Ordering::Relaxed) {
            return Err(Failure("cancelled".into()));
        }
        if let Some(e) = self.shared.error() {
            return Err(Failure(e));
        }
        if let Ok(m) = self.ctl.try_recv() {
            match m {
                // Early: the destination was quicker than our own barrier bookkeeping.
                Ok(Control::RoundAck(r)) => self.acks.borrow_mut().push(r),
                Ok(Control::Abort(r)) => return Err(Failure(format!("destination aborted: {r}"))),
                Ok(other) => {
                    return Err(Failure(format!(
                        "unexpected {} from the destination",
                        other.name()
                    )))
                }
                Err(e) => return Err(Failure(e)),
            }
        }
        Ok(())
    }

    /// Sends one round and waits for every channel's barrier.
    fn round(
        &mut self,
        phase: Phase,
        round: u32,
        pages: Option<&Bitmap>,
        blocks: &[Bitmap],
        skip_zero: &[bool],
    ) -> Result<RoundResult, Failure> {
        let start = Instant::now();
        let bytes0 = self.shared.wire_bytes.load(Ordering::Relaxed);
        let done0 = self.shared.counters.units_done.load(Ordering::Relaxed);
        let n = self.work.len();
        let page_units = pages.map_or(0, Bitmap::count);
        let block_units: u64 = blocks.iter().map(Bitmap::count).sum();
        let total = page_units + block_units;
        (self.progress)(Progress::RoundStart {
            phase: phase.name().into(),
            index: round,
            units: total,
        });
        let page_size = self.shared.layout.page_size as usize;
        if let Some(p) = pages {
            self.dispatch(p, None, page_size, round, false, |i| page_channel(i, n))?;
        }
        for (d, b) in blocks.iter().enumerate() {
            let bs = self.shared.layout.disks[d].block_size as usize;
            let disk = d as u16;
            let skip = skip_zero.get(d).copied().unwrap_or(false);
            self.dispatch(b, Some(disk), bs, round, skip, |i| {
                block_channel(disk, i, n)
            })?;
            self.check_abort()?;
        }
        // Barrier on every channel, then wait, reporting progress meanwhile.
        let (reply_tx, reply_rx) = unbounded();
        for ch in 0..n {
            self.send_work(
                ch,
                Work::Barrier {
                    end: RoundEnd { phase, round },
                    reply: reply_tx.clone(),
                },
            )?;
        }
        let mut pages_delta = DigestDelta::default();
        let mut disk_deltas = vec![DigestDelta::default(); self.shared.disks.len()];
        let mut got = 0;
        while got < n {
            match reply_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(done) => {
                    if !done.ok {
                        self.check_abort()?;
                        return Err(Failure("a channel failed".into()));
                    }
                    pages_delta.add(done.pages);
                    for (a, b) in disk_deltas.iter_mut().zip(done.disks) {
                        a.add(b);
                    }
                    got += 1;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.check_abort()?;
                    (self.progress)(Progress::Sent {
                        units: self.shared.counters.units_done.load(Ordering::Relaxed) - done0,
                        bytes: self.shared.wire_bytes.load(Ordering::Relaxed),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure("sender threads exited".into()))
                }
            }
        }
        // The final round is acknowledged by `verified`; the others by `round-ack`, so
        // that round times (and the link estimate) include the destination's work.
        if phase != Phase::Final {
            self.await_round_ack(round)?;
        }
        self.check_abort()?;
        self.last_deltas = (pages_delta, disk_deltas);
        let r = RoundResult {
            sent: total,
            bytes: self.shared.wire_bytes.load(Ordering::Relaxed) - bytes0,
            elapsed: start.elapsed(),
        };
        let rr = RoundReport {
            phase: phase.name().into(),
            index: round,
            dirty: if phase == Phase::Storage {
                block_units
            } else {
                page_units
            },
            sent: total,
            blocks: block_units,
            bytes: r.bytes,
            ms: ms(r.elapsed),
        };
        (self.progress)(Progress::RoundDone(rr.clone()));
        self.report.rounds.push(rr);
        Ok(r)
    }

    fn send_work(&self, ch: usize, w: Work) -> Result<(), Failure> {
        self.work[ch]
            .send(w)
            .map_err(|_| Failure("sender thread exited".into()))
    }

    /// Splits the set bits of `units` into per-channel frames and queues them.
    fn dispatch(
        &self,
        units: &Bitmap,
        disk: Option<u16>,
        unit_size: usize,
        round: u32,
        skip_zero: bool,
        channel_of: impl Fn(u64) -> usize,
    ) -> Result<(), Failure> {
        let per_frame = (FRAME_DATA / unit_size).max(1);
        let mut pending: Vec<Vec<u64>> = vec![Vec::new(); self.work.len()];
        let queue = |ch: usize, indices: Vec<u64>| {
            self.send_work(
                ch,
                Work::Units {
                    disk,
                    round,
                    indices,
                    skip_zero,
                    postcopy: phase_is_postcopy(round, self.postcopy_round),
                },
            )
        };
        for i in units.iter_ones() {
            let ch = channel_of(i);
            pending[ch].push(i);
            if pending[ch].len() >= per_frame {
                queue(ch, std::mem::take(&mut pending[ch]))?;
            }
        }
        for (ch, p) in pending.into_iter().enumerate() {
            if !p.is_empty() {
                queue(ch, p)?;
            }
        }
        Ok(())
    }

    /// A round whose fetched dirty bits are merged back into the guest if it fails.
    fn guarded_round(
        &mut self,
        phase: Phase,
        round: u32,
        pages: Option<Bitmap>,
        blocks: Vec<Bitmap>,
        skip_zero: &[bool],
        merge_back: bool,
    ) -> Result<RoundResult, Failure> {
        let r = self.round(phase, round, pages.as_ref(), &blocks, skip_zero);
        if r.is_err() && merge_back {
            if let Some(p) = &pages {
                self.shared.guest.merge_dirty_pages(p);
            }
            for (d, b) in blocks.iter().enumerate() {
                self.shared.guest.merge_dirty_blocks(d, b);
            }
        }
        r
    }

    fn fetch_blocks(&self) -> Result<Vec<Bitmap>, Failure> {
        (0..self.shared.layout.disks.len())
            .map(|d| {
                self.shared
                    .guest
                    .fetch_dirty_blocks(d)
                    .map_err(Failure::from)
            })
            .collect()
    }

    /// Bytes of the pending dirty blocks.
    fn pending_block_bytes(&self) -> u64 {
        self.pending.blocks.as_deref().map_or(0, |blocks| {
            blocks
                .iter()
                .zip(&self.shared.layout.disks)
                .map(|(b, d)| b.count() * u64::from(d.block_size))
                .sum()
        })
    }

    /// The pending dirty pages plus whatever was dirtied since they were fetched.
    fn take_pending_pages(&mut self) -> Result<Bitmap, Failure> {
        let mut now = self.shared.guest.fetch_dirty_pages()?;
        if let Some(p) = self.pending.pages.take() {
            now.merge(&p);
        }
        Ok(now)
    }

    /// The pending dirty blocks plus whatever was written since they were fetched.
    fn take_pending_blocks(&mut self) -> Result<Vec<Bitmap>, Failure> {
        let mut now = self.fetch_blocks()?;
        if let Some(p) = self.pending.blocks.take() {
            for (n, o) in now.iter_mut().zip(&p) {
                n.merge(o);
            }
        }
        Ok(now)
    }

    /// Waits for the destination's acknowledgement of `round`.
    fn await_round_ack(&self, round: u32) -> Result<(), Failure> {
        if let Some(i) = self.acks.borrow().iter().position(|r| *r == round) {
            self.acks.borrow_mut().remove(i);
            return Ok(());
        }
        match self.expect("round acknowledgement", self.cfg.io_timeout)? {
            Control::RoundAck(r) if r == round => Ok(()),
            other => Err(Failure(format!(
                "expected the acknowledgement of round {round}, got {}",
                other.name()
            ))),
        }
    }

    /// Throttles the guest's disk writes to `limit` blocks per second.
    fn throttle_to(&mut self, limit: u64) {
        let limit = limit.max(1);
        self.shared.guest.limit_disk_writes(Some(limit));
        let since = self.throttled.map_or_else(Instant::now, |(t, _)| t);
        self.throttled = Some((since, limit));
        self.report.throttle_blocks_per_s = Some(limit);
        (self.progress)(Progress::Note {
            text: format!("throttling the guest's disk writes to {limit} blocks/s"),
        });
    }

    /// Automatic throttling: after a round that took `elapsed` and left `dirty_bytes` of
    /// blocks dirty, with the link measured at `bandwidth` bytes/s.
    fn auto_throttle(
        &mut self,
        cfg: &SourceConfig,
        dirty_bytes: u64,
        elapsed: Duration,
        bandwidth: f64,
    ) {
        if cfg.throttle != Throttle::Auto || bandwidth <= 0.0 || elapsed.is_zero() {
            return;
        }
        let bs = self
            .shared
            .layout
            .disks
            .first()
            .map_or(4096, |d| d.block_size) as f64;
        let dirty_rate = dirty_bytes as f64 / elapsed.as_secs_f64();
        if dirty_rate <= 0.5 * bandwidth {
            return;
        }
        let limit = match self.throttled {
            None => (0.25 * bandwidth / bs) as u64,
            Some((_, l)) => l / 2,
        };
        self.throttle_to(limit);
    }

    /// Gives fetched-but-unsent dirty bits back to the guest (on failure).
    fn merge_back_pending(&mut self) {
        if let Some(p) = self.pending.pages.take() {
            self.shared.guest.merge_dirty_pages(&p);
        }
        if let Some(b) = self.pending.blocks.take() {
            for (d, bm) in b.iter().enumerate() {
                self.shared.guest.merge_dirty_blocks(d, bm);
            }
        }
    }

    /// Sends a control message on channel 0 after everything queued there, and waits
    /// until it is written.
    fn control(&self, message: &Message<'_>) -> Result<(), Failure> {
        let mut body = Vec::new();
        let ty = message.encode(&mut body);
        self.send_work(
            0,
            Work::Control {
                ty,
                body,
                abort: false,
            },
        )?;
        let (tx, rx) = bounded(1);
        self.send_work(0, Work::Flush { reply: tx })?;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(d) if d.ok => return Ok(()),
                Ok(_) => {
                    self.check_abort()?;
                    return Err(Failure("sending a control message failed".into()));
                }
                Err(RecvTimeoutError::Timeout) => self.check_abort()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure("sender thread exited".into()))
                }
            }
        }
    }

    /// Waits for a control message from the destination.
    fn expect(&self, what: &str, timeout: Duration) -> Result<Control, Failure> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.cfg.cancel.load(Ordering::Relaxed) {
                return Err(Failure("cancelled".into()));
            }
            if let Some(e) = self.shared.error() {
                return Err(Failure(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure(format!(
                    "timed out after {:.1} s waiting for the destination's {what}",
                    timeout.as_secs_f64()
                )));
            }
            match self.ctl.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(Ok(Control::Abort(r))) => {
                    return Err(Failure(format!("destination aborted: {r}")))
                }
                // Late pulls for blocks already pushed.
                Ok(Ok(Control::PullBlocks { .. })) => {}
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => return Err(Failure(e)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure("control reader exited".into()))
                }
            }
        }
    }
}

/// Migrates `guest` to `cfg.addr`. Always returns a report; `ok` says whether the
/// destination now runs the guest, and on failure `source_resumed` whether the source does.
pub fn migrate(
    guest: Arc<dyn SourceGuest>,
    transport: &dyn Transport,
    codec: Arc<dyn CodecFactory>,
    cfg: &SourceConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Report {
    let t0 = Instant::now();
    let layout = guest.layout();
    let mut report = Report {
        transport: transport.name(),
        channels: cfg.channels,
        codec: codec.spec(),
        storage_mode: match cfg.storage_mode {
            StorageMode::PreCopy => "precopy",
            StorageMode::PostCopy => "postcopy",
        }
        .into(),
        verify_mode: match cfg.verify {
            VerifyMode::Digest => "digest",
            VerifyMode::Full => "full",
        }
        .into(),
        memory_bytes: layout.memory_bytes(),
        disk_bytes: layout.disk_bytes(),
        ..Report::default()
    };
    let mut migration_id = [0u8; 16];
    fill_random(&mut migration_id);
    report.migration_id = hex(&migration_id);

    let channels = match transport.connect(&cfg.addr, cfg.channels.max(1)) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(error_chain(&e));
            report.source_resumed = Some(true);
            return report;
        }
    };
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        guest: Arc::clone(&guest),
        pages: DigestTable::zeroed(layout.pages, layout.page_size as usize),
        disks: layout
            .disks
            .iter()
            .map(|d| DigestTable::zeroed(d.blocks, d.block_size as usize))
            .collect(),
        layout: layout.clone(),
        pacer: cfg
            .max_bandwidth
            .map(|r| Mutex::new(Pacer::new(r, (r / 20).max(1 << 20)))),
        counters: Counters::default(),
        wire_bytes: Arc::clone(&wire_bytes),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    });

    let stop = Arc::new(AtomicBool::new(false));
    let mut closers = Vec::new();
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut work_txs = Vec::new();
    let (ctl_tx, ctl_rx) = unbounded();
    let mut ctl_reader = None;
    let max_unit = layout
        .disks
        .iter()
        .map(|d| d.block_size as usize)
        .chain([layout.page_size as usize])
        .max()
        .unwrap_or(4096);
    for (i, Channel { tx, rx, closer }) in channels.into_iter().enumerate() {
        if let Some(c) = closer {
            closers.push(c);
        }
        let mut tx: Box<dyn Write + Send> =
            Box::new(CountingWriter::new(tx, Arc::clone(&wire_bytes)));
        if i == 0 {
            let hello = Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                capabilities: CAPABILITIES,
                migration_id,
                channels: cfg.channels.max(1) as u16,
                verify: cfg.verify,
                codec: codec.spec(),
                layout: layout.clone(),
            });
            let mut body = Vec::new();
            let ty = hello.encode(&mut body);
            if let Err(e) = write_frame(&mut tx, ty, &body)
                .and_then(|_| tx.flush().map_err(crate::wire::FrameError::Io))
            {
                shared.fail(format!("sending hello: {}", error_chain(&e)));
            }
            let ctl_tx = ctl_tx.clone();
            let stop = Arc::clone(&stop);
            ctl_reader = Some(std::thread::spawn(move || control_reader(rx, ctl_tx, stop)));
        }
        let (wtx, wrx) = bounded::<Work>(4);
        work_txs.push(wtx);
        let worker = SenderWorker {
            tx,
            encoder: codec.encoder(),
            shared: Arc::clone(&shared),
            frame: FrameBuf::with_capacity(FRAME_DATA + 64 * 32),
            scratch: Vec::with_capacity(max_unit + CODEC_SLACK),
            pages: DigestDelta::default(),
            disks: vec![DigestDelta::default(); layout.disks.len()],
            channel: i,
        };
        workers.push(std::thread::spawn(move || worker.run(wrx)));
    }
    drop(ctl_tx);

    let mut s = Session {
        cfg,
        shared: Arc::clone(&shared),
        work: work_txs,
        ctl: ctl_rx,
        progress,
        report,
        last_deltas: (DigestDelta::default(), Vec::new()),
        pending: Pending::default(),
        migration_id,
        throttled: None,
        postcopy_round: None,
        acks: Default::default(),
    };
    let mut paused_at: Option<Instant> = None;
    let mut committed = false;
    let result = run(&mut s, cfg, &mut paused_at, &mut committed, t0);

    if result.is_err() && !committed {
        s.merge_back_pending();
    }
    if let Some((since, _)) = s.throttled {
        // A guest that stays here runs at full speed again.
        guest.limit_disk_writes(None);
        if s.report.throttled_ms == 0.0 {
            s.report.throttled_ms = ms(since.elapsed());
        }
    }
    let mut report = std::mem::take(&mut s.report);
    if let Err(Failure(msg)) = &result {
        report.ok = false;
        report.error = Some(msg.clone());
        if !committed {
            // Tell the destination to discard, best effort, then resume the guest.
            let mut body = Vec::new();
            let ty = Message::Abort(msg.clone()).encode(&mut body);
            let _ = s.work[0].try_send(Work::Control {
                ty,
                body,
                abort: true,
            });
            guest.stop_dirty_log();
            guest.stop_block_log();
            let resumed = if paused_at.is_some() {
                match guest.resume() {
                    Ok(()) => true,
                    Err(e) => {
                        report.error = Some(format!("{msg}; resuming the source failed: {e}"));
                        false
                    }
                }
            } else {
                true
            };
            report.source_resumed = Some(resumed);
        } else {
            report.source_resumed = Some(false);
        }
        shared.failed.store(true, Ordering::Release);
    }
    // Shut down: let queued frames (an abort) go out briefly, then close the channels so
    // no thread stays blocked on a dead peer.
    drop(s);
    let grace = Instant::now() + Duration::from_millis(if result.is_err() { 500 } else { 2000 });
    while Instant::now() < grace && workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for c in &closers {
        c();
    }
    for w in workers {
        let _ = w.join();
    }
    if let Some(r) = ctl_reader {
        let _ = r.join();
    }
    let c = &shared.counters;
    report.pages_sent = c.pages.load(Ordering::Relaxed);
    report.zero_pages = c.zero_pages.load(Ordering::Relaxed);
    report.blocks_sent = c.blocks.load(Ordering::Relaxed);
    report.zero_blocks = c.zero_blocks.load(Ordering::Relaxed);
    report.blocks_skipped_zero = c.skipped_blocks.load(Ordering::Relaxed);
    report.payload_bytes = c.payload.load(Ordering::Relaxed);
    report.encoded_bytes = c.encoded.load(Ordering::Relaxed);
    report.bytes_on_wire = wire_bytes.load(Ordering::Relaxed);
    if report.total_ms == 0.0 {
        report.total_ms = ms(t0.elapsed());
    }
    report
}

fn run(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    paused_at: &mut Option<Instant>,
    committed: &mut bool,
    t0: Instant,
) -> Result<(), Failure> {
    let guest = Arc::clone(&s.shared.guest);
    let layout = s.shared.layout.clone();
    let bases = match s.expect("welcome", cfg.io_timeout)? {
        Control::Welcome(w) => {
            if w.capabilities & REQUIRED_CAPABILITIES != REQUIRED_CAPABILITIES {
                return Err(Failure("destination lacks required capabilities".into()));
            }
            if hex(&w.migration_id) != s.report.migration_id {
                return Err(Failure("destination answered for another migration".into()));
            }
            if w.bases.len() != layout.disks.len() {
                return Err(Failure(format!(
                    "destination described {} disks, the guest has {}",
                    w.bases.len(),
                    layout.disks.len()
                )));
            }
            w.bases
        }
        Control::Refuse(r) => return Err(Failure(format!("destination refused: {r}"))),
        other => return Err(Failure(format!("expected welcome, got {}", other.name()))),
    };
    // Per disk: incremental when the destination holds this image at a generation our
    // history covers, else a full copy.
    if !layout.disks.is_empty() {
        guest.start_block_log()?;
    }
    let mut first_pass: Vec<Option<Bitmap>> = Vec::with_capacity(layout.disks.len());
    let mut plans = Vec::with_capacity(layout.disks.len());
    for (d, (disk, base)) in layout.disks.iter().zip(&bases).enumerate() {
        let (plan, since) = match (disk.identity, base) {
            (Some(mine), Base::Identity(theirs)) if mine.id == theirs.id => {
                match guest.written_since(d, theirs.generation) {
                    Some(w) => (DiskPlan::Incremental, Some(w)),
                    None => (DiskPlan::HashCompared, None),
                }
            }
            (_, Base::Identity(_) | Base::Raw) => (DiskPlan::HashCompared, None),
            (_, Base::None) => (DiskPlan::Full, None),
        };
        plans.push(plan);
        first_pass.push(since);
    }
    s.control(&Message::StoragePlan(plans.clone()))?;
    s.report.disk_plans = plans
        .iter()
        .map(|p| {
            match p {
                DiskPlan::Full => "full",
                DiskPlan::Incremental => "incremental",
                DiskPlan::HashCompared => "hash-compared",
            }
            .to_string()
        })
        .collect();
    for (d, plan) in plans.iter().enumerate() {
        if *plan == DiskPlan::HashCompared {
            (s.progress)(Progress::Note {
                text: format!("comparing disk {d} with the destination's copy"),
            });
            first_pass[d] = Some(hash_compare(s, cfg, d)?);
        }
    }
    let full_disks: Vec<bool> = plans.iter().map(|p| *p == DiskPlan::Full).collect();
    if let (Throttle::Cap(bytes), Some(d)) = (cfg.throttle, layout.disks.first()) {
        s.throttle_to(bytes / u64::from(d.block_size));
    }
    let mut plan = SourcePlan::new(cfg.policy.clone(), !layout.disks.is_empty());
    let mut step = plan.first();
    let mut bandwidth = 0.0f64;
    // The dirty sets fetched after a round are what the policy decides on, and what the
    // next round (or the stop-and-copy) sends: the logs are read once per round.
    loop {
        s.check_abort()?;
        match step {
            SourceStep::StorageFullPass => {
                // Full disks: every allocated block (holes and zero blocks skipped, the
                // destination starts from a zero image). Incremental disks: the blocks
                // written since the destination's generation, zero ones included.
                let mut sets = Vec::with_capacity(layout.disks.len());
                for (d, since) in first_pass.iter_mut().enumerate() {
                    let total = layout.disks[d].blocks;
                    let set = match since.take() {
                        Some(w) => {
                            s.report.blocks_skipped_base += total - w.count();
                            w
                        }
                        None => {
                            let a = guest.allocated_blocks(d)?;
                            s.shared
                                .counters
                                .skipped_blocks
                                .fetch_add(total - a.count(), Ordering::Relaxed);
                            a
                        }
                    };
                    sets.push(set);
                }
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Storage, r, None, sets, &full_disks, false)?;
                bandwidth = rate(rr.bytes, rr.elapsed).max(bandwidth);
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                step = plan.after_storage(s.pending_block_bytes(), bandwidth);
            }
            SourceStep::StorageDirtyRound => {
                let blocks = s.take_pending_blocks()?;
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Storage, r, None, blocks, &[], true)?;
                if rr.sent > 64 {
                    bandwidth = rate(rr.bytes, rr.elapsed).max(bandwidth);
                }
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                step = plan.after_storage(s.pending_block_bytes(), bandwidth);
            }
            SourceStep::MemoryFullPass | SourceStep::MemoryDirtyRound => {
                let full = step == SourceStep::MemoryFullPass;
                let pages = if full {
                    guest.start_dirty_log()?;
                    Bitmap::full(layout.pages)
                } else {
                    s.take_pending_pages()?
                };
                let blocks = s.take_pending_blocks()?;
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Memory, r, Some(pages), blocks, &[], !full)?;
                let bw = rate(rr.bytes, rr.elapsed);
                if full {
                    // Guest memory moved per second (wire bytes differ with a codec).
                    s.report.first_pass_mbps = rate(layout.memory_bytes(), rr.elapsed) / 1e6;
                }
                // A short round of a few pages under-measures the link: keep the best.
                if rr.sent > 256 || bandwidth == 0.0 {
                    bandwidth = if full { bw } else { bw.max(bandwidth * 0.5) };
                }
                s.pending.pages = Some(guest.fetch_dirty_pages()?);
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                let pending = s.pending.pages.as_ref().map_or(0, Bitmap::count)
                    * u64::from(layout.page_size)
                    + s.pending_block_bytes();
                step = plan.after_memory(RoundFigures {
                    pending_bytes: pending,
                    bandwidth,
                });
            }
            SourceStep::StopAndCopy(reason) => {
                s.report.stop_reason = Some(reason);
                break;
            }
        }
    }

    // Stop-and-copy: what was pending plus what was dirtied until the pause.
    (s.progress)(Progress::Note {
        text: "pausing the guest".into(),
    });
    let t_pause = Instant::now();
    if let Some((since, _)) = s.throttled {
        s.report.throttled_ms = ms(t_pause - since);
    }
    guest.pause()?;
    *paused_at = Some(t_pause);
    s.report.downtime_breakdown.pause_ms = ms(t_pause.elapsed());
    let t_copy = Instant::now();
    let pages = s.take_pending_pages()?;
    let mut blocks = s.take_pending_blocks()?;
    if cfg.storage_mode == StorageMode::PostCopy {
        // The blocks stay pending (merged back if we fail before the hand-over); the
        // pause sends only their bitmap.
        s.report.blocks_postcopy = blocks.iter().map(Bitmap::count).sum();
        let none = blocks.iter().map(|b| Bitmap::new(b.len())).collect();
        s.pending.blocks = Some(std::mem::replace(&mut blocks, none));
    }
    let r = plan.next_round();
    s.guarded_round(Phase::Final, r, Some(pages), blocks, &[], true)?;
    s.report.downtime_breakdown.final_copy_ms = ms(t_copy.elapsed());
    let t_state = Instant::now();
    let state = guest.save_state()?;
    s.control(&Message::State {
        version: state.version,
        bytes: &state.bytes,
    })?;
    if cfg.storage_mode == StorageMode::PostCopy {
        for (d, owed) in s
            .pending
            .blocks
            .clone()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            s.control(&Message::OwedBlocks {
                disk: d as u16,
                owed,
            })?;
        }
    }
    s.report.downtime_breakdown.state_ms = ms(t_state.elapsed());
    let full = if cfg.verify == VerifyMode::Full {
        let t = Instant::now();
        let sums = full_sums_source(&*guest, &layout);
        s.report.downtime_breakdown.full_verify_ms = ms(t.elapsed());
        Some(sums)
    } else {
        None
    };
    let (pd, dd) = s.last_deltas.clone();
    let manifest = Manifest {
        pages: s.shared.pages.sum_with([pd]),
        disks: s
            .shared
            .disks
            .iter()
            .enumerate()
            .map(|(i, t)| t.sum_with([dd.get(i).copied().unwrap_or_default()]))
            .collect(),
        full,
    };
    let t_verify = Instant::now();
    s.control(&Message::Manifest(manifest))?;
    // The destination answers after checking the manifest and flushing; with `--verify
    // full` it also hashes the whole guest (allow ~200 MB/s for that on a slow disk).
    let verify_wait = match cfg.verify {
        VerifyMode::Digest => cfg.io_timeout,
        VerifyMode::Full => {
            cfg.io_timeout
                + Duration::from_secs((layout.memory_bytes() + layout.disk_bytes()) / 200_000_000)
        }
    };
    match s.expect("verified", verify_wait)? {
        Control::Verified { .. } => {}
        other => return Err(Failure(format!("expected verified, got {}", other.name()))),
    }
    s.report.downtime_breakdown.verify_ms = ms(t_verify.elapsed());

    // Hand-over: from here on the source never resumes.
    *committed = true;
    let t_commit = Instant::now();
    let sent = s
        .control(&Message::Commit)
        .map_err(|Failure(e)| Failure(format!("commit sent but not confirmed: {e}")));
    // The backend's hand-over work (stopping the vCPUs for good, marking images as bases)
    // runs beside the wait for `resumed`: the guest is paused and `committed` is set.
    let handing = {
        let g = Arc::clone(&guest);
        std::thread::spawn(move || g.handed_over())
    };
    let result = finish_after_commit(s, cfg, &plan_round(&mut plan), t0, t_pause, t_commit, sent);
    let _ = handing.join();
    result
}

fn plan_round(plan: &mut SourcePlan) -> u32 {
    plan.next_round()
}

/// After `commit`: wait for `resumed`, run the post-copy push if any, wait for the verdict.
fn finish_after_commit(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    postcopy_round: &u32,
    t0: Instant,
    t_pause: Instant,
    t_commit: Instant,
    sent: Result<(), Failure>,
) -> Result<(), Failure> {
    sent?;
    match s.expect("resumed", cfg.io_timeout) {
        Ok(Control::Resumed { .. }) => {}
        Ok(other) => {
            return Err(Failure(format!(
                "committed; expected resumed, got {}",
                other.name()
            )))
        }
        Err(Failure(e)) => return Err(Failure(format!("committed, but {e}"))),
    }
    let now = Instant::now();
    s.report.downtime_breakdown.commit_resume_ms = ms(now - t_commit);
    s.report.downtime_ms = ms(now - t_pause);
    s.report.total_ms = ms(now - t0);
    s.report.ok = true;
    if cfg.storage_mode == StorageMode::PostCopy {
        let owed = s.pending.blocks.take().unwrap_or_default();
        postcopy_push(s, cfg, *postcopy_round, owed)
            .map_err(|Failure(e)| Failure(format!("committed, but post-copy failed: {e}")))?;
    }
    (s.progress)(Progress::Note {
        text: "guest resumed on the destination; waiting for its self-check".into(),
    });
    match s.expect("verdict", cfg.io_timeout.max(Duration::from_secs(120))) {
        Ok(Control::Verdict(v)) => {
            s.report.verified = v.ok;
            s.report.oracle = Some(OracleSummary {
                ok: v.ok,
                pages_checked: v.pages_checked,
                blocks_checked: v.blocks_checked,
                detail: v.detail,
            });
            if !v.ok {
                s.report.error = Some("destination's self-check failed".into());
            }
        }
        Ok(other) => {
            s.report.error = Some(format!("expected verdict, got {}", other.name()));
        }
        Err(Failure(e)) => {
            s.report.error = Some(format!("no verdict from the destination: {e}"));
        }
    }
    Ok(())
}

/// Storage post-copy after the hand-over: pushes every owed block, the ones the
/// destination's guest is waiting for first, then a barrier and the final digest sums.
fn postcopy_push(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    round: u32,
    owed: Vec<Bitmap>,
) -> Result<(), Failure> {
    const SLICE: usize = 256;
    s.postcopy_round = Some(round);
    let n = s.work.len();
    let mut sent: Vec<Bitmap> = owed.iter().map(|b| Bitmap::new(b.len())).collect();
    let order: Vec<(usize, u64)> = owed
        .iter()
        .enumerate()
        .flat_map(|(d, b)| b.iter_ones().map(move |i| (d, i)))
        .collect();
    (s.progress)(Progress::RoundStart {
        phase: Phase::PostCopy.name().into(),
        index: round,
        units: order.len() as u64,
    });
    let start = Instant::now();
    let bytes0 = s.shared.wire_bytes.load(Ordering::Relaxed);
    let mut next = 0usize;
    loop {
        // Pulls first: the guest is blocked on them.
        let mut batch: Vec<(usize, u64)> = Vec::new();
        while let Ok(m) = s.ctl.try_recv() {
            match m {
                Ok(Control::PullBlocks { disk, blocks }) => {
                    let d = usize::from(disk);
                    for b in blocks {
                        if owed.get(d).is_some_and(|o| o.get(b)) && !sent[d].get(b) {
                            batch.push((d, b));
                            s.report.blocks_pulled += 1;
                        }
                    }
                }
                Ok(Control::Abort(r)) => return Err(Failure(format!("destination aborted: {r}"))),
                Ok(other) => {
                    return Err(Failure(format!(
                        "unexpected {} during post-copy",
                        other.name()
                    )))
                }
                Err(e) => return Err(Failure(e)),
            }
        }
        while batch.len() < SLICE && next < order.len() {
            batch.push(order[next]);
            next += 1;
        }
        batch.retain(|(d, b)| {
            let fresh = !sent[*d].get(*b);
            sent[*d].set(*b);
            fresh
        });
        if batch.is_empty() && next >= order.len() {
            break;
        }
        for (d, disk_owed) in owed.iter().enumerate() {
            let mut set = Bitmap::new(disk_owed.len());
            for (_, b) in batch.iter().filter(|(x, _)| *x == d) {
                set.set(*b);
            }
            if !set.none() {
                let bs = s.shared.layout.disks[d].block_size as usize;
                let disk = d as u16;
                s.dispatch(&set, Some(disk), bs, round, false, |i| {
                    block_channel(disk, i, n)
                })?;
            }
        }
        if let Some(e) = s.shared.error() {
            return Err(Failure(e));
        }
    }
    // Barrier on every channel, then the sums of everything the destination now has.
    let (reply_tx, reply_rx) = unbounded();
    for ch in 0..n {
        s.send_work(
            ch,
            Work::Barrier {
                end: RoundEnd {
                    phase: Phase::PostCopy,
                    round,
                },
                reply: reply_tx.clone(),
            },
        )?;
    }
    let mut disk_deltas = vec![DigestDelta::default(); s.shared.disks.len()];
    for _ in 0..n {
        let done = reply_rx
            .recv_timeout(cfg.io_timeout * 6)
            .map_err(|_| Failure("post-copy barrier timed out".into()))?;
        if !done.ok {
            return Err(Failure(
                s.shared
                    .error()
                    .unwrap_or_else(|| "a channel failed".into()),
            ));
        }
        for (a, b) in disk_deltas.iter_mut().zip(done.disks) {
            a.add(b);
        }
    }
    let sums = s
        .shared
        .disks
        .iter()
        .zip(&disk_deltas)
        .map(|(t, d)| t.sum_with([*d]))
        .collect();
    s.control(&Message::PostcopyDone(sums))?;
    let rr = RoundReport {
        phase: Phase::PostCopy.name().into(),
        index: round,
        dirty: order.len() as u64,
        sent: order.len() as u64,
        blocks: order.len() as u64,
        bytes: s.shared.wire_bytes.load(Ordering::Relaxed) - bytes0,
        ms: ms(start.elapsed()),
    };
    (s.progress)(Progress::RoundDone(rr.clone()));
    s.report.rounds.push(rr);
    Ok(())
}

/// The blocks of disk `d` that differ from the destination's base: compare chunk
/// digests, then block digests within the chunks that differ.
fn hash_compare(s: &mut Session<'_>, cfg: &SourceConfig, d: usize) -> Result<Bitmap, Failure> {
    let dl = s.shared.layout.disks[d].clone();
    let key = key_for(&s.migration_id);
    let guest = Arc::clone(&s.shared.guest);
    let mine = block_digests(&key, dl.blocks, dl.block_size as usize, |b, buf| {
        guest.read_block(d, b, buf).is_ok()
    });
    let mine_chunks = chunk_digests(&key, &mine);
    // The destination hashes its whole base first: allow ~200 MB/s for that.
    let wait = cfg.io_timeout + Duration::from_secs(dl.bytes() / 200_000_000);
    let theirs = match s.expect("base digests", wait)? {
        Control::BaseDigests { disk, digests } if usize::from(disk) == d => digests,
        other => {
            return Err(Failure(format!(
                "expected base digests of disk {d}, got {}",
                other.name()
            )))
        }
    };
    let chunks = differing_chunks(&mine_chunks, &theirs);
    s.control(&Message::DigestRequest {
        disk: d as u16,
        chunks: chunks.clone(),
    })?;
    let mut diff = Bitmap::new(dl.blocks);
    let mut answered = 0usize;
    loop {
        match s.expect("block digests", cfg.io_timeout)? {
            Control::BlockDigests {
                disk,
                last,
                chunks: got,
            } if usize::from(disk) == d => {
                for (c, ds) in got {
                    let first = (u64::from(c) * CHUNK_BLOCKS) as usize;
                    let Some(m) = mine.get(first..(first + CHUNK_BLOCKS as usize).min(mine.len()))
                    else {
                        return Err(Failure(format!("digests for unknown chunk {c}")));
                    };
                    mark_differing(&mut diff, c, m, &ds);
                    answered += 1;
                }
                if last {
                    break;
                }
            }
            other => {
                return Err(Failure(format!(
                    "expected block digests of disk {d}, got {}",
                    other.name()
                )))
            }
        }
    }
    if answered != chunks.len() {
        return Err(Failure(format!(
            "asked for {} chunks of block digests, got {answered}",
            chunks.len()
        )));
    }
    Ok(diff)
}

fn full_sums_source(guest: &dyn SourceGuest, layout: &GuestLayout) -> (u64, Vec<u64>) {
    let pages = full_sum(layout.pages, layout.page_size as usize, |i, b| {
        if guest.read_page(i, b).is_err() {
            b.fill(0xff);
        }
    });
    let disks = layout
        .disks
        .iter()
        .enumerate()
        .map(|(d, dl)| {
            full_sum(dl.blocks, dl.block_size as usize, |i, b| {
                if guest.read_block(d, i, b).is_err() {
                    b.fill(0xff);
                }
            })
        })
        .collect();
    (pages, disks)
}

fn rate(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        bytes as f64 / s
    }
}

fn control_reader(
    rx: Box<dyn std::io::Read + Send>,
    out: Sender<Result<Control, String>>,
    stop: Arc<AtomicBool>,
) {
    let mut reader = FrameReader::new(rx);
    loop {
        match read_frame_until(&mut reader, None, &stop) {
            Ok(Some(h)) => {
                let ty = h.ty;
                let msg = match Message::decode_frame(&h, reader.body()) {
                    Ok(m) => match Control::from_message(m) {
                        Some(c) => Ok(c),
                        None => Err(format!("unexpected message type {ty} from the destination")),
                    },
                    Err(e) => Err(format!("bad message from the destination: {e}")),
                };
                let fatal = msg.is_err();
                if out.send(msg).is_err() || fatal {
                    return;
                }
            }
            Ok(None) => {
                let _ = out.send(Err("destination closed the connection".into()));
                return;
            }
            Err(ReadError::Stopped) => return,
            Err(e) => {
                let _ = out.send(Err(format!(
                    "connection to the destination failed: {}",
                    error_chain(&e)
                )));
                return;
            }
        }
    }
}

/// Formats an error with its whole source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Fills `buf` from the OS random source (falls back to time and pid mixing).
pub fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id()).rotate_left(32);
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}
