//! `ferry bench kvm`: live migrations of a KVM guest between two processes on this
//! machine, over memory sizes × dirty rates × dirty-log modes, with rounds, total time,
//! downtime and its parts (pause, saving state).

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::bench_codecs::median;
use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_duration, parse_size};

/// Options of `bench kvm`.
#[derive(Args)]
pub struct KvmBenchArgs {
    /// Guest memory sizes, comma-separated.
    #[arg(long, default_value = "256MiB,1GiB")]
    memory: String,
    /// Page writes per second of the guest, comma-separated (`0`: as fast as it runs).
    #[arg(long, default_value = "5000,20000,0")]
    dirty_rates: String,
    /// Dirty-log modes, comma-separated: bitmap, ring.
    #[arg(long, default_value = "bitmap,ring")]
    dirty_logs: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u16,
    /// Codec.
    #[arg(long, default_value = "raw")]
    codec: String,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value = "1s")]
    warmup: String,
    /// Runs of each cell (medians are reported).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    total_ms: f64,
    downtime_ms: f64,
    pause_ms: f64,
    state_ms: f64,
    memory_rounds: usize,
    pages_sent: u64,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// Runs the measurements.
pub fn run(a: KvmBenchArgs) -> anyhow::Result<ExitCode> {
    ferry_kvm::available()?;
    let sizes = list(&a.memory)
        .iter()
        .map(|m| parse_size(m).map_err(|e| anyhow::anyhow!("--memory: {e}")))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let rates = list(&a.dirty_rates);
    for r in &rates {
        r.parse::<u64>()
            .map_err(|e| anyhow::anyhow!("--dirty-rates: {r:?}: {e}"))?;
    }
    let modes = list(&a.dirty_logs);
    for m in &modes {
        ferry_kvm::DirtyMode::parse(m).map_err(|e| anyhow::anyhow!("--dirty-logs: {e}"))?;
    }
    let warmup = parse_duration(&a.warmup).map_err(|e| anyhow::anyhow!("--warmup: {e}"))?;
    // Loopback between our own processes: plain TCP.
    let mig = MigrationArgs::for_bench(&a.codec, "tcp", 2);
    mig.source_config("127.0.0.1:1")?;
    let mut rows = Vec::new();
    eprintln!("| memory | dirty rate | dirty log | rounds | total | downtime | pause | state save | pages sent |\n|---|---|---|---|---|---|---|---|---|");
    for &memory in &sizes {
        for rate in &rates {
            for mode in &modes {
                let mut runs = Vec::new();
                for rep in 0..a.repeat.max(1) {
                    let guest = GuestArgs {
                        backend: "kvm".into(),
                        threads: a.vcpus,
                        dirty_log: mode.clone(),
                        ..GuestArgs::for_bench(memory, "random", "sequential", rate, u64::from(rep))
                    };
                    let mut dest = Destination::spawn("30s", &mig.peer)?;
                    let started = guest.start()?;
                    std::thread::sleep(warmup);
                    let r =
                        crate::host::run_source(started.guest.clone(), &dest.addr, &mig, &|_| {})?;
                    let _ =
                        crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
                    dest.finish();
                    anyhow::ensure!(
                        r.ok && r.verified,
                        "{} at {rate} pages/s ({mode}): migration failed: {:?}",
                        human_bytes(memory),
                        r.error
                    );
                    runs.push(Run {
                        total_ms: r.total_ms,
                        downtime_ms: r.downtime_ms,
                        pause_ms: r.downtime_breakdown.pause_ms,
                        state_ms: r.downtime_breakdown.state_ms,
                        memory_rounds: r.rounds.iter().filter(|x| x.phase != "storage").count(),
                        pages_sent: r.pages_sent,
                    });
                }
                let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
                let rate_name = if rate == "0" {
                    "max".to_string()
                } else {
                    format!("{rate}/s")
                };
                eprintln!(
                    "| {} | {rate_name} | {mode} | {:.0} | {:.0} ms | {:.2} ms | {:.3} ms | {:.3} ms | {:.0} |",
                    human_bytes(memory),
                    m(|r| r.memory_rounds as f64),
                    m(|r| r.total_ms),
                    m(|r| r.downtime_ms),
                    m(|r| r.pause_ms),
                    m(|r| r.state_ms),
                    m(|r| r.pages_sent as f64),
                );
                rows.push(
                    json!({"memory_bytes": memory, "dirty_rate": rate, "dirty_log": mode,
                    "total_ms": m(|r| r.total_ms), "downtime_ms": m(|r| r.downtime_ms),
                    "pause_ms": m(|r| r.pause_ms), "state_ms": m(|r| r.state_ms),
                    "runs": runs}),
                );
            }
        }
    }
    if a.json {
        println!(
            "{}",
            json!({"vcpus": a.vcpus, "codec": a.codec, "cells": rows})
        );
    }
    Ok(ExitCode::SUCCESS)
}
