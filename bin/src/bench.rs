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

use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_size};

/// Bench commands.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Plain loopback TCP throughput: one connection, 256 KiB writes, from a hot buffer and
    /// memory-to-memory.
    TcpBaseline(BaselineArgs),
    /// Engine throughput (first full memory pass, two processes over loopback TCP) as a
    /// ratio of plain TCP moving the same memory, and of hot-buffer TCP, in the same run.
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs a bench command.
pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Codecs(a) => crate::bench_codecs::run(a),
        BenchCmd::Qemu(a) => crate::bench_qemu::run(a),
        BenchCmd::Matrix(a) => crate::bench_matrix::run(a),
        BenchCmd::Kvm(a) => crate::bench_kvm::run(a),
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

fn throughput(a: ThroughputArgs) -> anyhow::Result<ExitCode> {
    let guest = GuestArgs::for_bench(a.memory, "random", "idle", "0", 1);

    // Loopback between our own processes: plain TCP, as the baseline it is compared to.
    let mig = MigrationArgs {
        downtime: "50ms".into(),
        throttle: "off".into(),
        ..MigrationArgs::for_bench(&a.codec, "tcp", a.channels)
    };
    mig.source_config("127.0.0.1:1")?;
    let mut hot = Vec::new();
    let mut tcp = Vec::new();
    let mut engine = Vec::new();
    for i in 0..a.repeat.max(1) {
        // Interleave so all three see the same machine conditions.
        hot.push(tcp_once(a.memory, Baseline::Hot)?);
        tcp.push(tcp_once(a.memory, Baseline::Memory)?);
        let started = guest.start()?;
        let mut dest = Destination::spawn("30s", &mig.peer)?;
        let r = crate::host::run_source(started.guest.clone(), &dest.addr, &mig, &|_| {})?;
        let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
        dest.finish();
        anyhow::ensure!(r.ok && r.verified, "migration {i} failed: {:?}", r.error);
        engine.push(r.first_pass_mbps * 1e6);
        let k = i as usize;
        eprintln!(
            "run {i}: plain TCP memory-to-memory {:.0} MB/s (hot buffer {:.0}), ferry first pass {:.0} MB/s: {:.2}x ({:.2}x of hot)",
            tcp[k] / 1e6,
            hot[k] / 1e6,
            r.first_pass_mbps,
            engine[k] / tcp[k],
            engine[k] / hot[k]
        );
    }
    let (h, t, e) = (
        median(hot.clone()),
        median(tcp.clone()),
        median(engine.clone()),
    );
    // Runs are interleaved pairs under the same machine conditions: the median of the
    // per-run ratios is the steadier figure; the ratio of medians is printed too.
    let paired = median(engine.iter().zip(&tcp).map(|(e, t)| e / t).collect());
    let paired_hot = median(engine.iter().zip(&hot).map(|(e, h)| e / h).collect());
    eprintln!(
        "median of per-run ratios: {paired:.2} of memory-to-memory TCP, {paired_hot:.2} of hot-buffer TCP"
    );
    eprintln!(
        "ferry {} x{}: {:.0} MB/s; plain loopback TCP memory-to-memory {:.0} MB/s: ratio {:.2}; \
         hot-buffer TCP {:.0} MB/s: ratio {:.2} (medians of {} runs, {} random guest)",
        a.codec,
        a.channels,
        e / 1e6,
        t / 1e6,
        e / t,
        h / 1e6,
        e / h,
        tcp.len(),
        human_bytes(a.memory)
    );
    if a.json {
        let mbps = |v: &[f64]| v.iter().map(|x| x / 1e6).collect::<Vec<_>>();
        println!(
            "{}",
            json!({"codec": a.codec, "channels": a.channels, "memory_bytes": a.memory,
                "ferry_mbps": e / 1e6,
                "tcp_memory_mbps": t / 1e6, "ratio": e / t,
                "tcp_hot_mbps": h / 1e6, "ratio_hot": e / h,
                "paired_ratio": paired, "paired_ratio_hot": paired_hot,
                "ferry_runs_mbps": mbps(&engine), "tcp_memory_runs_mbps": mbps(&tcp),
                "tcp_hot_runs_mbps": mbps(&hot)})
        );
    }
    Ok(ExitCode::SUCCESS)
}
