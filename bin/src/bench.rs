//! `ferry bench`: a plain loopback TCP baseline, and the engine's throughput measured as a
//! ratio of it in the same run (timings here are noisy: ratios within one run are what
//! count).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::bench_codecs::median;
use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_size};

/// Bench commands.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Plain loopback TCP throughput: one connection, 256 KiB writes, from a hot buffer and
    /// memory-to-memory.
    TcpBaseline(BaselineArgs),
    /// Engine throughput per transport as a user sees it (bytes moved over the whole
    /// migration, from the command to `resumed`) beside the first-pass figure, each as a
    /// ratio of plain TCP moving the same memory in the same run.
    Throughput(ThroughputArgs),
    /// Whole migrations with each codec over a capped link (`--max-bandwidth`), compared:
    /// ratio, effective MB/s, total time, downtime.
    Codecs(crate::bench_codecs::CodecsArgs),
    /// Transports × channels × codecs × link profiles × workloads through the WAN emulator
    /// (root) or loopback; CSV, JSON and a summary table; resumes a partly finished run.
    Matrix(crate::bench_matrix::MatrixArgs),
    /// QEMU's own live migration (multifd, none and zstd) beside Ferry's codecs, on the
    /// same memory image and link, interleaved: total time, downtime, bytes on the wire.
    Qemu(crate::bench_qemu::QemuArgs),
    /// How much slower the guest's own work runs untracked, tracked, and while migrating
    /// (sim or KVM): page writes per second, interleaved, as ratios.
    Overhead(crate::bench_overhead::OverheadArgs),
    /// KVM guests migrated between two processes: memory sizes × dirty rates × dirty-log
    /// modes (bitmap, ring); rounds, total time, downtime, pause and state-save times.
    Kvm(crate::bench_kvm::KvmBenchArgs),
}

/// Options of `tcp-baseline`.
#[derive(Args)]
pub struct BaselineArgs {
    /// Bytes to send per run.
    #[arg(long, value_parser = parse_size, default_value = "2GiB")]
    size: u64,
    /// Runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Options of `throughput`.
#[derive(Args)]
pub struct ThroughputArgs {
    /// Guest memory (filled with random data; no disk, idle workload).
    #[arg(long, value_parser = parse_size, default_value = "2GiB")]
    memory: u64,
    /// Codec.
    #[arg(long, default_value = "raw")]
    codec: String,
    /// Transports to measure, each against plain TCP in the same run; repeat the flag.
    #[arg(long = "transport", default_values_t = ["tcp".to_string(), "tls".into(), "quic".into()],
        value_parser = ["tcp", "tls", "quic"])]
    transports: Vec<String>,
    /// Channels.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Runs of each (medians are compared).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What a plain TCP baseline sends from and receives into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// One 256 KiB buffer sent over and over, received into one 256 KiB buffer: the
    /// socket's best case, everything in cache.
    Hot,
    /// A `size`-byte buffer sent once and received into another `size`-byte buffer: plain
    /// TCP moving memory from one process to another, as a migration must.
    Memory,
}

/// One plain TCP transfer of `size` bytes over loopback; bytes per second. Buffers are
/// allocated and touched before the clock starts.
pub fn tcp_once(size: u64, mode: Baseline) -> anyhow::Result<f64> {
    const CHUNK: usize = 256 << 10;
    let size_usize = usize::try_from(size)?;
    let l = TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = l.local_addr()?;
    let mut sink = vec![
        0u8;
        if mode == Baseline::Memory {
            size_usize
        } else {
            CHUNK
        }
    ];
    sink.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept()?;
        let mut got = 0usize;
        loop {
            let len = sink.len();
            let n = match mode {
                Baseline::Memory => s.read(&mut sink[got..(got + CHUNK).min(len)])?,
                Baseline::Hot => s.read(&mut sink)?,
            };
            if n == 0 {
                return Ok(got as u64);
            }
            got += n;
            if mode == Baseline::Memory && got == sink.len() {
                let mut probe = [0u8; 1];
                let end = s.read(&mut probe)?;
                return Ok((got + end) as u64);
            }
        }
    });
    let mut src = vec![
        0u8;
        if mode == Baseline::Memory {
            size_usize
        } else {
            CHUNK
        }
    ];
    ferry_sim::random_bytes(0x9e37_79b9_7f4a_7c15, &mut src);
    let _ = ready_rx.recv();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).context("connecting over loopback")?;
    s.set_nodelay(true)?;
    let mut sent = 0usize;
    while sent < size_usize {
        let n = (size_usize - sent).min(CHUNK);
        match mode {
            Baseline::Memory => s.write_all(&src[sent..sent + n])?,
            Baseline::Hot => s.write_all(&src[..n])?,
        }
        sent += n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(got == size, "received {got} of {size} bytes");
    Ok(size as f64 / secs)
}

/// Runs a bench command.
pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Codecs(a) => crate::bench_codecs::run(a),
        BenchCmd::Qemu(a) => crate::bench_qemu::run(a),
        BenchCmd::Matrix(a) => crate::bench_matrix::run(a),
        BenchCmd::Kvm(a) => crate::bench_kvm::run(a),
        BenchCmd::Overhead(a) => crate::bench_overhead::run(a),
        BenchCmd::TcpBaseline(a) => {
            let mut out = serde_json::Map::new();
            for (name, mode) in [("hot", Baseline::Hot), ("memory", Baseline::Memory)] {
                let runs = (0..a.repeat.max(1))
                    .map(|_| tcp_once(a.size, mode))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let m = median(runs.clone());
                eprintln!(
                    "plain loopback TCP ({name}): {:.0} MB/s median over {} runs of {} ({:?} MB/s)",
                    m / 1e6,
                    runs.len(),
                    human_bytes(a.size),
                    runs.iter().map(|r| (r / 1e6).round()).collect::<Vec<_>>()
                );
                let runs_mbps: Vec<f64> = runs.iter().map(|r| r / 1e6).collect();
                out.insert(
                    name.into(),
                    json!({"mbps": m / 1e6, "runs_mbps": runs_mbps}),
                );
            }
            if a.json {
                out.insert("bytes".into(), json!(a.size));
                println!("{}", Value::Object(out));
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Throughput(a) => throughput(a),
    }
}

/// One migration of a fresh guest to a destination process on loopback, with ephemeral
/// identities for TLS and QUIC: its report and the whole time the user waits for the
/// guest to run on the far side (from calling the source to `resumed`, transport setup
/// included; the source's own teardown after that excluded).
pub fn migrate_once(
    guest: &GuestArgs,
    mig: &MigrationArgs,
) -> anyhow::Result<(ferry_core::Report, f64)> {
    let mut mig = mig.clone();
    let ((src_peer, dst_peer), _keys) = mig.peer.clone().for_both_ends()?;
    mig.peer = src_peer;
    let started = guest.start()?;
    let mut dest = Destination::spawn("30s", &dst_peer)?;
    let t = Instant::now();
    let r = crate::host::run_source(started.guest.clone(), &dest.addr, &mig, &|_| {})?;
    let whole = (t.elapsed().as_secs_f64() - r.teardown_ms / 1e3).max(1e-9);
    let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
    dest.finish();
    anyhow::ensure!(
        r.ok && r.verified,
        "{} migration failed: {:?}",
        mig.peer.transport,
        r.error
    );
    Ok((r, whole))
}

/// One transport's figures over the runs of `bench throughput`, bytes per second.
#[derive(Default)]
struct TransportRuns {
    first_pass: Vec<f64>,
    whole: Vec<f64>,
    setup_ms: Vec<f64>,
    teardown_ms: Vec<f64>,
    /// Share of the whole migration spent outside the data rounds.
    outside: Vec<f64>,
}

fn throughput(a: ThroughputArgs) -> anyhow::Result<ExitCode> {
    let guest = GuestArgs::for_bench(a.memory, "random", "idle", "0", 1);
    let migs = a
        .transports
        .iter()
        .map(|t| {
            let mig = MigrationArgs {
                downtime: "50ms".into(),
                throttle: "off".into(),
                ..MigrationArgs::for_bench(&a.codec, t, a.channels)
            };
            // Checked as it will run: with the ephemeral identities of `migrate_once`.
            let ((peer, _), _keys) = mig.peer.clone().for_both_ends()?;
            MigrationArgs {
                peer,
                ..mig.clone()
            }
            .source_config("127.0.0.1:1")?;
            Ok(mig)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut hot = Vec::new();
    let mut tcp = Vec::new();
    let mut per: Vec<TransportRuns> = a
        .transports
        .iter()
        .map(|_| TransportRuns::default())
        .collect();
    let bytes = a.memory as f64;
    for i in 0..a.repeat.max(1) {
        // Interleaved, so every figure of one run sees the same machine conditions.
        hot.push(tcp_once(a.memory, Baseline::Hot)?);
        tcp.push(tcp_once(a.memory, Baseline::Memory)?);
        let k = i as usize;
        eprintln!(
            "run {i}: plain TCP memory-to-memory {:.0} MB/s (hot buffer {:.0})",
            tcp[k] / 1e6,
            hot[k] / 1e6
        );
        for ((t, mig), runs) in a.transports.iter().zip(&migs).zip(&mut per) {
            let (r, whole) = migrate_once(&guest, mig)?;
            runs.first_pass.push(r.first_pass_mbps * 1e6);
            runs.whole.push(bytes / whole);
            runs.setup_ms.push(r.setup_ms);
            runs.teardown_ms.push(r.teardown_ms);
            let rounds_ms: f64 = r.rounds.iter().map(|x| x.ms).sum();
            runs.outside
                .push((whole * 1e3 - rounds_ms).max(0.0) / (whole * 1e3));
            eprintln!(
                "  ferry {t}×{}: whole migration {:.0} MB/s ({:.2}x of TCP; {:.0} ms), first pass {:.0} MB/s ({:.2}x); setup {:.1} ms",
                a.channels,
                bytes / whole / 1e6,
                bytes / whole / tcp[k],
                whole * 1e3,
                r.first_pass_mbps,
                r.first_pass_mbps * 1e6 / tcp[k],
                r.setup_ms
            );
        }
    }
    let t = median(tcp.clone());
    let h = median(hot.clone());
    // Runs are interleaved: the median of per-run ratios is the steadier figure.
    let paired = |v: &[f64]| median(v.iter().zip(&tcp).map(|(e, t)| e / t).collect());
    eprintln!(
        "\n{} random guest, codec {}, {} channels, medians of {} runs; plain loopback TCP memory-to-memory {:.0} MB/s (hot buffer {:.0}):\n",
        human_bytes(a.memory),
        a.codec,
        a.channels,
        tcp.len(),
        t / 1e6,
        h / 1e6
    );
    eprintln!("| transport | whole migration | ÷ TCP | first pass | ÷ TCP | outside the rounds | setup | teardown |\n|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, runs) in a.transports.iter().zip(&per) {
        let (w, f) = (median(runs.whole.clone()), median(runs.first_pass.clone()));
        let (wr, fr) = (paired(&runs.whole), paired(&runs.first_pass));
        let (su, td) = (
            median(runs.setup_ms.clone()),
            median(runs.teardown_ms.clone()),
        );
        let out = median(runs.outside.clone());
        eprintln!(
            "| {name} | {:.0} MB/s | {wr:.2} | {:.0} MB/s | {fr:.2} | {:.1}% | {su:.1} ms | {td:.1} ms |",
            w / 1e6,
            f / 1e6,
            out * 100.0
        );
        let mbps = |v: &[f64]| v.iter().map(|x| x / 1e6).collect::<Vec<_>>();
        rows.push(
            json!({"transport": name, "whole_mbps": w / 1e6, "whole_ratio": wr,
            "first_pass_mbps": f / 1e6, "first_pass_ratio": fr,
            "setup_ms": su, "teardown_ms": td, "outside_rounds_share": out,
            "whole_runs_mbps": mbps(&runs.whole), "first_pass_runs_mbps": mbps(&runs.first_pass)}),
        );
    }
    if a.json {
        let mbps = |v: &[f64]| v.iter().map(|x| x / 1e6).collect::<Vec<_>>();
        println!(
            "{}",
            json!({"codec": a.codec, "channels": a.channels, "memory_bytes": a.memory,
                "tcp_memory_mbps": t / 1e6, "tcp_hot_mbps": h / 1e6,
                "tcp_memory_runs_mbps": mbps(&tcp), "tcp_hot_runs_mbps": mbps(&hot),
                "transports": rows})
        );
    }
    Ok(ExitCode::SUCCESS)
}
