//! Progress bars during the rounds and the human summary at the end (stderr); JSON on
//! stdout is printed by the commands.

use std::io::IsTerminal;
use std::sync::Mutex;

use ferry_core::report::{Progress, Report};
use indicatif::{ProgressBar, ProgressStyle};

use crate::units::human_bytes;

/// Renders progress events: a bar per round on a terminal, a line per round otherwise.
pub struct ProgressView {
    tty: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl ProgressView {
    /// A view on stderr; `quiet` prints nothing.
    pub fn new(quiet: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            quiet,
            bar: Mutex::new(None),
        }
    }

    /// Handles one event.
    pub fn on(&self, p: &Progress) {
        if self.quiet {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::RoundStart {
                phase,
                index,
                units,
            } => {
                if self.tty {
                    let b = ProgressBar::new(*units);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>22} [{bar:30}] {pos}/{len} units {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_prefix(format!("round {index} {phase}"));
                    *bar = Some(b);
                }
            }
            Progress::Sent { units, bytes } => {
                if let Some(b) = bar.as_ref() {
                    b.set_position(*units);
                    b.set_message(human_bytes(*bytes));
                }
            }
            Progress::RoundDone(r) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                eprintln!(
                    "  round {:>3} {:<13} dirty {:>9}  sent {:>9}  {:>10}  {:>8.1} ms",
                    r.index,
                    r.phase,
                    r.dirty,
                    r.sent,
                    human_bytes(r.bytes),
                    r.ms
                );
            }
            Progress::Note { text } => eprintln!("  {text}"),
            Progress::Figures { .. } => {}
        }
    }
}

/// Prints the human summary of a source report.
pub fn print_summary(r: &Report) {
    let status = match (r.ok, r.verified) {
        (true, true) => "migration OK, verified".to_string(),
        (true, false) => "migration completed but NOT verified".to_string(),
        (false, _) => format!(
            "migration FAILED; source {}",
            if r.source_resumed == Some(true) {
                "resumed and keeps running"
            } else {
                "did not resume"
            }
        ),
    };
    eprintln!("ferry: {status}");
    if let Some(e) = &r.error {
        eprintln!("  error: {e}");
    }
    eprintln!(
        "  {} x{} channel(s), codec {}, verify {}",
        r.transport, r.channels, r.codec, r.verify_mode
    );
    eprintln!(
        "  memory {}, disk {}",
        human_bytes(r.memory_bytes),
        human_bytes(r.disk_bytes)
    );
    if r.ok {
        let d = &r.downtime_breakdown;
        eprintln!(
            "  total {:.1} ms, downtime {:.2} ms (pause {:.2}, final copy {:.2}, state {:.2}, full verify {:.2}, verify {:.2}, commit→resume {:.2})",
            r.total_ms,
            r.downtime_ms,
            d.pause_ms,
            d.final_copy_ms,
            d.state_ms,
            d.full_verify_ms,
            d.verify_ms,
            d.commit_resume_ms
        );
        let rounds: f64 = r.rounds.iter().map(|x| x.ms).sum();
        eprintln!(
            "  setup {:.1} ms before the first round, rounds {:.1} ms, teardown {:.1} ms after the resume",
            r.setup_ms, rounds, r.teardown_ms
        );
    }
    eprintln!(
        "  on the wire {} ({} payload, {} encoded); first pass {:.0} MB/s",
        human_bytes(r.bytes_on_wire),
        human_bytes(r.payload_bytes),
        human_bytes(r.encoded_bytes),
        r.first_pass_mbps
    );
    eprintln!(
        "  pages sent {} ({} zero, flag only); blocks sent {} ({} zero), {} skipped as holes/zero, {} already at the destination",
        r.pages_sent, r.zero_pages, r.blocks_sent, r.zero_blocks, r.blocks_skipped_zero, r.blocks_skipped_base
    );
    if !r.disk_plans.is_empty() {
        eprintln!(
            "  storage {}: disks {}",
            r.storage_mode,
            r.disk_plans.join(", ")
        );
    }
    for st in &r.codec_stats {
        eprintln!(
            "  codec {}: applied to {} of {} units, ratio {:.2}, CPU {:.2} s encoding, {:.2} s decoding{}",
            st.stage,
            st.units_applied,
            st.units_in,
            st.applied_ratio(),
            st.encode_s,
            st.decode_s,
            if st.cache_lookups > 0 {
                format!(
                    ", cache hits {:.0}%",
                    100.0 * st.cache_hits as f64 / st.cache_lookups as f64
                )
            } else {
                String::new()
            }
        );
    }
    if !r.codec_choices.is_empty() {
        let choices: Vec<String> = r
            .codec_choices
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        eprintln!("  codec auto: batches per choice: {}", choices.join(", "));
    }
    if let Some(s) = r.stop_reason {
        eprintln!(
            "  pre-copy ended: {} after {} rounds",
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.rounds.len()
        );
    }
    if r.pages_postcopy > 0 {
        eprintln!(
            "  memory {}{}: {} pages after the hand-over in {:.0} ms ({} pushed, {} demanded by {} faults; fault latency p50 {} us, p99 {} us, max {} us)",
            r.memory_mode,
            r.switch_round
                .map(|n| format!(", switched after round {n}"))
                .unwrap_or_default(),
            r.pages_postcopy,
            r.postcopy_ms,
            r.pages_pushed,
            r.pages_demanded,
            r.postcopy_faults,
            r.fault_latency_us[0],
            r.fault_latency_us[1],
            r.fault_latency_us[2]
        );
    }
    if r.vcpu_throttle_pct > 0 {
        eprintln!(
            "  auto-converge: vCPUs throttled up to {}% for {:.0} ms before the pause",
            r.vcpu_throttle_pct, r.vcpu_throttled_ms
        );
    }
    if let Some(o) = &r.oracle {
        eprintln!(
            "  guest self-check: {} — {}",
            if o.ok { "passed" } else { "FAILED" },
            o.detail
        );
    }
}
