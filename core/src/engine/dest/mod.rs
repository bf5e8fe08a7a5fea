//! The destination driver: receives over accepted channels into a destination guest,
//! steered by [`DestSession`].
//!
//! Before it acknowledges, any error discards the guest. After `verified` is sent, a lost
//! source leaves the guest paused and in doubt (never resumed, never discarded), because
//! the source may already have handed over.

mod receiver;
mod storage;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, RecvTimeoutError};

use super::{micros, ms, read_frame_until, Control, ReadError};
use crate::bitmap::Bitmap;
use crate::codec::CodecFactory;
use crate::digest::{guest_sums, DigestDelta, DigestTable};
use crate::fault::{Faults, Point, Side};
use crate::guest::{Base, DestGuest, GuestError, GuestLayout, PullFn, StateBlob};
use crate::machine::{ChannelOrder, DestAction, DestEvent, DestSession, DestState};
use crate::report::hex;
use crate::transport::Channel;
use crate::wire::{
    FrameReader, Hello, Manifest, Message, Verdict, VerifyMode, Welcome, CAPABILITIES,
    REQUIRED_CAPABILITIES,
};

use receiver::*;
use storage::*;

/// What the background flusher is asked to do.
pub(super) enum Flush {
    /// Start write-back of what was written so far (every 32 MiB of blocks).
    Writeback,
    /// Make everything written so far durable (after every round).
    Sync,
}

/// Block bytes a receiver writes between background flush requests.
const FLUSH_EVERY: u64 = 32 << 20;

/// Destination settings.
#[derive(Debug, Clone)]
pub struct DestConfig {
    /// Silence on every channel longer than this aborts (or, after the ack, leaves the
    /// guest in doubt).
    pub io_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// What the destination measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestReport {
    /// Hex migration id.
    pub migration_id: String,
    /// Codec spec.
    pub codec: String,
    /// Channels.
    pub channels: usize,
    /// Pages received (zero pages included).
    pub pages_received: u64,
    /// Blocks received (zero blocks included).
    pub blocks_received: u64,
    /// Manifest digests matched.
    pub manifest_ok: bool,
    /// Full-guest digests matched (with `--verify full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_verify_ok: Option<bool>,
    /// Time spent verifying and restoring, ms.
    pub verify_ms: f64,
    /// Commit to running, ms.
    pub resume_ms: f64,
    /// Final flush of the disk images after resuming, ms (outside the downtime).
    pub flush_ms: f64,
    /// Making the received blocks and the images' metadata durable before `verified`,
    /// ms (inside the downtime; rounds are flushed during pre-copy to keep it short).
    pub durable_ms: f64,
    /// Storage post-copy: from resuming to the last owed block, ms.
    pub postcopy_ms: f64,
    /// The guest's own check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_ok: Option<bool>,
    /// Oracle detail.
    pub oracle_detail: String,
}

/// How a receive ended.
pub enum DestOutcome {
    /// The guest runs here now.
    Resumed {
        /// The guest.
        guest: Arc<dyn DestGuest>,
        /// Figures.
        report: DestReport,
    },
    /// Failed before the acknowledgement: the guest was discarded, the source owns it.
    Discarded {
        /// Why.
        error: String,
    },
    /// Acknowledged but no hand-over arrived: the guest is kept paused for an operator.
    InDoubt {
        /// The paused guest.
        guest: Arc<dyn DestGuest>,
        /// Why.
        error: String,
        /// Storage post-copy: blocks only the source holds. While any are owed the guest
        /// cannot be resumed here.
        owed_blocks: u64,
        /// The session, which decides what an operator may do with the guest.
        session: DestSession,
        /// Figures so far.
        report: DestReport,
    },
    /// Handed over, but what had to follow could not complete (resuming failed, or the
    /// owed blocks stopped arriving): the guest is this side's, never discarded, and kept
    /// paused for an operator.
    Held {
        /// The guest.
        guest: Arc<dyn DestGuest>,
        /// Why.
        error: String,
        /// The session, which decides what an operator may do with the guest.
        session: DestSession,
        /// Figures so far.
        report: DestReport,
    },
}

/// Builds the destination guest for a layout.
pub type GuestFactory<'a> = dyn Fn(&GuestLayout) -> Result<Arc<dyn DestGuest>, GuestError> + 'a;
/// Resolves a codec spec offered by the source.
pub type CodecResolver<'a> = dyn Fn(&str) -> Result<Arc<dyn CodecFactory>, String> + 'a;

/// Checks a hello against what this side supports.
fn check_hello(h: &Hello, accepted_channels: usize) -> Result<(), String> {
    if h.capabilities & REQUIRED_CAPABILITIES != REQUIRED_CAPABILITIES {
        return Err("source lacks required capabilities".into());
    }
    if usize::from(h.channels) != accepted_channels {
        return Err(format!(
            "hello announces {} channels but {accepted_channels} connected",
            h.channels
        ));
    }
    Ok(())
}

/// Receives one migration over `channels` (as accepted by a listener). `on_resumed` runs
/// right after the guest resumed and before the source is told, so whoever hosts the guest
/// can publish it before anyone learns the migration finished.
pub fn receive(
    channels: Vec<Channel>,
    make_guest: &GuestFactory<'_>,
    codecs: &CodecResolver<'_>,
    cfg: &DestConfig,
    on_resumed: &dyn Fn(),
) -> DestOutcome {
    let n = channels.len();
    let faults = Faults::from_env(Side::Dest, cfg.io_timeout);
    let channels: Vec<Channel> = channels.into_iter().map(|c| faults.wrap(c)).collect();
    let mut txs = Vec::with_capacity(n);
    let mut rxs = Vec::with_capacity(n);
    let mut closers = Vec::new();
    for c in channels {
        txs.push(c.tx);
        rxs.push(c.rx);
        if let Some(cl) = c.closer {
            closers.push(cl);
        }
    }
    let close_all = |closers: &[Box<dyn Fn() + Send + Sync>]| {
        for c in closers {
            c();
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    if rxs.is_empty() {
        return DestOutcome::Discarded {
            error: "no channels".into(),
        };
    }
    let mut rx_iter = rxs.into_iter();
    let Some(rx0) = rx_iter.next() else {
        return DestOutcome::Discarded {
            error: "no channels".into(),
        };
    };
    let mut reader0 = FrameReader::new(rx0);
    let mut session = DestSession::new(n);

    // Handshake.
    let hello = match read_frame_until(&mut reader0, Some(Instant::now() + cfg.io_timeout), &stop) {
        Ok(Some(fh)) => match Message::decode_frame(&fh, reader0.body()) {
            Ok(Message::Hello(h)) => Ok(h),
            Ok(_) => Err(format!("expected hello, got message type {}", fh.ty)),
            Err(e) => Err(format!("bad hello: {e}")),
        },
        Ok(None) => Err("source closed the connection before the handshake".into()),
        Err(e) => Err(format!("handshake: {}", crate::engine::error_chain(&e))),
    };
    let refuse = |txs: &mut Vec<Box<dyn Write + Send>>, why: String| {
        if let Some(tx) = txs.first_mut() {
            let _ = send(tx.as_mut(), &Message::Refuse(why.clone()));
        }
        close_all(&closers);
        DestOutcome::Discarded { error: why }
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => return refuse(&mut txs, e),
    };
    if let Err(e) = check_hello(&hello, n) {
        return refuse(&mut txs, e);
    }
    let codec = match codecs(&hello.codec) {
        Ok(c) => c,
        Err(e) => return refuse(&mut txs, format!("codec {:?}: {e}", hello.codec)),
    };
    let guest = match make_guest(&hello.layout) {
        Ok(g) => g,
        Err(e) => {
            return refuse(
                &mut txs,
                format!("cannot build the guest: {}", crate::engine::error_chain(&e)),
            )
        }
    };
    let mut report = DestReport {
        migration_id: hex(&hello.migration_id),
        codec: codec.spec(),
        channels: n,
        ..DestReport::default()
    };
    let bases: Vec<Base> = (0..hello.layout.disks.len())
        .map(|d| guest.base(d))
        .collect();
    faults.hit(Point::Handshake);
    if let Err(e) = send(
        txs[0].as_mut(),
        &Message::Welcome(Welcome {
            version: hello.version,
            capabilities: CAPABILITIES,
            migration_id: hello.migration_id,
            bases: bases.clone(),
        }),
    ) {
        guest.discard();
        close_all(&closers);
        return DestOutcome::Discarded {
            error: format!("sending welcome: {e}"),
        };
    }
    if let Err(e) = session.on(DestEvent::Hello) {
        guest.discard();
        return DestOutcome::Discarded {
            error: e.to_string(),
        };
    }
    // The storage plan comes before any data: apply it before any receiver runs, so no
    // block can land in a base that is about to be replaced.
    let digest_key = crate::basecmp::key_for(&hello.migration_id);
    if let Err(e) =
        apply_storage_plan(&mut reader0, &*guest, &bases, cfg, &stop).and_then(|plans| {
            answer_hash_compare(
                &mut reader0,
                txs[0].as_mut(),
                &*guest,
                &hello.layout,
                &plans,
                &digest_key,
                cfg,
                &stop,
            )
        })
    {
        let _ = send(txs[0].as_mut(), &Message::Abort(e.clone()));
        guest.discard();
        close_all(&closers);
        return DestOutcome::Discarded { error: e };
    }

    // From here on channel 0's sender is shared: the post-copy puller uses it too.
    let tx0: SharedTx = Arc::new(std::sync::Mutex::new(txs.swap_remove(0)));
    let mut owed: Vec<Option<Bitmap>> = vec![None; hello.layout.disks.len()];
    let mut round_barriers: std::collections::HashMap<u32, usize> = Default::default();

    // Receivers.
    let layout = hello.layout.clone();
    let pages = Arc::new(DigestTable::zeroed(layout.pages, layout.page_size as usize));
    let disks = Arc::new(
        layout
            .disks
            .iter()
            .map(|d| DigestTable::zeroed(d.blocks, d.block_size as usize))
            .collect::<Vec<_>>(),
    );
    let epoch = Instant::now();
    let received = Arc::new(Received {
        pages: AtomicU64::new(0),
        blocks: AtomicU64::new(0),
        last_activity_ms: AtomicU64::new(0),
    });
    let max_unit = layout.max_unit_size();
    let (ev_tx, ev_rx) = unbounded();
    let (flush_tx, flush_rx) = crossbeam_channel::bounded::<Flush>(1);
    let flusher = {
        let guest = Arc::clone(&guest);
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
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let readers = std::iter::once(reader0).chain(rx_iter.map(FrameReader::new));
    for (ch, reader) in readers.enumerate() {
        let w = ReceiverWorker {
            channel: ch,
            guest: Arc::clone(&guest),
            decoder: codec.decoder(),
            layout: layout.clone(),
            pages: Arc::clone(&pages),
            disks: Arc::clone(&disks),
            received: Arc::clone(&received),
            epoch,
            order: ChannelOrder::default(),
            flush: flush_tx.clone(),
            unflushed: 0,
            page_delta: DigestDelta::default(),
            disk_deltas: vec![DigestDelta::default(); layout.disks.len()],
            staging: Vec::new(),
            zeros: vec![0; max_unit],
        };
        let out = ev_tx.clone();
        let stop = Arc::clone(&stop);
        workers.push(std::thread::spawn(move || w.run(reader, out, stop)));
    }
    drop(ev_tx);

    let mut page_deltas = Vec::new();
    let mut decode_s: Vec<f64> = Vec::new();
    let mut disk_deltas: Vec<DigestDelta> = vec![DigestDelta::default(); layout.disks.len()];
    let mut state: Option<StateBlob> = None;
    let mut manifest: Option<Manifest> = None;
    let mut error: Option<String> = None;
    let mut t_commit = None;

    // Event loop.
    let mut heartbeat = (Instant::now(), 0u64);
    loop {
        // While data flows, tell the source every second: over a slow link a round's
        // acknowledgement can take longer than its timeout, and silence would look dead.
        if heartbeat.0.elapsed() >= Duration::from_secs(1) {
            let units =
                received.pages.load(Ordering::Relaxed) + received.blocks.load(Ordering::Relaxed);
            if units != heartbeat.1 {
                let _ = send_shared(&tx0, &Message::Progress(units));
            }
            heartbeat = (Instant::now(), units);
        }
        let ev = match ev_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => {
                let idle = (epoch.elapsed().as_millis() as u64)
                    .saturating_sub(received.last_activity_ms.load(Ordering::Relaxed));
                if Duration::from_millis(idle) > cfg.io_timeout {
                    error = Some(format!(
                        "no data from the source for {:.1} s",
                        idle as f64 / 1000.0
                    ));
                    session.fail();
                    break;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                error.get_or_insert_with(|| "all channels closed".into());
                session.fail();
                break;
            }
        };
        let step = match ev {
            Event::FinalBarrier {
                channel,
                pages: pd,
                disks: dd,
                decode_s: ds,
            } => {
                faults.hit(Point::Pause);
                for (i, s) in ds.into_iter().enumerate() {
                    match decode_s.get_mut(i) {
                        Some(sum) => *sum += s,
                        None => decode_s.push(s),
                    }
                }
                page_deltas.push(pd);
                for (a, b) in disk_deltas.iter_mut().zip(dd) {
                    a.add(b);
                }
                session.on(DestEvent::FinalBarrier(channel))
            }
            Event::Control(Control::State { version, bytes }) => {
                faults.hit(Point::State);
                state = Some(StateBlob {
                    version,
                    bytes: bytes.into_owned(),
                });
                session.on(DestEvent::State)
            }
            Event::Control(Control::Manifest(m)) => {
                manifest = Some(m);
                session.on(DestEvent::Manifest)
            }
            Event::Control(Control::Commit) => {
                faults.hit(Point::Commit);
                t_commit = Some(Instant::now());
                session.on(DestEvent::Commit)
            }
            Event::Control(Control::Abort(r)) => {
                error = Some(format!("source aborted: {r}"));
                session.on(DestEvent::Abort)
            }
            Event::Control(Control::OwedBlocks { disk, owed: bits })
                if session.state() == DestState::Receiving =>
            {
                match (
                    owed.get_mut(usize::from(disk)),
                    layout.disks.get(usize::from(disk)),
                ) {
                    (Some(slot), Some(dl)) if bits.len() == dl.blocks => {
                        let any = !bits.none();
                        *slot = Some(bits);
                        if any {
                            session.on(DestEvent::Owed)
                        } else {
                            Ok(DestAction::Continue)
                        }
                    }
                    _ => Err(crate::machine::ProtocolError(format!(
                        "owed blocks for a disk {disk} that does not match"
                    ))),
                }
            }
            Event::Control(c) => Err(crate::machine::ProtocolError(format!(
                "unexpected {} from the source",
                c.name()
            ))),
            Event::PostcopyBarrier { .. } => Err(crate::machine::ProtocolError(
                "post-copy barrier before the hand-over".into(),
            )),
            Event::RoundBarrier { round, phase } => {
                // Acknowledge a round once every channel processed it: the source times
                // rounds (and estimates the link) end to end, not into socket buffers.
                let c = round_barriers.entry(round).or_insert(0);
                *c += 1;
                if *c == n {
                    round_barriers.remove(&round);
                    match phase {
                        crate::wire::Phase::Storage => faults.hit(Point::Storage),
                        crate::wire::Phase::Memory => faults.hit(Point::Memory),
                        _ => {}
                    }
                    if let Err(e) = send_shared(&tx0, &Message::RoundAck(round)) {
                        error = Some(format!("sending a round acknowledgement: {e}"));
                        session.fail();
                        break;
                    }
                    // Durability outside the downtime: what this round wrote reaches
                    // stable storage now, so the flush before `verified` is short.
                    let _ = flush_tx.try_send(Flush::Sync);
                }
                Ok(DestAction::Continue)
            }
            Event::Failed(e) => {
                error = Some(e);
                session.on(DestEvent::Lost)
            }
            Event::Closed(ch) => {
                if session.owns_guest() {
                    continue;
                }
                error = Some(format!("source closed channel {ch} early"));
                session.on(DestEvent::Lost)
            }
        };
        let action = match step {
            Ok(a) => a,
            Err(e) => {
                error = Some(e.to_string());
                // The machine decides: discard before the ack, in doubt after it.
                session.fail()
            }
        };
        match action {
            DestAction::Continue | DestAction::AckVerified => {}
            DestAction::ConfirmResumed | DestAction::Hold => break,
            DestAction::Verify => {
                let t = Instant::now();
                let r = verify_and_restore(
                    &*guest,
                    &layout,
                    &pages,
                    &disks,
                    &page_deltas,
                    &disk_deltas,
                    &owed,
                    manifest.as_ref(),
                    state.as_ref(),
                    hello.verify,
                    &mut report,
                );
                // Durability before the acknowledgement: every received block on stable
                // storage, and the images' metadata saying what they now hold.
                let r = r.and_then(|()| {
                    let tf = Instant::now();
                    let d = guest
                        .make_durable()
                        .map_err(|e| format!("making the received disks durable: {e}"));
                    report.durable_ms = ms(tf.elapsed());
                    d
                });
                // Storage post-copy: the guest resumes with owed blocks it pulls on demand.
                let r = r.and_then(|()| {
                    for (d, bits) in owed.iter().enumerate() {
                        if let Some(bits) = bits.clone().filter(|b| !b.none()) {
                            let tx = Arc::clone(&tx0);
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
                    }
                    Ok(())
                });
                report.verify_ms = super::ms(t.elapsed());
                let ok = r.is_ok();
                if let Err(e) = r {
                    error = Some(e);
                }
                match session.on(DestEvent::VerifyDone(ok)) {
                    Ok(DestAction::AckVerified) => {
                        faults.hit(Point::Verified);
                        if let Err(e) = send_shared(
                            &tx0,
                            &Message::Verified {
                                verify_us: micros(t.elapsed()),
                            },
                        ) {
                            error = Some(format!("sending verified: {e}"));
                            session.fail();
                            break;
                        }
                        // Restart the silence clock: the source now waits on us.
                        received
                            .last_activity_ms
                            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            DestAction::Resume => break,
            DestAction::Discard | DestAction::HoldInDoubt => break,
        }
    }

    report.pages_received = received.pages.load(Ordering::Relaxed);
    report.blocks_received = received.blocks.load(Ordering::Relaxed);
    let outcome = match session.state() {
        DestState::Committed => after_commit(
            &mut session,
            &faults,
            &guest,
            &tx0,
            &ev_rx,
            &disks,
            n,
            cfg,
            t_commit.unwrap_or_else(Instant::now),
            &decode_s,
            report,
            on_resumed,
        ),
        DestState::InDoubt => DestOutcome::InDoubt {
            guest: Arc::clone(&guest),
            error: error.unwrap_or_else(|| "hand-over never arrived".into()),
            owed_blocks: owed_count(&owed),
            session: session.clone(),
            report,
        },
        _ => {
            let error = error.unwrap_or_else(|| "migration did not complete".into());
            let _ = send_shared(&tx0, &Message::Abort(error.clone()));
            guest.discard();
            DestOutcome::Discarded { error }
        }
    };
    // Let the source read our last frames before the sockets go.
    if matches!(
        outcome,
        DestOutcome::Resumed { .. } | DestOutcome::Held { .. }
    ) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    close_all(&closers);
    for w in workers {
        let _ = w.join();
    }
    drop(flush_tx);
    let _ = flusher.join();
    outcome
}

fn owed_count(owed: &[Option<Bitmap>]) -> u64 {
    owed.iter().flatten().map(Bitmap::count).sum()
}

/// After `commit`: the guest is this side's and is never discarded. Resume it, confirm,
/// wait for owed blocks, flush, and send the self-check. What cannot complete holds the
/// guest (paused) for an operator.
#[allow(clippy::too_many_arguments)]
fn after_commit(
    session: &mut DestSession,
    faults: &Faults,
    guest: &Arc<dyn DestGuest>,
    tx0: &SharedTx,
    ev_rx: &crossbeam_channel::Receiver<Event>,
    disks: &[DigestTable],
    channels: usize,
    cfg: &DestConfig,
    t_commit: Instant,
    decode_s: &[f64],
    mut report: DestReport,
    on_resumed: &dyn Fn(),
) -> DestOutcome {
    let held = |session: &DestSession, report: DestReport, error: String| DestOutcome::Held {
        guest: Arc::clone(guest),
        error,
        session: session.clone(),
        report,
    };
    let resumed = guest.resume();
    let ok = resumed.is_ok();
    if session.on(DestEvent::ResumeDone(ok)) != Ok(DestAction::ConfirmResumed) {
        let why = resumed.err().map_or_else(String::new, |e| e.to_string());
        return held(
            session,
            report,
            format!("committed, but resuming the guest failed: {why}"),
        );
    }
    report.resume_ms = ms(t_commit.elapsed());
    on_resumed();
    faults.hit(Point::Resumed);
    let _ = send_shared(
        tx0,
        &Message::Resumed {
            resume_us: micros(t_commit.elapsed()),
        },
    );
    // The guest's own check runs beside the post-copy wait: it reads owed blocks, which
    // it pulls ahead of the background push; if the push fails the reads fail at once.
    let mut held_error = None;
    let done = AtomicBool::new(false);
    let check = std::thread::scope(|scope| {
        let checker = scope.spawn(|| {
            let c = guest.self_check();
            done.store(true, Ordering::Release);
            c
        });
        // The source waits for the verdict no longer than its timeout after the last
        // sign of life: say every second that the check is still running.
        scope.spawn(|| {
            let mut last = Instant::now();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= Duration::from_secs(1) {
                    let _ = send_shared(tx0, &Message::Progress(0));
                    last = Instant::now();
                }
            }
        });
        if session.owes_blocks() {
            faults.hit(Point::Postcopy);
            let tp = Instant::now();
            let r = wait_postcopy(ev_rx, disks, channels, cfg);
            report.postcopy_ms = ms(tp.elapsed());
            match r {
                Ok(()) => {
                    let _ = session.on(DestEvent::PostcopyDone);
                }
                Err(e) => {
                    // The blocks can only come from the source: hold the guest paused
                    // rather than let it read holes.
                    if session.fail() == DestAction::Hold {
                        guest.abandon_owed();
                        if let Err(p) = guest.hold() {
                            tracing::warn!("pausing the held guest: {p}");
                        }
                    }
                    held_error = Some(format!(
                        "committed, but post-copy did not finish ({e}); the guest is held paused with {} blocks owed by the source",
                        guest.owed_blocks()
                    ));
                }
            }
        }
        let c = checker.join().ok().flatten();
        done.store(true, Ordering::Release);
        c
    });
    let tf = Instant::now();
    let flushed = guest.flush();
    report.flush_ms = ms(tf.elapsed());
    let mut verdict = match check {
        Some(o) => {
            report.oracle_ok = Some(o.ok);
            report.oracle_detail = if o.ok {
                format!(
                    "{} pages and {} blocks hold their last written version",
                    o.pages_checked, o.blocks_checked
                )
            } else {
                o.problems.join("; ")
            };
            Verdict {
                ok: o.ok,
                pages_checked: o.pages_checked,
                blocks_checked: o.blocks_checked,
                detail: report.oracle_detail.clone(),
                decode_ns: Vec::new(),
            }
        }
        None => Verdict {
            ok: report.manifest_ok,
            pages_checked: 0,
            blocks_checked: 0,
            detail: "no guest oracle; manifest matched".into(),
            decode_ns: Vec::new(),
        },
    };
    verdict.decode_ns = decode_s.iter().map(|s| (s * 1e9) as u64).collect();
    let mut fail = |detail: String| {
        verdict.ok = false;
        verdict.detail.clone_from(&detail);
        report.oracle_ok = Some(false);
        report.oracle_detail = detail;
    };
    if let Some(e) = &held_error {
        fail(e.clone());
    }
    if let Err(e) = flushed {
        fail(format!("flushing the disk images failed: {e}"));
    }
    faults.hit(Point::Verdict);
    let _ = send_shared(tx0, &Message::Verdict(verdict));
    match held_error {
        Some(e) => held(session, report, e),
        None => DestOutcome::Resumed {
            guest: Arc::clone(guest),
            report,
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn verify_and_restore(
    guest: &dyn DestGuest,
    layout: &GuestLayout,
    pages: &DigestTable,
    disks: &[DigestTable],
    page_deltas: &[DigestDelta],
    disk_deltas: &[DigestDelta],
    owed: &[Option<Bitmap>],
    manifest: Option<&Manifest>,
    state: Option<&StateBlob>,
    verify: VerifyMode,
    report: &mut DestReport,
) -> Result<(), String> {
    let m = manifest.ok_or("no manifest")?;
    let got_pages = pages.sum_with(page_deltas.iter().copied());
    if got_pages != m.pages {
        return Err("memory digest mismatch: the pages received differ from the pages sent".into());
    }
    if m.disks.len() != disks.len() {
        return Err("manifest names a different number of disks".into());
    }
    for (d, (t, want)) in disks.iter().zip(&m.disks).enumerate() {
        if t.sum_with([disk_deltas.get(d).copied().unwrap_or_default()]) != *want {
            return Err(format!("disk {d} digest mismatch"));
        }
    }
    report.manifest_ok = true;
    if verify == VerifyMode::Full {
        let (want_p, want_d) = m
            .full
            .as_ref()
            .ok_or("full verification asked but not sent")?;
        // Owed blocks are not here yet: both sides hash them as absent, and the
        // post-copy push checks them against the source's digests as they arrive.
        let (got_p, got_d) = guest_sums(
            layout,
            |i, b| guest.read_page(i, b).is_ok(),
            |d, i, b| {
                let is_owed = owed
                    .get(d)
                    .and_then(Option::as_ref)
                    .is_some_and(|o| o.get(i));
                !is_owed && guest.read_block(d, i, b).is_ok()
            },
        );
        let ok = got_p == *want_p && got_d == *want_d;
        report.full_verify_ok = Some(ok);
        if !ok {
            return Err("full verification failed: the destination's guest differs from the paused source (a dirty page or block was missed)".into());
        }
    }
    let st = state.ok_or("no state")?;
    guest
        .restore_state(st)
        .map_err(|e| format!("restoring state: {e}"))?;
    Ok(())
}
