//! `ferry bench overhead`: how much slower the guest's own work runs while Ferry tracks its
//! writes and migrates it. The workload's progress (page writes per second, unthrottled)
//! is measured over the same window in three settings, interleaved:
//!
//! - `untracked`: no dirty tracking at all (the sim guest with tracking turned off for
//!   good; a KVM guest whose slots do not log);
//! - `tracked`: dirty logging on and the log harvested every 100 ms, as pre-copy rounds do,
//!   but nothing sent: the cost of tracking alone;
//! - `migrating`: a real migration to a destination process on loopback, its first pass
//!   running during the window: tracking plus the engine's reads, hashing and sending,
//!   which share this machine's cores with the guest.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::bench_codecs::median;
use crate::child::Destination;
use crate::guest::Hosted;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_duration, parse_size};

/// Options of `bench overhead`.
#[derive(Args)]
pub struct OverheadArgs {
    /// Guest backend.
    #[arg(long, default_value = "sim", value_parser = ["sim", "kvm"])]
    backend: String,
    /// Guest memory size.
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    memory: u64,
    /// Workload pattern (default: `uniform` for sim, `sequential` for kvm); it runs
    /// unthrottled.
    #[arg(long)]
    workload: Option<String>,
    /// How long progress is measured in each setting.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    window: Duration,
    /// Runs of each setting, interleaved (medians of per-run ratios are reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// How often the `tracked` setting harvests the dirty log (a pre-copy round's length):
    /// on KVM every harvest write-protects the pages it took, so each page the guest
    /// writes again costs one fault per harvest.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    harvest: Duration,
    /// KVM dirty logging: `bitmap` or `ring`.
    #[arg(long, default_value = "bitmap", value_parser = ["bitmap", "ring"])]
    dirty_log: String,
    /// Bandwidth cap of the `migrating` setting (default: the guest's memory over the
    /// window plus a second, so the first pass outlasts the window).
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The settings, in the order they run.
const SETTINGS: [&str; 3] = ["untracked", "tracked", "migrating"];

/// Page writes the guest's workload has done so far.
fn progress(g: &Hosted) -> u64 {
    match g {
        Hosted::Sim(s) => s.stats().page_writes,
        Hosted::Kvm(k) => k.stats().page_writes,
        #[cfg(feature = "xen")]
        Hosted::Xen(_) => 0,
    }
}

/// Page writes per second over `window`, after a short settling time.
fn rate(g: &Hosted, window: Duration) -> f64 {
    std::thread::sleep(Duration::from_millis(200));
    let (p0, t0) = (progress(g), Instant::now());
    std::thread::sleep(window);
    (progress(g) - p0) as f64 / t0.elapsed().as_secs_f64()
}

/// One measurement of `setting`; page writes per second.
fn one(a: &OverheadArgs, guest: &GuestArgs, setting: &str) -> anyhow::Result<f64> {
    let started = guest.start()?;
    let g = &started.guest;
    let r = match setting {
        "untracked" => {
            if let Hosted::Sim(s) = g {
                s.without_dirty_tracking();
            }
            rate(g, a.window)
        }
        "tracked" => {
            let src = g.source();
            src.start_dirty_log().context("starting the dirty log")?;
            let done = Arc::new(AtomicBool::new(false));
            let harvester = {
                let (src, done, every) = (Arc::clone(&src), Arc::clone(&done), a.harvest);
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        std::thread::sleep(every);
                        let _ = src.fetch_dirty_pages();
                    }
                })
            };
            let r = rate(g, a.window);
            done.store(true, Ordering::Relaxed);
            let _ = harvester.join();
            src.stop_dirty_log();
            r
        }
        _ => {
            let cap = a.max_bandwidth.clone().unwrap_or_else(|| {
                let secs = a.window.as_secs_f64() + 1.0;
                format!("{}B/s", (a.memory as f64 / secs) as u64)
            });
            let mig = MigrationArgs {
                max_bandwidth: Some(cap),
                max_rounds: 2,
                downtime: "1s".into(),
                throttle: "off".into(),
                ..MigrationArgs::for_bench("raw", "tcp", 2)
            };
            let mut dest = Destination::spawn("30s", &mig.peer)?;
            let (src, addr) = (g.clone(), dest.addr.clone());
            let migration =
                std::thread::spawn(move || crate::host::run_source(src, &addr, &mig, &|_| {}));
            let r = rate(g, a.window);
            let report = migration
                .join()
                .map_err(|_| anyhow::anyhow!("the migration thread panicked"))??;
            let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
            dest.finish();
            anyhow::ensure!(
                report.ok && report.verified,
                "the migration failed: {:?}",
                report.error
            );
            let first = report.rounds.first().map_or(0.0, |r| r.ms);
            if first < a.window.as_secs_f64() * 1e3 + 200.0 {
                eprintln!(
                    "  note: the first pass took {first:.0} ms, shorter than the window; lower --max-bandwidth"
                );
            }
            r
        }
    };
    g.stop();
    Ok(r)
}

/// Runs the comparison.
pub fn run(a: OverheadArgs) -> anyhow::Result<ExitCode> {
    let workload = a.workload.clone().unwrap_or_else(|| {
        if a.backend == "kvm" {
            "sequential".into()
        } else {
            "uniform".into()
        }
    });
    let guest = GuestArgs {
        backend: a.backend.clone(),
        dirty_log: a.dirty_log.clone(),
        ..GuestArgs::for_bench(a.memory, "random", &workload, "0", 1)
    };
    if a.backend == "kvm" && !std::path::Path::new("/dev/kvm").exists() {
        anyhow::bail!("--backend kvm: /dev/kvm does not exist on this machine");
    }
    if let Some(cap) = &a.max_bandwidth {
        crate::units::parse_rate(cap).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?;
    }
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); SETTINGS.len()];
    for rep in 0..a.repeat.max(1) {
        for (k, setting) in SETTINGS.iter().enumerate() {
            let r = one(&a, &guest, setting)?;
            eprintln!("run {rep}: {setting}: {:.0} page writes/s", r);
            runs[k].push(r);
        }
    }
    // Interleaved runs: the median of per-run ratios to the untracked run is the steadier
    // figure.
    let ratio = |k: usize| {
        median(
            runs[k]
                .iter()
                .zip(&runs[0])
                .map(|(r, base)| r / base)
                .collect(),
        )
    };
    eprintln!(
        "\n{} {} guest, {workload} workload unthrottled, windows of {:?}, log harvested every {:?} when tracked, medians of {} interleaved runs:\n",
        human_bytes(a.memory),
        a.backend,
        a.window,
        a.harvest,
        a.repeat.max(1)
    );
    eprintln!("| setting | page writes/s | slowdown vs untracked | runs |\n|---|---|---|---|");
    let mut rows = Vec::new();
    for (k, setting) in SETTINGS.iter().enumerate() {
        let (m, q) = (median(runs[k].clone()), ratio(k));
        let spread: Vec<String> = runs[k].iter().map(|r| format!("{:.2}M", r / 1e6)).collect();
        eprintln!(
            "| {setting} | {:.2} M | {:+.1}% | {} |",
            m / 1e6,
            (1.0 - q) * 100.0,
            spread.join(", ")
        );
        rows.push(
            json!({"setting": setting, "writes_per_s": m, "ratio_to_untracked": q,
            "slowdown_pct": (1.0 - q) * 100.0, "runs_writes_per_s": runs[k]}),
        );
    }
    if a.json {
        println!(
            "{}",
            json!({"backend": a.backend, "memory_bytes": a.memory, "workload": workload,
                "window_s": a.window.as_secs_f64(), "harvest_s": a.harvest.as_secs_f64(),
                "dirty_log": a.dirty_log, "repeat": a.repeat, "results": rows})
        );
    }
    Ok(ExitCode::SUCCESS)
}
