//! `ferry bench matrix`: transports × channels × codecs × link profiles × workloads, each
//! cell several times, migrating a sim guest from namespace A to namespace B through the
//! WAN emulator (or over loopback with the `loopback` profile, which needs no root). Rows
//! are appended to `results.csv` as they finish, so a stopped run resumes where it left
//! off; `summary.json` and the printed table hold the median and spread per cell.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_size};

/// Options of `bench matrix`.
#[derive(Args)]
pub struct MatrixArgs {
    /// Link profiles, comma-separated: lan, metro, wan, lossy, intercontinental (through
    /// the WAN emulator: root), or loopback.
    #[arg(long, default_value = "lan,wan,lossy")]
    profiles: String,
    /// Transports with channel counts, comma-separated: tcp, tcp:4, tls, tls:2, quic, …
    #[arg(long, default_value = "tcp,tcp:4,quic")]
    transports: String,
    /// Codec pipelines, separated by `;` (a pipeline has commas): e.g. `raw;lz4`.
    #[arg(long, default_value = "raw;lz4")]
    codecs: String,
    /// Workloads, comma-separated.
    #[arg(long, default_value = "hotspot")]
    workloads: String,
    /// Runs per cell.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Guest memory (no disk).
    #[arg(long, default_value = "32MiB")]
    memory: String,
    /// Initial memory content.
    #[arg(long, default_value = "random")]
    fill: String,
    /// Page writes per second of the workload.
    #[arg(long, default_value = "2000")]
    dirty_rate: String,
    /// Directory for results.csv, results.jsonl and summary.json (an existing one resumes).
    #[arg(long, default_value = "ferry-bench")]
    out: PathBuf,
}

const HEADER: &str =
    "profile,transport,channels,codec,workload,run,ok,total_ms,downtime_ms,wire_bytes,rounds,error";

/// One finished migration.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    profile: String,
    transport: String,
    channels: u16,
    codec: String,
    workload: String,
    run: u32,
    ok: bool,
    total_ms: f64,
    downtime_ms: f64,
    wire_bytes: u64,
    rounds: usize,
    error: String,
}

impl Row {
    fn key(&self) -> (String, String, u16, String, String, u32) {
        (
            self.profile.clone(),
            self.transport.clone(),
            self.channels,
            self.codec.clone(),
            self.workload.clone(),
            self.run,
        )
    }

    fn csv(&self) -> String {
        format!(
            "{},{},{},\"{}\",{},{},{},{:.1},{:.2},{},{},\"{}\"",
            self.profile,
            self.transport,
            self.channels,
            self.codec,
            self.workload,
            self.run,
            self.ok,
            self.total_ms,
            self.downtime_ms,
            self.wire_bytes,
            self.rounds,
            self.error.replace('"', "'")
        )
    }

    /// Parses a line written by [`Row::csv`] (quoted fields hold no quotes).
    fn parse(line: &str) -> Option<Row> {
        let mut f = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => f.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        f.push(cur);
        if f.len() != 12 {
            return None;
        }
        Some(Row {
            profile: f[0].clone(),
            transport: f[1].clone(),
            channels: f[2].parse().ok()?,
            codec: f[3].clone(),
            workload: f[4].clone(),
            run: f[5].parse().ok()?,
            ok: f[6].parse().ok()?,
            total_ms: f[7].parse().ok()?,
            downtime_ms: f[8].parse().ok()?,
            wire_bytes: f[9].parse().ok()?,
            rounds: f[10].parse().ok()?,
            error: f[11].clone(),
        })
    }
}

fn split(s: &str, sep: char) -> Vec<String> {
    s.split(sep)
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// `tcp:4` → ("tcp", 4).
fn transport_spec(s: &str) -> anyhow::Result<(String, u16)> {
    let (t, n) = match s.split_once(':') {
        Some((t, n)) => (
            t,
            n.parse::<u16>()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .with_context(|| format!("--transports: bad channel count in {s:?}"))?,
        ),
        None => (s, 2),
    };
    if !["tcp", "tls", "quic"].contains(&t) {
        anyhow::bail!("--transports: {t:?} is not tcp, tls or quic");
    }
    Ok((t.to_string(), n))
}

/// Runs the matrix.
pub fn run(a: MatrixArgs) -> anyhow::Result<ExitCode> {
    let profiles = split(&a.profiles, ',');
    for p in &profiles {
        if p != "loopback" && ferry_wan::Profile::named(p).is_none() {
            anyhow::bail!(
                "--profiles: unknown profile {p:?} (loopback, {})",
                ferry_wan::Profile::NAMES.join(", ")
            );
        }
    }
    let transports = split(&a.transports, ',')
        .iter()
        .map(|t| transport_spec(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let codecs = split(&a.codecs, ';');
    for c in &codecs {
        ferry_codecs::parse(c).map_err(|e| anyhow::anyhow!("--codecs: {c}: {e}"))?;
    }
    let workloads = split(&a.workloads, ',');
    for w in &workloads {
        ferry_sim::Pattern::parse(w).map_err(|e| anyhow::anyhow!("--workloads: {e}"))?;
    }
    parse_size(&a.memory).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out: {}", a.out.display()))?;
    let csv_path = a.out.join("results.csv");
    let mut rows: Vec<Row> = std::fs::read_to_string(&csv_path)
        .map(|t| t.lines().skip(1).filter_map(Row::parse).collect())
        .unwrap_or_default();
    let done: std::collections::HashSet<_> = rows.iter().map(Row::key).collect();
    if !rows.is_empty() {
        eprintln!(
            "ferry bench matrix: resuming; {} runs already in {}",
            rows.len(),
            csv_path.display()
        );
    }
    let mut csv = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("opening {}", csv_path.display()))?;
    if rows.is_empty() {
        writeln!(csv, "{HEADER}")?;
    }
    let total =
        profiles.len() * transports.len() * codecs.len() * workloads.len() * a.repeat as usize;
    let mut n = 0;
    for profile in &profiles {
        // One emulated link per profile, shared by its cells.
        let wan = match profile.as_str() {
            "loopback" => None,
            p => Some(
                ferry_wan::Wan::start(
                    &format!("m{}", std::process::id()),
                    ferry_wan::Profile::named(p).context("profile")?,
                    1500,
                )
                .map_err(|e| {
                    anyhow::anyhow!("profile {p}: {e} (profile loopback needs no root)")
                })?,
            ),
        };
        for run in 0..a.repeat {
            for (transport, channels) in &transports {
                for codec in &codecs {
                    for workload in &workloads {
                        n += 1;
                        let mut row = Row {
                            profile: profile.clone(),
                            transport: transport.clone(),
                            channels: *channels,
                            codec: codec.clone(),
                            workload: workload.clone(),
                            run,
                            ok: false,
                            total_ms: 0.0,
                            downtime_ms: 0.0,
                            wire_bytes: 0,
                            rounds: 0,
                            error: String::new(),
                        };
                        if done.contains(&row.key()) {
                            continue;
                        }
                        eprintln!("[{n}/{total}] {profile} {transport}x{channels} {codec} {workload} run {run}");
                        match one(&a, wan.as_ref(), &row) {
                            Ok(r) => {
                                row.ok = r.ok && r.verified;
                                row.total_ms = r.total_ms;
                                row.downtime_ms = r.downtime_ms;
                                row.wire_bytes = r.bytes_on_wire;
                                row.rounds = r.rounds.len();
                                row.error = r.error.unwrap_or_default();
                            }
                            Err(e) => row.error = format!("{e:#}"),
                        }
                        eprintln!(
                            "  {}: total {:.0} ms, downtime {:.1} ms, {} on the wire{}",
                            if row.ok { "ok" } else { "FAILED" },
                            row.total_ms,
                            row.downtime_ms,
                            human_bytes(row.wire_bytes),
                            if row.error.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", row.error)
                            }
                        );
                        writeln!(csv, "{}", row.csv())?;
                        csv.flush()?;
                        rows.push(row);
                    }
                }
            }
        }
        if let Some(w) = wan {
            let r = w.stop();
            eprintln!(
                "  link {profile}: A→B {} delivered, {} lost, {} dropped at the queue",
                r.a_to_b.packets_out, r.a_to_b.lost, r.a_to_b.dropped_queue
            );
        }
    }
    summarize(&a, &rows)
}

/// One migration of a fresh guest from A (this process) to B (a child `ferry listen`).
fn one(
    a: &MatrixArgs,
    wan: Option<&ferry_wan::Wan>,
    row: &Row,
) -> anyhow::Result<ferry_core::Report> {
    let guest = GuestArgs::for_bench(
        parse_size(&a.memory).map_err(|e| anyhow::anyhow!("--memory: {e}"))?,
        &a.fill,
        &row.workload,
        &a.dirty_rate,
        7 + u64::from(row.run),
    );

    let mut mig = MigrationArgs::for_bench(&row.codec, &row.transport, row.channels);
    let ((src_peer, dst_peer), _keys) = mig.peer.clone().for_both_ends()?;
    mig.peer = src_peer;
    let (netns, bind) = match wan {
        Some(w) => (Some(w.b.name.as_str()), format!("{}:0", ferry_wan::ADDR_B)),
        None => (None, "127.0.0.1:0".to_string()),
    };
    let mut dest = Destination::spawn_at("30s", &dst_peer, netns, &bind)?;
    let started = guest.start()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let g = started.guest.clone();
    let to = dest.addr.clone();
    let report = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<ferry_core::Report> {
            // This thread (and the channel threads it starts) connect from namespace A.
            if let Some(w) = wan {
                w.a.join().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            crate::host::run_source(g, &to, &mig, &|_| {})
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the source thread panicked"))?
    })?;
    let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
    dest.finish();
    Ok(report)
}

fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        v.get(v.len() / 2).copied().unwrap_or(0.0),
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0),
    )
}

fn summarize(a: &MatrixArgs, rows: &[Row]) -> anyhow::Result<ExitCode> {
    let mut cells: BTreeMap<(String, String, u16, String, String), Vec<&Row>> = BTreeMap::new();
    for r in rows {
        cells
            .entry((
                r.profile.clone(),
                r.transport.clone(),
                r.channels,
                r.codec.clone(),
                r.workload.clone(),
            ))
            .or_default()
            .push(r);
    }
    println!("| profile | transport | codec | workload | runs ok | total (median, min–max) | downtime (median) | on the wire (median) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut out = Vec::new();
    for ((profile, transport, channels, codec, workload), rs) in &cells {
        let ok: Vec<&&Row> = rs.iter().filter(|r| r.ok).collect();
        let (t, tmin, tmax) = median_spread(ok.iter().map(|r| r.total_ms).collect());
        let (d, dmin, dmax) = median_spread(ok.iter().map(|r| r.downtime_ms).collect());
        let (w, wmin, wmax) = median_spread(ok.iter().map(|r| r.wire_bytes as f64).collect());
        println!(
            "| {profile} | {transport}×{channels} | {codec} | {workload} | {}/{} | {:.2} s ({:.2}–{:.2}) | {:.1} ms | {} |",
            ok.len(),
            rs.len(),
            t / 1e3,
            tmin / 1e3,
            tmax / 1e3,
            d,
            human_bytes(w as u64)
        );
        out.push(
            json!({"profile": profile, "transport": transport, "channels": channels,
            "codec": codec, "workload": workload, "runs": rs.len(), "ok": ok.len(),
            "total_ms": {"median": t, "min": tmin, "max": tmax},
            "downtime_ms": {"median": d, "min": dmin, "max": dmax},
            "wire_bytes_median": w,
            "wire_mib": {"median": w / 1048576.0, "min": wmin / 1048576.0, "max": wmax / 1048576.0}}),
        );
    }
    let label = |c: &serde_json::Value| {
        format!(
            "{} {}x{} {}",
            c["profile"].as_str().unwrap_or_default(),
            c["transport"].as_str().unwrap_or_default(),
            c["channels"],
            c["codec"].as_str().unwrap_or_default()
        )
    };
    let bars = |metric: &str, scale: f64| -> Vec<crate::plots::Bar> {
        out.iter()
            .filter(|c| c["ok"].as_u64().unwrap_or(0) > 0)
            .map(|c| {
                let m = &c[metric];
                let v = |k: &str| m[k].as_f64().unwrap_or(0.0) * scale;
                (label(c), v("median"), v("min"), v("max"))
            })
            .collect()
    };
    let mut plots = Vec::new();
    for (file, title, unit, metric, scale) in [
        ("total", "Total migration time", "seconds", "total_ms", 1e-3),
        ("downtime", "Downtime", "milliseconds", "downtime_ms", 1.0),
        ("wire", "Bytes on the wire", "MiB", "wire_mib", 1.0),
    ] {
        let b = bars(metric, scale);
        if !b.is_empty() {
            plots.extend(
                crate::plots::bar_chart(&a.out.join(file), title, unit, &b)
                    .map_err(|e| anyhow::anyhow!("plotting {file}: {e}"))?,
            );
        }
    }
    eprintln!("ferry bench matrix: plots {}", plots.join(", "));
    let path = a.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json!({"cells": out}))?)
        .with_context(|| format!("writing {}", path.display()))?;
    let jsonl = a.out.join("results.jsonl");
    let mut f = std::fs::File::create(&jsonl)?;
    for r in rows {
        writeln!(f, "{}", serde_json::to_string(r)?)?;
    }
    eprintln!(
        "ferry bench matrix: {} runs; {} and {} written",
        rows.len(),
        path.display(),
        jsonl.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_the_csv_and_specs_are_checked() {
        let r = Row {
            profile: "lossy".into(),
            transport: "quic".into(),
            channels: 4,
            codec: "dedup,xor-delta,zstd:3".into(),
            workload: "hotspot".into(),
            run: 2,
            ok: false,
            total_ms: 1234.5,
            downtime_ms: 6.25,
            wire_bytes: 99,
            rounds: 7,
            error: "said \"no\", then left".into(),
        };
        let back = Row::parse(&r.csv()).unwrap();
        assert_eq!(back.key(), r.key());
        assert_eq!(
            (back.total_ms, back.wire_bytes, back.rounds),
            (1234.5, 99, 7)
        );
        assert_eq!(back.error, "said 'no', then left");
        assert!(Row::parse("a,b").is_none());
        assert_eq!(transport_spec("tcp:4").unwrap(), ("tcp".into(), 4));
        assert_eq!(transport_spec("quic").unwrap(), ("quic".into(), 2));
        for bad in ["tcp:0", "tcp:x", "carrier-pigeon"] {
            assert!(transport_spec(bad).is_err(), "{bad}");
        }
    }
}
