//! The destination driver: receives over accepted channels into a destination guest,
//! steered by [`DestSession`].
//!
//! Before it acknowledges, any error discards the guest. After `verified` is sent, a lost
//! source leaves the guest paused and in doubt (never resumed, never discarded), because
//! the source may already have handed over.

mod commit;
mod events;
mod handshake;
mod receiver;
mod recover;
mod storage;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{read_frame_until, Control, ReadError};
use crate::bitmap::Bitmap;
use crate::codec::CodecFactory;
use crate::digest::{guest_sums, DigestDelta, DigestTable};
use crate::fault::{Faults, Side};
use crate::guest::{DestGuest, GuestError, GuestLayout, StateBlob};
use crate::machine::{ChannelOrder, DestSession, DestState};
use crate::report::hex;
use crate::transport::Channel;
use crate::wire::{Hello, Manifest, Message, VerifyMode, REQUIRED_CAPABILITIES};

pub use recover::receive_owed_blocks;

use commit::after_commit;
use events::{Receive, Receivers};
use handshake::{handshake, Links};
use receiver::*;

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
    /// The largest guest memory accepted, in bytes; a larger one is refused in the
    /// handshake, before anything is allocated for it.
    pub max_memory: u64,
    /// The largest disk accepted, in bytes.
    pub max_disk: u64,
}

/// The largest disk a destination accepts unless told otherwise (64 TiB).
pub const DEFAULT_MAX_DISK: u64 = 64 << 40;

/// This host's physical memory in bytes (what it could give a guest at most).
pub fn host_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        _ => u64::MAX,
    }
}

impl Default for DestConfig {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(10),
            max_memory: host_memory(),
            max_disk: DEFAULT_MAX_DISK,
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
    /// Post-copy: from resuming to the last owed block or page, ms.
    pub postcopy_ms: f64,
    /// Memory post-copy: the guest's faults on pages that had not arrived.
    pub postcopy_faults: u64,
    /// Memory post-copy: fault to page installed, µs (median, 99th percentile, worst).
    pub fault_latency_us: [f64; 3],
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
fn check_hello(h: &Hello, accepted_channels: usize, cfg: &DestConfig) -> Result<(), String> {
    if h.capabilities & REQUIRED_CAPABILITIES != REQUIRED_CAPABILITIES {
        return Err("source lacks required capabilities".into());
    }
    let memory = h.layout.pages.saturating_mul(u64::from(h.layout.page_size));
    if memory > cfg.max_memory {
        return Err(format!(
            "the guest's memory ({memory} bytes) exceeds this destination's limit of {} bytes (--max-memory)",
            cfg.max_memory
        ));
    }
    for d in &h.layout.disks {
        let size = d.blocks.saturating_mul(u64::from(d.block_size));
        if size > cfg.max_disk {
            return Err(format!(
                "disk {} ({size} bytes) exceeds this destination's limit of {} bytes (--max-disk-size)",
                d.name, cfg.max_disk
            ));
        }
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
    let faults = Faults::from_env(Side::Dest, cfg.io_timeout);
    let Some(mut links) = Links::new(channels, &faults) else {
        return DestOutcome::Discarded {
            error: "no channels".into(),
        };
    };
    let n = links.count();
    let mut session = DestSession::new(n);
    let accepted = match handshake(&mut links, &mut session, make_guest, codecs, cfg, &faults) {
        Ok(a) => a,
        Err(error) => return DestOutcome::Discarded { error },
    };
    let report = DestReport {
        migration_id: hex(&accepted.hello.migration_id),
        codec: accepted.codec.spec(),
        channels: n,
        ..DestReport::default()
    };
    // From here on channel 0's sender is shared: the post-copy puller uses it too.
    let tx0: SharedTx = Arc::new(std::sync::Mutex::new(links.txs.swap_remove(0)));
    let rx = Receivers::start(&mut links, &accepted, ChannelOrder::default());
    let mut r = Receive::new(session, &faults, &accepted, tx0, report);
    r.run(&rx, n, cfg);

    r.report.pages_received = rx.received.pages.load(Ordering::Relaxed);
    r.report.blocks_received = rx.received.blocks.load(Ordering::Relaxed);
    let outcome = match r.session.state() {
        DestState::Committed => after_commit(&mut r, &rx, n, cfg, on_resumed),
        DestState::InDoubt => DestOutcome::InDoubt {
            guest: Arc::clone(&r.guest),
            error: r
                .error
                .take()
                .unwrap_or_else(|| "hand-over never arrived".into()),
            session: r.session.clone(),
            report: std::mem::take(&mut r.report),
        },
        _ => {
            let error = r
                .error
                .take()
                .unwrap_or_else(|| "migration did not complete".into());
            let _ = send_shared(&r.tx0, &Message::Abort(error.clone()));
            r.guest.discard();
            DestOutcome::Discarded { error }
        }
    };
    // Let the source read our last frames before the sockets go.
    let linger = matches!(
        outcome,
        DestOutcome::Resumed { .. } | DestOutcome::Held { .. }
    );
    rx.shut_down(&links, linger);
    outcome
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
    owed_pages: Option<&Bitmap>,
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
            pages.key(),
            |i, b| !owed_pages.is_some_and(|o| o.get(i)) && guest.read_page(i, b).is_ok(),
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
