//! `ferry bench`: a plain loopback TCP baseline, and the engine's throughput measured as a
//! ratio of it in the same run (timings here are noisy: ratios within one run are what
//! count).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::child::Destination;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_size};

/// Bench commands.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Plain loopback TCP throughput: one connection, 256 KiB writes, nothing else.
    TcpBaseline(BaselineArgs),
    /// Engine throughput (first full memory pass, two processes over loopback TCP) as a
    /// ratio of the plain TCP baseline measured in the same run.
    Throughput(ThroughputArgs),
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
    #[arg(long, default_value_t = 1)]
    channels: u16,
    /// Runs of each (medians are compared).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// One plain TCP transfer of `size` bytes over loopback; bytes per second.
pub fn tcp_once(size: u64) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).context("connecting over loopback")?;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
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
        BenchCmd::TcpBaseline(a) => {
            let runs = (0..a.repeat.max(1))
                .map(|_| tcp_once(a.size))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let m = median(runs.clone());
            eprintln!(
                "plain loopback TCP: {:.0} MB/s median over {} runs of {} ({:?} MB/s)",
                m / 1e6,
                runs.len(),
                human_bytes(a.size),
                runs.iter().map(|r| (r / 1e6).round()).collect::<Vec<_>>()
            );
            if a.json {
                println!(
                    "{}",
                    json!({"tcp_mbps": m / 1e6, "runs_mbps": runs.iter().map(|r| r / 1e6).collect::<Vec<_>>(), "bytes": a.size})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Throughput(a) => throughput(a),
    }
}

fn throughput(a: ThroughputArgs) -> anyhow::Result<ExitCode> {
    let guest = GuestArgs {
        memory: a.memory,
        disk: None,
        disk_size: 0,
        no_disk: true,
        disk_used: 0.0,
        workload: ferry_sim::Pattern::Idle,
        dirty_rate: "0".into(),
        disk_rate: 0,
        threads: 1,
        fill: "random".into(),
        seed: 1,
    };
    let mig = MigrationArgs {
        codec: a.codec.clone(),
        transport: "tcp".into(),
        channels: a.channels,
        downtime: "50ms".into(),
        max_rounds: 30,
        max_bandwidth: None,
        verify: "digest".into(),
        timeout: "30s".into(),
    };
    mig.source_config("127.0.0.1:1")?;
    let mut tcp = Vec::new();
    let mut engine = Vec::new();
    for i in 0..a.repeat.max(1) {
        // Alternate so both see the same machine conditions.
        tcp.push(tcp_once(a.memory)?);
        let started = guest.start()?;
        let mut dest = Destination::spawn("30s")?;
        let r = crate::host::run_source(Arc::clone(&started.guest), &dest.addr, &mig, &|_| {})?;
        let _ = crate::host::request(&dest.control, &crate::host::Request::Stop, |_| {});
        dest.finish();
        anyhow::ensure!(r.ok && r.verified, "migration {i} failed: {:?}", r.error);
        engine.push(r.first_pass_mbps * 1e6);
        eprintln!(
            "run {i}: plain TCP {:.0} MB/s, ferry first pass {:.0} MB/s ({:.2}x)",
            tcp[i as usize] / 1e6,
            r.first_pass_mbps,
            r.first_pass_mbps * 1e6 / tcp[i as usize]
        );
    }
    let (t, e) = (median(tcp.clone()), median(engine.clone()));
    eprintln!(
        "ferry {} x{}: {:.0} MB/s vs plain loopback TCP {:.0} MB/s: ratio {:.2} (medians of {} runs, {} random guest)",
        a.codec,
        a.channels,
        e / 1e6,
        t / 1e6,
        e / t,
        tcp.len(),
        human_bytes(a.memory)
    );
    if a.json {
        println!(
            "{}",
            json!({"codec": a.codec, "channels": a.channels, "memory_bytes": a.memory,
                "tcp_mbps": t / 1e6, "ferry_mbps": e / 1e6, "ratio": e / t,
                "tcp_runs_mbps": tcp.iter().map(|x| x / 1e6).collect::<Vec<_>>(),
                "ferry_runs_mbps": engine.iter().map(|x| x / 1e6).collect::<Vec<_>>()})
        );
    }
    Ok(ExitCode::SUCCESS)
}
