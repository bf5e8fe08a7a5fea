//! The source driver: runs [`SourcePlan`] over a transport and a source guest.
//!
//! Safety rule: until the destination acknowledged a verified final state the source owns
//! the guest; any error, timeout or cancel resumes it (and merges back the dirty bits of the
//! round that failed). After `commit` is sent the source never resumes.

mod sender;
mod session;
mod storage;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Sender};

use super::{block_channel, ms, page_channel, read_frame_until, Control, ReadError};
use crate::bitmap::Bitmap;
use crate::codec::CodecFactory;
use crate::digest::{guest_sums, DigestDelta, DigestTable};
use crate::fault::{Faults, Point, Side};
use crate::guest::{Base, DiskPlan, SourceGuest};
use crate::machine::{SourceAction, SourceEvent, SourcePlan, SourceSession, SourceStep};
use crate::pacer::Pacer;
use crate::policy::{ConvergencePolicy, RoundFigures};
use crate::report::{hex, OracleSummary, Progress, Report};
use crate::transport::{Channel, CountingWriter, Transport};
use crate::wire::{
    frame::write_frame, FrameBuf, FrameReader, Hello, Manifest, Message, Phase, VerifyMode,
    CAPABILITIES, PROTOCOL_VERSION, REQUIRED_CAPABILITIES,
};

use sender::*;
use session::*;
use storage::*;

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
    let faults = Faults::from_env(Side::Source, cfg.io_timeout);
    let channels: Vec<Channel> = channels.into_iter().map(|c| faults.wrap(c)).collect();
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        faults,
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
    let mut workers: Vec<JoinHandle<CodecFigures>> = Vec::new();
    let mut work_txs = Vec::new();
    let (ctl_tx, ctl_rx) = unbounded();
    let mut ctl_reader = None;
    for (i, Channel { tx, rx, closer }) in channels.into_iter().enumerate() {
        if let Some(c) = closer {
            closers.push(c);
        }
        let mut tx: Box<dyn Write + Send> =
            Box::new(CountingWriter::new(tx, Arc::clone(&wire_bytes)));
        if i == 0 {
            shared.faults.hit(Point::Handshake);
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
            staging: Vec::new(),
            slots: Vec::new(),
            spare: Vec::new(),
            last_sent: None,
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
        acks: Default::default(),
    };
    let mut paused_at: Option<Instant> = None;
    let mut machine = SourceSession::new(cfg.storage_mode == StorageMode::PostCopy);
    let result = run(&mut s, cfg, &mut paused_at, &mut machine, t0);
    // Every failure goes through the machine, which alone decides whether the guest
    // resumes here (before the hand-over) or never again (after it).
    let on_failure = result.as_ref().err().map(|_| machine.fail());
    if on_failure == Some(SourceAction::ResumeHere) {
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
    report.source_state = machine.state().name().into();
    if let Err(Failure(msg)) = &result {
        report.error = Some(msg.clone());
        if on_failure != Some(SourceAction::Finish) {
            report.ok = false;
        }
        if on_failure == Some(SourceAction::ResumeHere) {
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
        if let Ok((stats, choices)) = w.join() {
            for (i, st) in stats.iter().enumerate() {
                match report.codec_stats.get_mut(i) {
                    Some(sum) => {
                        sum.add(st);
                        sum.stage.clone_from(&st.stage);
                    }
                    None => report.codec_stats.push(st.clone()),
                }
            }
            for (name, n) in choices {
                *report.codec_choices.entry(name).or_default() += n;
            }
        }
    }
    for st in &mut report.codec_stats {
        st.ratio = st.applied_ratio();
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

/// Feeds `ev` to the machine; an event it does not expect is a failure.
fn feed(machine: &mut SourceSession, ev: SourceEvent) -> Result<SourceAction, Failure> {
    machine.on(ev).map_err(|e| Failure(e.to_string()))
}

fn run(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    paused_at: &mut Option<Instant>,
    machine: &mut SourceSession,
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
    feed(machine, SourceEvent::Welcome)?;
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
    if feed(machine, SourceEvent::Converged)? != SourceAction::Pause {
        return Err(Failure("the session did not pause".into()));
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
    s.shared.faults.hit(Point::Pause);
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
    s.shared.faults.hit(Point::State);
    s.control(&Message::State {
        version: state.version,
        bytes: std::borrow::Cow::Borrowed(&state.bytes),
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
        let sums = guest_sums(
            &layout,
            |i, b| guest.read_page(i, b).is_ok(),
            |d, i, b| guest.read_block(d, i, b).is_ok(),
        );
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
    feed(machine, SourceEvent::FinalSent)?;
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
    s.shared.faults.hit(Point::Verified);
    s.report.downtime_breakdown.verify_ms = ms(t_verify.elapsed());

    // Hand-over: the machine decides before `commit` is written, so from here on the
    // source never resumes, whatever happens to the message.
    if feed(machine, SourceEvent::Verified)? != SourceAction::Commit {
        return Err(Failure("the session did not commit".into()));
    }
    let t_commit = Instant::now();
    s.shared.faults.hit(Point::Commit);
    let sent = s
        .control(&Message::Commit)
        .map_err(|Failure(e)| Failure(format!("commit sent but not confirmed: {e}")))
        .and_then(|()| feed(machine, SourceEvent::CommitSent).map(drop));
    // The backend's hand-over work (stopping the vCPUs for good, marking images as bases)
    // runs beside the wait for `resumed`: the guest is paused and `committed` is set.
    let handing = {
        let g = Arc::clone(&guest);
        std::thread::spawn(move || g.handed_over())
    };
    let result = finish_after_commit(
        s,
        machine,
        cfg,
        plan.next_round(),
        t0,
        t_pause,
        t_commit,
        sent,
    );
    let _ = handing.join();
    result
}

/// After `commit`: wait for `resumed`, run the post-copy push if any, wait for the verdict.
#[allow(clippy::too_many_arguments)]
fn finish_after_commit(
    s: &mut Session<'_>,
    machine: &mut SourceSession,
    cfg: &SourceConfig,
    postcopy_round: u32,
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
    s.shared.faults.hit(Point::Resumed);
    let postcopy = feed(machine, SourceEvent::Resumed)? == SourceAction::PushOwed;
    if postcopy {
        s.shared.faults.hit(Point::Postcopy);
        let owed = s.pending.blocks.take().unwrap_or_default();
        postcopy_push(s, cfg, postcopy_round, owed)
            .map_err(|Failure(e)| Failure(format!("committed, but post-copy failed: {e}")))?;
    } else {
        // The guest runs on the destination with everything it needs.
        s.report.ok = true;
    }
    (s.progress)(Progress::Note {
        text: "guest resumed on the destination; waiting for its self-check".into(),
    });
    // The destination says every second that its check still runs. With post-copy, its
    // verdict is also the confirmation that every owed block arrived: until then the
    // migration is not done, whatever the push wrote into the socket.
    let v = match s.expect("verdict", cfg.io_timeout) {
        Ok(Control::Verdict(v)) => v,
        Ok(other) => {
            return Err(Failure(format!(
                "committed; expected verdict, got {}",
                other.name()
            )))
        }
        Err(Failure(e)) => {
            return Err(Failure(format!(
                "committed; no verdict from the destination: {e}"
            )))
        }
    };
    s.shared.faults.hit(Point::Verdict);
    if postcopy {
        if !v.ok {
            return Err(Failure(format!(
                "committed, but the destination could not complete post-copy: {}",
                v.detail
            )));
        }
        feed(machine, SourceEvent::PostcopyDone)?;
        s.report.ok = true;
    }
    feed(machine, SourceEvent::Verdict)?;
    s.report.verified = v.ok;
    // The channels' encoder figures are added to these when the senders finish.
    s.report.codec_stats = v
        .decode_ns
        .iter()
        .map(|ns| crate::codec::StageStats {
            decode_s: *ns as f64 / 1e9,
            ..Default::default()
        })
        .collect();
    s.report.oracle = Some(OracleSummary {
        ok: v.ok,
        pages_checked: v.pages_checked,
        blocks_checked: v.blocks_checked,
        detail: v.detail,
    });
    if !v.ok {
        s.report.error = Some("destination's self-check failed".into());
    }
    Ok(())
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
                    Ok(m) => match m.into_control() {
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
