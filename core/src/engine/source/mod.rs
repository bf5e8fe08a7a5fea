//! The source driver: runs [`SourcePlan`] over a transport and a source guest.
//!
//! Safety rule: until the destination acknowledged a verified final state the source owns
//! the guest; any error, timeout or cancel resumes it (and merges back the dirty bits of the
//! round that failed). After `commit` is sent the source never resumes.

mod phases;
mod postcopy;
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
use crate::codec::CodecFactory;
use crate::control::MigrationControl;
use crate::digest::{DigestDelta, DigestKey, DigestTable};
use crate::fault::{Faults, Point, Side};
use crate::guest::SourceGuest;
use crate::machine::{SourceAction, SourceSession};
use crate::pacer::Pacer;
use crate::policy::ConvergencePolicy;
use crate::report::{hex, Progress, Report};
use crate::transport::{Channel, CountingWriter, Transport};
use crate::wire::{
    frame::write_frame, FrameBuf, FrameReader, Hello, Message, VerifyMode, CAPABILITIES,
    CAP_RECOVER, PROTOCOL_VERSION,
};

use phases::{recover_owed, run};
use sender::*;
use session::*;

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
    /// Live control: cancel (before the hand-over the source then resumes), switch a
    /// hybrid migration to post-copy, change the bandwidth cap and the downtime target.
    pub control: Arc<MigrationControl>,
    /// Disk write throttling.
    pub throttle: Throttle,
    /// When the last dirty blocks move: during the pause, or after the hand-over.
    pub storage_mode: StorageMode,
    /// When guest memory moves: before the pause, after the hand-over, or both.
    pub memory_mode: MemoryMode,
    /// Memory auto-converge: throttle the vCPUs while pre-copy does not converge.
    pub auto_converge: bool,
}

/// When guest memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMode {
    /// Pre-copy rounds, then the last dirty pages in the pause.
    PreCopy,
    /// Memory after the hand-over: the pause sends only the state and the bitmap of
    /// owed pages; the destination's guest runs at once and faults pages in while the
    /// source pushes the rest.
    PostCopy,
    /// Pre-copy rounds, then post-copy for what is left when the rounds would not reach
    /// the downtime target (or when an operator asks).
    Hybrid,
}

impl MemoryMode {
    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MemoryMode::PreCopy => "precopy",
            MemoryMode::PostCopy => "postcopy",
            MemoryMode::Hybrid => "hybrid",
        }
    }
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
            control: Arc::default(),
            throttle: Throttle::Auto,
            storage_mode: StorageMode::PreCopy,
            memory_mode: MemoryMode::PreCopy,
            auto_converge: true,
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
    drive(guest, transport, codec, cfg, progress, None)
}

/// Recovers the interrupted storage post-copy of migration `migration_id`: `guest` was
/// handed over, and the destination holds it with blocks still owed (its link broke
/// during the push). Connects to `cfg.addr` again and pushes exactly what the destination
/// says it still owes; `ok` when it has everything. The guest never resumes here.
pub fn recover_postcopy(
    guest: Arc<dyn SourceGuest>,
    transport: &dyn Transport,
    codec: Arc<dyn CodecFactory>,
    cfg: &SourceConfig,
    migration_id: [u8; 16],
    progress: &(dyn Fn(Progress) + Sync),
) -> Report {
    drive(guest, transport, codec, cfg, progress, Some(migration_id))
}

/// A migration, or (`recover` names it) the recovery of one's post-copy.
fn drive(
    guest: Arc<dyn SourceGuest>,
    transport: &dyn Transport,
    codec: Arc<dyn CodecFactory>,
    cfg: &SourceConfig,
    progress: &(dyn Fn(Progress) + Sync),
    recover: Option<[u8; 16]>,
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
        memory_mode: cfg.memory_mode.name().into(),
        verify_mode: match cfg.verify {
            VerifyMode::Digest => "digest",
            VerifyMode::Full => "full",
        }
        .into(),
        memory_bytes: layout.memory_bytes(),
        disk_bytes: layout.disk_bytes(),
        ..Report::default()
    };
    let migration_id = recover.unwrap_or_else(|| {
        let mut id = [0u8; 16];
        fill_random(&mut id);
        id
    });
    report.migration_id = hex(&migration_id);
    // A recovery starts handed over: a failure never resumes the guest here.
    let mut machine = match recover {
        Some(_) => SourceSession::recovering(),
        None => SourceSession::new(
            cfg.storage_mode == StorageMode::PostCopy || cfg.memory_mode == MemoryMode::PostCopy,
        ),
    };

    let channels = match transport.connect(&cfg.addr, cfg.channels.max(1)) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(error_chain(&e));
            report.source_resumed = Some(machine.fail() == SourceAction::ResumeHere);
            report.source_state = machine.state().name().into();
            return report;
        }
    };
    let faults = Faults::from_env(Side::Source, cfg.io_timeout);
    let channels: Vec<Channel> = channels.into_iter().map(|c| faults.wrap(c)).collect();
    // A fresh secret per migration: no guest can predict a digest.
    let digest_key = DigestKey::random();
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        faults,
        guest: Arc::clone(&guest),
        pages: DigestTable::zeroed(layout.pages, layout.page_size as usize, &digest_key),
        disks: layout
            .disks
            .iter()
            .map(|d| DigestTable::zeroed(d.blocks, d.block_size as usize, &digest_key))
            .collect(),
        layout: layout.clone(),
        pacer: Mutex::new(cfg.max_bandwidth.map(pacer_for)),
        counters: Counters::default(),
        wire_bytes: Arc::clone(&wire_bytes),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        urgent_channel0: AtomicBool::new(false),
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
                capabilities: CAPABILITIES | if recover.is_some() { CAP_RECOVER } else { 0 },
                migration_id,
                digest_key: digest_key.bytes(),
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
        page_pulls: Default::default(),
        memory_postcopy: false,
        vcpu_throttle: None,
        new_downtime: Default::default(),
        round_done0: Default::default(),
        started: t0,
    };
    let mut paused_at: Option<Instant> = None;
    let result = match recover {
        None => run(&mut s, cfg, &mut paused_at, &mut machine, t0),
        Some(_) => recover_owed(&mut s, cfg, &mut machine),
    };
    // Every failure goes through the machine, which alone decides whether the guest
    // resumes here (before the hand-over) or never again (after it).
    let on_failure = result.as_ref().err().map(|_| machine.fail());
    if on_failure == Some(SourceAction::ResumeHere) {
        s.merge_back_pending();
    }
    if let Some((since, _)) = s.vcpu_throttle {
        // A guest that stays here runs at full speed again.
        guest.throttle_vcpus(crate::guest::VcpuThrottle::default());
        if s.report.vcpu_throttled_ms == 0.0 {
            s.report.vcpu_throttled_ms = ms(since.elapsed());
        }
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
    report.cancelled = result.is_err() && cfg.control.is_cancelled();
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
    let whole = ms(t0.elapsed());
    if report.total_ms == 0.0 {
        report.total_ms = whole;
    }
    report.teardown_ms = (whole - report.total_ms).max(0.0);
    report
}

/// The token bucket for a cap of `rate` bytes per second (bursts of 1/20 s, at least 1 MiB).
pub(super) fn pacer_for(rate: u64) -> Pacer {
    Pacer::new(rate, (rate / 20).max(1 << 20))
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
