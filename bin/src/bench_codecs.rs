//! `ferry bench codecs`: whole migrations of the same guest with each codec over a link
//! capped at a given bandwidth, interleaved, with the table users compare codecs by:
//! ratio, effective throughput, total time and downtime.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::human_bytes;

/// Options of `bench codecs`.
#[derive(Args)]
pub struct CodecsArgs {
    /// The guest (use `--fill FILE` for real memory, e.g. the corpus).
    #[command(flatten)]
    guest: GuestArgs,
    /// A codec pipeline to compare; repeat the flag for each.
    #[arg(
        long = "codec",
        default_values_t = ["raw".to_string(), "lz4".into(), "zstd".into(),
            "dedup,xor-delta,lz4".into(), "dedup,xor-delta,zstd".into(), "auto".into()]
    )]
    codecs: Vec<String>,
    /// The link's bandwidth (the sender is capped at it), e.g. `100Mbit`; `none` for the
    /// plain loopback link.
    #[arg(long, default_value = "100Mbit")]
    max_bandwidth: String,
    /// Channels.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Runs of each codec, interleaved (medians are reported).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// One migration's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    total_ms: f64,
    downtime_ms: f64,
    wire_bytes: u64,
    payload_bytes: u64,
    rounds: usize,
    choices: std::collections::BTreeMap<String, u64>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the comparison.
pub fn run(a: CodecsArgs) -> anyhow::Result<ExitCode> {
    // Loopback between our own processes: plain TCP, capped at the link's rate.
    let migration = |codec: &str| MigrationArgs {
        max_bandwidth: Some(a.max_bandwidth.clone()).filter(|b| b != "none"),
        ..MigrationArgs::for_bench(codec, "tcp", a.channels)
    };
    for c in &a.codecs {
        migration(c).source_config("127.0.0.1:1")?;
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); a.codecs.len()];
    let total = a.codecs.len() * a.repeat.max(1) as usize;
    for rep in 0..a.repeat.max(1) {
        for (k, codec) in a.codecs.iter().enumerate() {
            let n = rep as usize * a.codecs.len() + k + 1;
            eprintln!("[{n}/{total}] {codec} over {}...", a.max_bandwidth);
            let started = a.guest.start()?;
            let mut dest = Destination::spawn("30s", &migration(codec).peer)?;
            let r = crate::host::run_source(
                started.guest.clone(),
                &dest.addr,
                &migration(codec),
                &|_| {},
            )?;
            let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
            dest.finish();
            anyhow::ensure!(
                r.ok && r.verified,
                "{codec}: migration failed: {:?}",
                r.error
            );
            let run = Run {
                total_ms: r.total_ms,
                downtime_ms: r.downtime_ms,
                wire_bytes: r.bytes_on_wire,
                payload_bytes: r.payload_bytes,
                rounds: r.rounds.len(),
                choices: r.codec_choices.clone(),
            };
            eprintln!(
                "  {codec}: total {:.0} ms, downtime {:.1} ms, {} on the wire, {} rounds",
                run.total_ms,
                run.downtime_ms,
                human_bytes(run.wire_bytes),
                run.rounds
            );
            runs[k].push(run);
        }
    }
    let raw_total = a
        .codecs
        .iter()
        .position(|c| c == "raw")
        .map(|k| median(runs[k].iter().map(|r| r.total_ms).collect()));
    eprintln!(
        "\n| codec | ratio | MB/s | total | downtime | on the wire | vs raw |\n|---|---|---|---|---|---|---|"
    );
    let mut rows = Vec::new();
    for (codec, rs) in a.codecs.iter().zip(&runs) {
        let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
        let total_ms = m(|r| r.total_ms);
        let ratio = m(|r| r.payload_bytes as f64 / r.wire_bytes.max(1) as f64);
        let mbps = m(|r| r.payload_bytes as f64 / (r.total_ms / 1e3) / 1e6);
        let downtime = m(|r| r.downtime_ms);
        let wire = m(|r| r.wire_bytes as f64);
        let vs_raw = raw_total.map(|t| total_ms / t);
        eprintln!(
            "| {codec} | {ratio:.2} | {mbps:.1} | {} | {downtime:.1} ms | {} | {} |",
            if total_ms < 10_000.0 {
                format!("{total_ms:.0} ms")
            } else {
                format!("{:.1} s", total_ms / 1e3)
            },
            human_bytes(wire as u64),
            vs_raw.map_or("-".into(), |v| format!("{v:.2}"))
        );
        rows.push(
            json!({"codec": codec, "ratio": ratio, "effective_mbps": mbps,
            "total_ms": total_ms, "downtime_ms": downtime, "wire_bytes": wire,
            "total_vs_raw": vs_raw, "runs": rs}),
        );
    }
    if a.json {
        println!(
            "{}",
            json!({"max_bandwidth": a.max_bandwidth, "channels": a.channels,
                "memory_bytes": a.guest.memory, "fill": a.guest.fill,
                "workload": a.guest.workload_name(), "codecs": rows})
        );
    }
    Ok(ExitCode::SUCCESS)
}
