//! A running migration as the control socket shows it (`ferry status` while migrating,
//! `ferry cancel`, `ferry set`, `ferry postcopy`): its live control and the figures its
//! progress events carry.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_core::control::MigrationControl;
use ferry_core::report::Progress;
use serde_json::{json, Value};

use crate::opts::MemoryModeArg;

/// One running migration.
pub struct Running {
    /// Its live control.
    pub control: Arc<MigrationControl>,
    /// `--memory-mode`.
    pub memory_mode: MemoryModeArg,
    figures: Mutex<Figures>,
}

/// What the progress events said so far.
struct Figures {
    started: Instant,
    phase: String,
    round: u32,
    units: u64,
    sent: u64,
    bytes: u64,
    /// Bytes on the wire when the round began.
    round_bytes0: u64,
    /// The last byte count and when, for the rate.
    last: (Instant, u64),
    /// Bytes per second on the wire, smoothed.
    rate: f64,
    pending_bytes: Option<u64>,
    bandwidth: Option<f64>,
    dirty_pages_per_s: Option<f64>,
    expected_downtime_ms: Option<f64>,
    note: Option<String>,
}

impl Running {
    /// A migration starting now.
    pub fn new(control: Arc<MigrationControl>, memory_mode: MemoryModeArg) -> Self {
        let now = Instant::now();
        Self {
            control,
            memory_mode,
            figures: Mutex::new(Figures {
                started: now,
                phase: "handshake".into(),
                round: 0,
                units: 0,
                sent: 0,
                bytes: 0,
                round_bytes0: 0,
                last: (now, 0),
                rate: 0.0,
                pending_bytes: None,
                bandwidth: None,
                dirty_pages_per_s: None,
                expected_downtime_ms: None,
                note: None,
            }),
        }
    }

    /// Takes in one progress event.
    pub fn track(&self, p: &Progress) {
        let mut f = self.figures.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::RoundStart {
                phase,
                index,
                units,
            } => {
                f.phase.clone_from(phase);
                f.round = *index;
                f.units = *units;
                f.sent = 0;
                f.round_bytes0 = f.bytes;
            }
            Progress::Sent { units, bytes } => {
                f.sent = *units;
                f.bytes = *bytes;
                let now = Instant::now();
                let dt = now.duration_since(f.last.0).as_secs_f64();
                if dt >= 0.2 {
                    let r = bytes.saturating_sub(f.last.1) as f64 / dt;
                    f.rate = if f.rate == 0.0 {
                        r
                    } else {
                        0.5 * f.rate + 0.5 * r
                    };
                    f.last = (now, *bytes);
                }
            }
            Progress::RoundDone(r) => f.sent = r.sent,
            Progress::Figures {
                pending_bytes,
                bandwidth,
                dirty_pages_per_s,
                expected_downtime_ms,
            } => {
                f.pending_bytes = Some(*pending_bytes);
                f.bandwidth = Some(*bandwidth);
                f.dirty_pages_per_s = Some(*dirty_pages_per_s);
                f.expected_downtime_ms = Some(*expected_downtime_ms);
            }
            Progress::Note { text } => f.note = Some(text.clone()),
        }
    }

    /// The status object (`migration` in `ferry status --json`).
    pub fn status(&self) -> Value {
        let f = self.figures.lock().unwrap_or_else(|e| e.into_inner());
        let left = f.units.saturating_sub(f.sent);
        // The round's units left, at the bytes per unit on the wire so far this round
        // (zero pages cost a flag, compressed units less than a page), at today's rate.
        let eta_s = (f.rate > 0.0 && f.sent > 0).then(|| {
            let per_unit = f.bytes.saturating_sub(f.round_bytes0) as f64 / f.sent as f64;
            left as f64 * per_unit / f.rate
        });
        json!({
            "phase": f.phase,
            "round": f.round,
            "round_units": f.units,
            "round_units_sent": f.sent,
            "round_units_left": left,
            "bytes_on_wire": f.bytes,
            "elapsed_s": f.started.elapsed().as_secs_f64(),
            "wire_mbps": f.rate * 8e-6,
            "link_mbps": f.bandwidth.map(|b| b * 8e-6),
            "pending_bytes": f.pending_bytes,
            "dirty_pages_per_s": f.dirty_pages_per_s,
            "expected_downtime_ms": f.expected_downtime_ms,
            "round_eta_s": eta_s,
            "memory_mode": self.memory_mode,
            "cancelled": self.control.is_cancelled(),
            "committed": self.control.is_committed(),
            "note": f.note,
        })
    }
}
