//! The destination's receiving phase: the receiver threads, and the event loop that feeds
//! what they report to the [`DestSession`] and carries out its actions up to the
//! hand-over.

use crate::wire::BitmapAssembler;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use super::handshake::{Accepted, Links};
use super::receiver::{Event, Received, ReceiverWorker};
use super::{send_shared, verify_and_restore, DestConfig, DestReport, Flush, SharedTx};
use crate::bitmap::Bitmap;
use crate::digest::{DigestDelta, DigestKey, DigestTable};
use crate::engine::{micros, ms, Control};
use crate::fault::{Faults, Point};
use crate::guest::{DestGuest, GuestLayout, PullFn, PullPagesFn, StateBlob};
use crate::machine::{ChannelOrder, DestAction, DestEvent, DestSession, DestState, ProtocolError};
use crate::wire::{FrameReader, Manifest, Message, Phase, VerifyMode, MEMORY_SPACE};

/// The receiver threads of one migration and what they share.
pub(super) struct Receivers {
    workers: Vec<JoinHandle<()>>,
    pub(super) events: Receiver<Event>,
    flush: Option<Sender<Flush>>,
    flusher: Option<JoinHandle<()>>,
    pub(super) pages: Arc<DigestTable>,
    pub(super) disks: Arc<Vec<DigestTable>>,
    pub(super) received: Arc<Received>,
    pub(super) epoch: Instant,
}

impl Receivers {
    /// One receiver thread per channel, each checking its rounds from `order`, and a
    /// background flusher.
    pub(super) fn start(links: &mut Links, accepted: &Accepted, order: ChannelOrder) -> Self {
        let layout = &accepted.hello.layout;
        let guest = &accepted.guest;
        let key = DigestKey::from_bytes(accepted.hello.digest_key);
        let pages = Arc::new(DigestTable::zeroed(
            layout.pages,
            layout.page_size as usize,
            &key,
        ));
        let disks = Arc::new(
            layout
                .disks
                .iter()
                .map(|d| DigestTable::zeroed(d.blocks, d.block_size as usize, &key))
                .collect::<Vec<_>>(),
        );
        let epoch = Instant::now();
        let received = Arc::new(Received {
            pages: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
        });
        let (ev_tx, events) = unbounded();
        let (flush_tx, flush_rx) = crossbeam_channel::bounded::<Flush>(1);
        let flusher = {
            let guest = Arc::clone(guest);
            std::thread::spawn(move || {
                for f in flush_rx {
                    let r = match f {
                        Flush::Writeback => guest.start_writeback(),
                        Flush::Sync => guest.flush(),
                    };
                    if let Err(e) = r {
                        // The flush before the acknowledgement reports it for real.
                        tracing::warn!("background flush failed: {e}");
                    }
                }
            })
        };
        let readers = links
            .rx0
            .take()
            .into_iter()
            .chain(links.rxs.drain(..).map(FrameReader::new));
        let workers = readers
            .enumerate()
            .map(|(ch, reader)| {
                let w = ReceiverWorker {
                    channel: ch,
                    guest: Arc::clone(guest),
                    decoder: accepted.codec.decoder(),
                    layout: layout.clone(),
                    pages: Arc::clone(&pages),
                    disks: Arc::clone(&disks),
                    received: Arc::clone(&received),
                    epoch,
                    order: order.clone(),
                    flush: flush_tx.clone(),
                    unflushed: 0,
                    page_delta: DigestDelta::default(),
                    disk_deltas: vec![DigestDelta::default(); layout.disks.len()],
                    staging: Vec::new(),
                    zeros: vec![0; layout.max_unit_size()],
                };
                let out = ev_tx.clone();
                let stop = Arc::clone(&links.stop);
                std::thread::spawn(move || w.run(reader, out, stop))
            })
            .collect();
        Self {
            workers,
            events,
            flush: Some(flush_tx),
            flusher: Some(flusher),
            pages,
            disks,
            received,
            epoch,
        }
    }

    /// Asks the flusher for `f` unless it is busy.
    fn flush(&self, f: Flush) {
        if let Some(tx) = &self.flush {
            let _ = tx.try_send(f);
        }
    }

    /// Milliseconds since the last data arrived.
    fn idle(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(
            now.saturating_sub(self.received.last_activity_ms.load(Ordering::Relaxed)),
        )
    }

    /// Units received so far.
    fn units(&self) -> u64 {
        self.received.pages.load(Ordering::Relaxed) + self.received.blocks.load(Ordering::Relaxed)
    }

    /// Stops every thread. With `linger`, the source first gets a moment to read the last
    /// frames.
    pub(super) fn shut_down(mut self, links: &Links, linger: bool) {
        if linger {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && self.workers.iter().any(|w| !w.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        links.stop.store(true, Ordering::Relaxed);
        links.close_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.flush = None;
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
    }
}

/// What arrives for the final state.
#[derive(Default)]
struct Final {
    page_deltas: Vec<DigestDelta>,
    disk_deltas: Vec<DigestDelta>,
    decode_s: Vec<f64>,
    state: Option<StateBlob>,
    manifest: Option<Manifest>,
}

/// The receiving phase of one migration.
pub(super) struct Receive<'a> {
    pub(super) session: DestSession,
    pub(super) faults: &'a Faults,
    pub(super) guest: Arc<dyn DestGuest>,
    pub(super) tx0: SharedTx,
    layout: GuestLayout,
    verify: VerifyMode,
    channels: usize,
    fin: Final,
    /// Storage post-copy: per disk, the blocks still owed.
    pub(super) owed: Vec<Option<Bitmap>>,
    /// Per disk, the owed bitmap being put together from its parts.
    owed_parts: Vec<BitmapAssembler>,
    /// Memory post-copy: the pages still owed.
    pub(super) owed_pages: Option<Bitmap>,
    /// The owed pages' bitmap being put together from its parts.
    owed_pages_parts: BitmapAssembler,
    round_barriers: HashMap<u32, usize>,
    pub(super) error: Option<String>,
    pub(super) t_commit: Option<Instant>,
    pub(super) report: DestReport,
}

impl<'a> Receive<'a> {
    pub(super) fn new(
        session: DestSession,
        faults: &'a Faults,
        accepted: &Accepted,
        tx0: SharedTx,
        report: DestReport,
    ) -> Self {
        let layout = accepted.hello.layout.clone();
        Self {
            session,
            faults,
            guest: Arc::clone(&accepted.guest),
            tx0,
            channels: 0,
            verify: accepted.hello.verify,
            owed: vec![None; layout.disks.len()],
            owed_parts: layout
                .disks
                .iter()
                .map(|d| BitmapAssembler::new(d.blocks))
                .collect(),
            owed_pages: None,
            owed_pages_parts: BitmapAssembler::new(layout.pages),
            fin: Final {
                disk_deltas: vec![DigestDelta::default(); layout.disks.len()],
                ..Final::default()
            },
            layout,
            round_barriers: HashMap::new(),
            error: None,
            t_commit: None,
            report,
        }
    }

    /// Decoding CPU seconds per codec stage, over every channel.
    pub(super) fn fin_decode_seconds(&self) -> Vec<f64> {
        self.fin.decode_s.clone()
    }

    /// Runs until the session leaves the receiving states: committed, in doubt or
    /// discarded.
    pub(super) fn run(&mut self, rx: &Receivers, channels: usize, cfg: &DestConfig) {
        self.channels = channels;
        let mut heartbeat = (Instant::now(), 0u64);
        loop {
            // While data flows, tell the source every second: over a slow link a round's
            // acknowledgement can take longer than its timeout, and silence would look
            // dead.
            if heartbeat.0.elapsed() >= Duration::from_secs(1) {
                let units = rx.units();
                if units != heartbeat.1 {
                    let _ = send_shared(&self.tx0, &Message::Progress(units));
                }
                heartbeat = (Instant::now(), units);
            }
            let ev = match rx.events.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    let idle = rx.idle();
                    if idle > cfg.io_timeout {
                        self.error = Some(format!(
                            "no data from the source for {:.1} s",
                            idle.as_secs_f64()
                        ));
                        self.session.fail();
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.error
                        .get_or_insert_with(|| "all channels closed".into());
                    self.session.fail();
                    return;
                }
            };
            let action = match self.on_event(ev, rx) {
                Ok(a) => a,
                Err(e) => {
                    self.error = Some(e.to_string());
                    // The machine decides: discard before the ack, in doubt after it.
                    self.session.fail()
                }
            };
            match action {
                DestAction::Continue | DestAction::AckVerified => {}
                DestAction::Verify => {
                    if !self.verify_and_acknowledge(rx) {
                        return;
                    }
                }
                DestAction::Resume
                | DestAction::ConfirmResumed
                | DestAction::Hold
                | DestAction::Discard
                | DestAction::HoldInDoubt => return,
            }
        }
    }

    /// One event from a receiver thread.
    fn on_event(&mut self, ev: Event, rx: &Receivers) -> Result<DestAction, ProtocolError> {
        let faults = self.faults;
        match ev {
            Event::FinalBarrier {
                channel,
                pages,
                disks,
                decode_s,
            } => {
                faults.hit(Point::Pause);
                for (i, s) in decode_s.into_iter().enumerate() {
                    match self.fin.decode_s.get_mut(i) {
                        Some(sum) => *sum += s,
                        None => self.fin.decode_s.push(s),
                    }
                }
                self.fin.page_deltas.push(pages);
                for (a, b) in self.fin.disk_deltas.iter_mut().zip(disks) {
                    a.add(b);
                }
                self.session.on(DestEvent::FinalBarrier(channel))
            }
            Event::Control(Control::State { version, bytes }) => {
                faults.hit(Point::State);
                self.fin.state = Some(StateBlob {
                    version,
                    bytes: bytes.into_owned(),
                });
                self.session.on(DestEvent::State)
            }
            Event::Control(Control::Manifest(m)) => {
                self.fin.manifest = Some(m);
                self.session.on(DestEvent::Manifest)
            }
            Event::Control(Control::Commit) => {
                faults.hit(Point::Commit);
                self.t_commit = Some(Instant::now());
                self.session.on(DestEvent::Commit)
            }
            Event::Control(Control::Abort(r)) => {
                self.error = Some(format!("source aborted: {r}"));
                self.session.on(DestEvent::Abort)
            }
            Event::Control(Control::OwedBlocks { disk, part })
                if self.session.state() == DestState::Receiving && disk == MEMORY_SPACE =>
            {
                match self.owed_pages_parts.add(part) {
                    Ok(Some(owed)) => {
                        let any = !owed.none();
                        self.owed_pages = Some(owed);
                        if any {
                            self.session.on(DestEvent::Owed)
                        } else {
                            Ok(DestAction::Continue)
                        }
                    }
                    Ok(None) => Ok(DestAction::Continue),
                    Err(e) => Err(ProtocolError(format!("owed pages: {e}"))),
                }
            }
            Event::Control(Control::OwedBlocks { disk, part })
                if self.session.state() == DestState::Receiving =>
            {
                let d = usize::from(disk);
                let owed = match self.owed_parts.get_mut(d).map(|a| a.add(part)) {
                    Some(Ok(Some(owed))) => owed,
                    // More parts to come.
                    Some(Ok(None)) => return Ok(DestAction::Continue),
                    Some(Err(e)) => {
                        return Err(ProtocolError(format!("owed blocks of disk {disk}: {e}")))
                    }
                    None => {
                        return Err(ProtocolError(format!(
                            "owed blocks for a disk {disk} that does not exist"
                        )))
                    }
                };
                match (self.owed.get_mut(d), self.layout.disks.get(d)) {
                    (Some(slot), Some(dl)) if owed.len() == dl.blocks => {
                        let any = !owed.none();
                        *slot = Some(owed);
                        if any {
                            self.session.on(DestEvent::Owed)
                        } else {
                            Ok(DestAction::Continue)
                        }
                    }
                    _ => Err(ProtocolError(format!(
                        "owed blocks for a disk {disk} that does not match"
                    ))),
                }
            }
            Event::Control(c) => Err(ProtocolError(format!(
                "unexpected {} from the source",
                c.name()
            ))),
            Event::PostcopyBarrier { .. } => Err(ProtocolError(
                "post-copy barrier before the hand-over".into(),
            )),
            Event::RoundBarrier { round, phase } => {
                // Acknowledge a round once every channel processed it: the source times
                // rounds (and estimates the link) end to end, not into socket buffers.
                let c = self.round_barriers.entry(round).or_insert(0);
                *c += 1;
                if *c < self.channels {
                    return Ok(DestAction::Continue);
                }
                self.round_barriers.remove(&round);
                match phase {
                    Phase::Storage => faults.hit(Point::Storage),
                    Phase::Memory => faults.hit(Point::Memory),
                    _ => {}
                }
                if let Err(e) = send_shared(&self.tx0, &Message::RoundAck(round)) {
                    self.error = Some(format!("sending a round acknowledgement: {e}"));
                    return Ok(self.session.fail());
                }
                // Durability outside the downtime: what this round wrote reaches stable
                // storage now, so the flush before `verified` is short.
                rx.flush(Flush::Sync);
                Ok(DestAction::Continue)
            }
            Event::Failed(e) => {
                self.error = Some(e);
                self.session.on(DestEvent::Lost)
            }
            Event::Closed(ch) => {
                if self.session.owns_guest() {
                    return Ok(DestAction::Continue);
                }
                self.error = Some(format!("source closed channel {ch} early"));
                self.session.on(DestEvent::Lost)
            }
        }
    }

    /// Verifies the final state, makes it durable, and acknowledges it; false when the
    /// session ended instead.
    fn verify_and_acknowledge(&mut self, rx: &Receivers) -> bool {
        let t = Instant::now();
        let r = self.verify_final(rx);
        self.report.verify_ms = ms(t.elapsed());
        let ok = r.is_ok();
        if let Err(e) = r {
            self.error = Some(e);
        }
        if self.session.on(DestEvent::VerifyDone(ok)) != Ok(DestAction::AckVerified) {
            return false;
        }
        self.faults.hit(Point::Verified);
        let verified = Message::Verified {
            verify_us: micros(t.elapsed()),
        };
        if let Err(e) = send_shared(&self.tx0, &verified) {
            self.error = Some(format!("sending verified: {e}"));
            self.session.fail();
            return false;
        }
        // Restart the silence clock: the source now waits on us.
        rx.received
            .last_activity_ms
            .store(rx.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        true
    }

    /// The manifest and the state, then durability, then the owed blocks' pull path.
    fn verify_final(&mut self, rx: &Receivers) -> Result<(), String> {
        let guest = &*self.guest;
        // Memory post-copy: the guest resumes with owed pages it faults in on demand. Set up
        // before the state is restored: from here on nothing reads an owed page's stale
        // copy.
        if let Some(bits) = self.owed_pages.clone().filter(|b| !b.none()) {
            let tx = Arc::clone(&self.tx0);
            let pull: PullPagesFn = Arc::new(move |pages: &[u64]| {
                let _ = send_shared(
                    &tx,
                    &Message::PullBlocks {
                        disk: MEMORY_SPACE,
                        blocks: pages.to_vec(),
                    },
                );
            });
            guest
                .set_owed_pages(bits, pull)
                .map_err(|e| format!("memory post-copy: {e}"))?;
        }
        verify_and_restore(
            guest,
            &self.layout,
            &rx.pages,
            &rx.disks,
            &self.fin.page_deltas,
            &self.fin.disk_deltas,
            &self.owed,
            self.owed_pages.as_ref(),
            self.fin.manifest.as_ref(),
            self.fin.state.as_ref(),
            self.verify,
            &mut self.report,
        )?;
        // Durability before the acknowledgement: every received block on stable storage,
        // and the images' metadata saying what they now hold.
        let tf = Instant::now();
        let durable = guest
            .make_durable()
            .map_err(|e| format!("making the received disks durable: {e}"));
        self.report.durable_ms = ms(tf.elapsed());
        durable?;
        // Storage post-copy: the guest resumes with owed blocks it pulls on demand.
        for (d, bits) in self.owed.iter().enumerate() {
            let Some(bits) = bits.clone().filter(|b| !b.none()) else {
                continue;
            };
            let tx = Arc::clone(&self.tx0);
            let pull: PullFn = Arc::new(move |disk, block| {
                let _ = send_shared(
                    &tx,
                    &Message::PullBlocks {
                        disk: disk as u16,
                        blocks: vec![block],
                    },
                );
            });
            guest
                .set_owed(d, bits, pull)
                .map_err(|e| format!("post-copy of disk {d}: {e}"))?;
        }
        Ok(())
    }
}
