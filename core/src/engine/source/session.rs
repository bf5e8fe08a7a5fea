//! One migration's state on the source: rounds, dirty sets, control messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use super::{block_channel, ms, page_channel, Control};
use crate::bitmap::Bitmap;
use crate::digest::DigestDelta;
use crate::report::{Progress, Report, RoundReport};
use crate::wire::{BatchKind, Message, Phase, RoundEnd, MEMORY_SPACE};

use super::sender::*;
use super::*;

/// Why a migration failed (a message for the report).
pub(super) struct Failure(pub(super) String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

pub(super) struct Session<'a> {
    pub(super) cfg: &'a SourceConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) work: Vec<Sender<Work>>,
    pub(super) ctl: Receiver<Result<Control, String>>,
    pub(super) progress: &'a (dyn Fn(Progress) + Sync),
    pub(super) report: Report,
    pub(super) last_deltas: (DigestDelta, Vec<DigestDelta>),
    /// Dirty sets fetched but not yet sent: merged back into the guest if we fail.
    pub(super) pending: Pending,
    pub(super) migration_id: [u8; 16],
    /// When throttling began, and the current limit in blocks per second.
    pub(super) throttled: Option<(Instant, u64)>,
    /// Round acknowledgements that arrived while we polled for something else.
    pub(super) acks: std::cell::RefCell<Vec<u32>>,
    /// Memory post-copy: pages the destination's guest asked for while we waited for
    /// something else (served first by the push).
    pub(super) page_pulls: std::cell::RefCell<Vec<u64>>,
    /// Whether the pages in `pending.pages` move after the hand-over (memory post-copy).
    pub(super) memory_postcopy: bool,
    /// Memory auto-converge: since when, and the vCPU throttle in percent.
    pub(super) vcpu_throttle: Option<(Instant, u8)>,
    /// Units done when the current round began (for its progress).
    pub(super) round_done0: std::cell::Cell<u64>,
    /// A downtime target an operator set, for the policy's next decision.
    pub(super) new_downtime: std::cell::Cell<Option<Duration>>,
    /// When the command began (for `setup_ms`).
    pub(super) started: Instant,
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) pages: Option<Bitmap>,
    pub(super) blocks: Option<Vec<Bitmap>>,
}

pub(super) struct RoundResult {
    pub(super) sent: u64,
    pub(super) bytes: u64,
    pub(super) elapsed: Duration,
}

impl Session<'_> {
    pub(super) fn check_abort(&self) -> Result<(), Failure> {
        if self.cfg.control.is_cancelled() {
            return Err(Failure("cancelled".into()));
        }
        self.poll_tuning();
        if let Some(e) = self.shared.error() {
            return Err(Failure(e));
        }
        if let Ok(m) = self.ctl.try_recv() {
            match m {
                // Early: the destination was quicker than our own barrier bookkeeping.
                Ok(Control::RoundAck(r)) => self.acks.borrow_mut().push(r),
                Ok(Control::Progress(_)) => {}
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

    /// Applies what an operator changed: the bandwidth cap at once, the downtime target
    /// at the next decision of the policy.
    pub(super) fn poll_tuning(&self) {
        let t = self.cfg.control.take_tuning();
        if let Some(cap) = t.max_bandwidth {
            *self.shared.pacer.lock().unwrap_or_else(|p| p.into_inner()) = cap.map(pacer_for);
            (self.progress)(Progress::Note {
                text: match cap {
                    Some(r) => format!("bandwidth cap set to {:.1} Mbit/s", r as f64 * 8e-6),
                    None => "bandwidth cap lifted".into(),
                },
            });
        }
        if let Some(d) = t.downtime {
            self.new_downtime.set(Some(d));
            (self.progress)(Progress::Note {
                text: format!("downtime target set to {:.1} ms", d.as_secs_f64() * 1e3),
            });
        }
    }

    /// Sends one round and waits for every channel's barrier.
    pub(super) fn round(
        &mut self,
        phase: Phase,
        round: u32,
        pages: Option<&Bitmap>,
        blocks: &[Bitmap],
        skip_zero: &[bool],
    ) -> Result<RoundResult, Failure> {
        let start = Instant::now();
        if self.report.rounds.is_empty() {
            self.report.setup_ms = ms(start - self.started);
        }
        let bytes0 = self.shared.wire_bytes.load(Ordering::Relaxed);
        let done0 = self.shared.counters.units_done.load(Ordering::Relaxed);
        self.round_done0.set(done0);
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
            self.dispatch(p, BatchKind::Pages, page_size, round, false, |i| {
                page_channel(i, n)
            })?;
        }
        for (d, b) in blocks.iter().enumerate() {
            let bs = self.shared.layout.disks[d].block_size as usize;
            let disk = d as u16;
            let skip = skip_zero.get(d).copied().unwrap_or(false);
            self.dispatch(b, BatchKind::Blocks(disk), bs, round, skip, |i| {
                block_channel(disk, i, n)
            })?;
            self.check_abort()?;
        }
        match phase {
            Phase::Storage => self.shared.faults.hit(crate::fault::Point::Storage),
            Phase::Memory => self.shared.faults.hit(crate::fault::Point::Memory),
            _ => {}
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

    pub(super) fn send_work(&self, ch: usize, w: Work) -> Result<(), Failure> {
        self.work[ch]
            .send(w)
            .map_err(|_| Failure("sender thread exited".into()))
    }

    /// Splits the set bits of `units` into per-channel frames and queues them.
    pub(super) fn dispatch(
        &self,
        units: &Bitmap,
        kind: BatchKind,
        unit_size: usize,
        round: u32,
        skip_zero: bool,
        channel_of: impl Fn(u64) -> usize,
    ) -> Result<(), Failure> {
        let per_frame = (FRAME_DATA / unit_size).max(1);
        let mut pending: Vec<Vec<u64>> = vec![Vec::new(); self.work.len()];
        // Queuing waits for the link: progress (and the status an operator sees) goes on
        // meanwhile, and a cancel or a new cap is looked at every frame.
        let last = std::cell::Cell::new(Instant::now());
        let queue = |ch: usize, indices: Vec<u64>| {
            // (Not `check_abort`: during post-copy the pulls on the control channel are
            // the push's to read.)
            if self.cfg.control.is_cancelled() {
                return Err(Failure("cancelled".into()));
            }
            self.poll_tuning();
            if last.get().elapsed() >= Duration::from_millis(100) {
                last.set(Instant::now());
                (self.progress)(Progress::Sent {
                    units: self.shared.counters.units_done.load(Ordering::Relaxed)
                        - self.round_done0.get(),
                    bytes: self.shared.wire_bytes.load(Ordering::Relaxed),
                });
            }
            self.send_work(
                ch,
                Work::Units {
                    kind,
                    round,
                    indices,
                    skip_zero,
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
    pub(super) fn guarded_round(
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

    pub(super) fn fetch_blocks(&self) -> Result<Vec<Bitmap>, Failure> {
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
    pub(super) fn pending_block_bytes(&self) -> u64 {
        self.pending.blocks.as_deref().map_or(0, |blocks| {
            blocks
                .iter()
                .zip(&self.shared.layout.disks)
                .map(|(b, d)| b.count() * u64::from(d.block_size))
                .sum()
        })
    }

    /// The pending dirty pages plus whatever was dirtied since they were fetched.
    pub(super) fn take_pending_pages(&mut self) -> Result<Bitmap, Failure> {
        let mut now = self.shared.guest.fetch_dirty_pages()?;
        if let Some(p) = self.pending.pages.take() {
            now.merge(&p);
        }
        Ok(now)
    }

    /// The pending dirty blocks plus whatever was written since they were fetched.
    pub(super) fn take_pending_blocks(&mut self) -> Result<Vec<Bitmap>, Failure> {
        let mut now = self.fetch_blocks()?;
        if let Some(p) = self.pending.blocks.take() {
            for (n, o) in now.iter_mut().zip(&p) {
                n.merge(o);
            }
        }
        Ok(now)
    }

    /// Waits for the destination's acknowledgement of `round`.
    pub(super) fn await_round_ack(&self, round: u32) -> Result<(), Failure> {
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
    pub(super) fn throttle_to(&mut self, limit: u64) {
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
    pub(super) fn auto_throttle(
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
    pub(super) fn merge_back_pending(&mut self) {
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
    pub(super) fn control(&self, message: &Message<'_>) -> Result<(), Failure> {
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
    pub(super) fn expect(&self, what: &str, timeout: Duration) -> Result<Control, Failure> {
        let mut deadline = Instant::now() + timeout;
        loop {
            if self.cfg.control.is_cancelled() {
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
                // Pages the guest faulted on before the push began: served first.
                Ok(Ok(Control::PullBlocks { disk, blocks })) if disk == MEMORY_SPACE => {
                    self.page_pulls.borrow_mut().extend(blocks);
                }
                // Late pulls for blocks already pushed.
                Ok(Ok(Control::PullBlocks { .. })) => {}
                // Data is still arriving over a slow link: the peer is alive.
                Ok(Ok(Control::Progress(_))) => deadline = Instant::now() + timeout,
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
