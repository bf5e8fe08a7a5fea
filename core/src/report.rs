//! Per-round statistics, progress events and the final report (the `--json` contract).

use serde::{Deserialize, Serialize};

/// One round as reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundReport {
    /// "storage", "memory" or "stop-and-copy".
    pub phase: String,
    /// Round number (monotonic across the migration).
    pub index: u32,
    /// Units found dirty for this round (pages, or blocks in storage rounds; memory rounds
    /// count pages only and report their blocks in `blocks`).
    pub dirty: u64,
    /// Units sent in this round (pages and blocks).
    pub sent: u64,
    /// Of which disk blocks.
    pub blocks: u64,
    /// Bytes written to the transport in this round.
    pub bytes: u64,
    /// Wall time of the round in milliseconds.
    pub ms: f64,
}

/// Where the downtime went (all in milliseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DowntimeBreakdown {
    /// Pausing the guest.
    pub pause_ms: f64,
    /// Sending the last dirty pages and blocks.
    pub final_copy_ms: f64,
    /// Saving and sending vCPU/device state.
    pub state_ms: f64,
    /// Full-guest hashing (only with `--verify full`).
    pub full_verify_ms: f64,
    /// From the manifest to the destination's `verified`.
    pub verify_ms: f64,
    /// From commit to the guest running on the destination.
    pub commit_resume_ms: f64,
}

/// The report of one migration; `--json` prints it as one object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Report {
    /// The migration completed and the destination runs the guest.
    pub ok: bool,
    /// The destination's manifest check and the guest's own check both passed.
    pub verified: bool,
    /// What went wrong, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On failure: whether the source guest runs again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_resumed: Option<bool>,
    /// Where the source's session ended: `running` (the guest stays here),
    /// `handed-over` (the destination has it, even if what followed failed) or
    /// `migrated-away` (confirmed running there).
    #[serde(default)]
    pub source_state: String,
    /// Hex migration id.
    pub migration_id: String,
    /// Transport name.
    pub transport: String,
    /// Channel count.
    pub channels: usize,
    /// Codec pipeline spec.
    pub codec: String,
    /// "digest" or "full".
    pub verify_mode: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Total disk size.
    pub disk_bytes: u64,
    /// Wall time from connect to the destination's resume.
    pub total_ms: f64,
    /// Source pause to destination resume.
    pub downtime_ms: f64,
    /// Fixed cost before the first round: connecting, the handshake, the destination
    /// building the guest, the storage plan (and a hash-compare).
    pub setup_ms: f64,
    /// After the destination resumed until the command returns: the post-copy push, the
    /// guest's verdict, releasing the source.
    pub teardown_ms: f64,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Bytes written to the transport.
    pub bytes_on_wire: u64,
    /// Pages sent (including zero pages sent as a flag).
    pub pages_sent: u64,
    /// Of which all-zero pages (flag only).
    pub zero_pages: u64,
    /// Disk blocks sent (including zero blocks sent as a flag).
    pub blocks_sent: u64,
    /// Of which all-zero blocks (flag only).
    pub zero_blocks: u64,
    /// Blocks never sent because they are holes or zero on the first pass.
    pub blocks_skipped_zero: u64,
    /// Blocks never sent because the destination's base already holds them.
    pub blocks_skipped_base: u64,
    /// Storage mode: "precopy".
    pub storage_mode: String,
    /// Per disk: "full", "incremental" or "hash-compared".
    pub disk_plans: Vec<String>,
    /// Storage post-copy: blocks owed at the pause and pushed after the hand-over.
    pub blocks_postcopy: u64,
    /// Of those, blocks the destination's guest asked for before they arrived.
    pub blocks_pulled: u64,
    /// How long the guest's disk writes were throttled before the pause, ms.
    pub throttled_ms: f64,
    /// The last throttle limit, blocks per second (absent when never throttled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_blocks_per_s: Option<u64>,
    /// Memory mode: "precopy", "postcopy" or "hybrid".
    pub memory_mode: String,
    /// Memory post-copy: the round after which the rest of memory moved after the
    /// hand-over (absent when every page moved before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch_round: Option<u32>,
    /// Memory post-copy: pages owed at the pause and sent after the hand-over.
    pub pages_postcopy: u64,
    /// Of those, pages pushed in the background (pre-paging included).
    pub pages_pushed: u64,
    /// Of those, pages the destination's guest faulted on and asked for.
    pub pages_demanded: u64,
    /// Memory post-copy: the destination guest's faults on owed pages.
    pub postcopy_faults: u64,
    /// Memory post-copy: fault to page installed on the destination, µs (median, 99th
    /// percentile, worst).
    pub fault_latency_us: [u64; 3],
    /// Post-copy: from the guest resuming there to the last owed unit sent, ms.
    pub postcopy_ms: f64,
    /// The migration was cancelled before the hand-over (the source kept the guest).
    pub cancelled: bool,
    /// Post-copy: how many times the source reconnected after the link broke.
    pub postcopy_reconnects: u32,
    /// Memory auto-converge: the highest vCPU throttle applied, percent (0: never).
    pub vcpu_throttle_pct: u8,
    /// Memory auto-converge: how long the vCPUs were throttled before the pause, ms.
    pub vcpu_throttled_ms: f64,
    /// Page and block payload bytes before encoding (non-zero units).
    pub payload_bytes: u64,
    /// Payload bytes after encoding.
    pub encoded_bytes: u64,
    /// Why pre-copy ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<crate::policy::StopReason>,
    /// Guest memory moved per second in the full memory pass, MB/s (10^6 bytes).
    pub first_pass_mbps: f64,
    /// Every round.
    pub rounds: Vec<RoundReport>,
    /// Per codec stage, summed over channels: units in, units it paid for, bytes in/out,
    /// encode CPU seconds, history cache hits.
    pub codec_stats: Vec<crate::codec::StageStats>,
    /// For `--codec auto`: batches encoded with each choice, summed over channels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub codec_choices: std::collections::BTreeMap<String, u64>,
    /// The destination guest's own check (pages, blocks, detail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle: Option<OracleSummary>,
}

/// The guest oracle's result as reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OracleSummary {
    /// Passed.
    pub ok: bool,
    /// Pages checked.
    pub pages_checked: u64,
    /// Blocks checked.
    pub blocks_checked: u64,
    /// Detail.
    pub detail: String,
}

/// Progress of a running migration, for progress bars.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    /// A round started with this many units to send.
    RoundStart {
        /// Phase name.
        phase: String,
        /// Round number.
        index: u32,
        /// Units to send.
        units: u64,
    },
    /// Units sent so far in the current round.
    Sent {
        /// Units done.
        units: u64,
        /// Total bytes on the wire so far.
        bytes: u64,
    },
    /// A round finished.
    RoundDone(RoundReport),
    /// What the convergence policy decides on, after each pre-copy round.
    Figures {
        /// Bytes still to send (dirty pages and blocks).
        pending_bytes: u64,
        /// The link as measured, bytes per second.
        bandwidth: f64,
        /// Pages the guest dirtied per second during the last round.
        dirty_pages_per_s: f64,
        /// The downtime if the guest paused now, ms.
        expected_downtime_ms: f64,
    },
    /// A phase change or other note.
    Note {
        /// Text.
        text: String,
    },
}

/// Hex encoding of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
