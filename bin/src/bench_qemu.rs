//! `ferry bench qemu`: QEMU's own live migration beside Ferry's, on the same memory content,
//! the same link (loopback, or both capped at one rate) and the same machine, interleaved,
//! with medians: what a user would use instead, measured the way they would see it.
//!
//! QEMU's guest is `qemu-system-x86_64 -accel tcg -S` (paused: no guest code runs, as with
//! `--workload idle` here) whose RAM is a private mapping of a file holding the memory image
//! repeated or cut to size; it migrates with multifd over N channels, compressed with
//! `none` or `zstd`, driven through QMP. Ferry migrates a sim guest filled from the same
//! image (`--fill`), without a disk.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::bench_codecs::median;
use crate::opts::{GuestArgs, MigrationArgs};
use crate::units::{human_bytes, parse_rate, parse_size};

/// Options of `bench qemu`.
#[derive(Args)]
pub struct QemuArgs {
    /// Guest memory size.
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    memory: u64,
    /// The memory image both guests hold (`.zst` is decompressed), e.g. the corpus.
    #[arg(long)]
    fill: PathBuf,
    /// Ferry codec pipelines to run; repeat the flag for each.
    #[arg(long = "codec", default_values_t = ["raw".to_string(), "zstd".into(), "auto".into()])]
    codecs: Vec<String>,
    /// QEMU multifd compressions to run (`none`, `zstd`); repeat the flag for each.
    #[arg(long = "qemu-compression", default_values_t = ["none".to_string(), "zstd".into()],
        value_parser = ["none", "zstd", "zlib"])]
    qemu_compressions: Vec<String>,
    /// Channels on both sides (QEMU's multifd channels, Ferry's `--channels`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    channels: u16,
    /// Cap both senders at this rate (e.g. `100Mbit`); default: the plain loopback link.
    /// QEMU 7.2 counts its cap before multifd compression, so compressed QEMU runs are
    /// capped below the link.
    #[arg(long, conflicts_with = "shape")]
    max_bandwidth: Option<String>,
    /// Run both tools in a new network namespace whose loopback is shaped to this rate
    /// (a `tbf` qdisc, e.g. `100Mbit`): one link both tools see alike, compressed or not
    /// (needs root and iproute2).
    #[arg(long, value_parser = parse_rate)]
    shape: Option<u64>,
    /// Runs of each setting, interleaved (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// One migration's figures, as both tools report them.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    /// From the command to the migration completing (QEMU: `migrate` to `completed`;
    /// Ferry: connect to `resumed`).
    total_ms: f64,
    /// The tool's own downtime figure.
    downtime_ms: f64,
    /// Bytes that crossed the loopback interface during the run, TCP/IP headers
    /// included: the same count for both tools (QEMU 7.2 reports multifd bytes before
    /// compression).
    wire_bytes: u64,
    /// Bytes the tool itself reports sending.
    reported_bytes: u64,
}

/// Bytes sent on the loopback interface of this thread's network namespace so far
/// (`/sys` shows the namespace it was mounted in, `/proc/thread-self/net` this one).
fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().nth(8))
        .and_then(|tx| tx.parse().ok())
        .unwrap_or(0)
}

/// Moves this thread (and so every process and thread it starts) into a new network
/// namespace whose loopback is shaped to `rate` bytes per second.
fn enter_shaped_link(rate: u64) -> anyhow::Result<ferry_wan::Namespace> {
    ferry_wan::ns::remove_stale();
    let ns = ferry_wan::Namespace::create(&format!("ferry-q{}-a", std::process::id()))
        .map_err(|e| anyhow::anyhow!("--shape: {e}"))?;
    ns.shape_loopback(rate)
        .and_then(|()| ns.join())
        .map_err(|e| anyhow::anyhow!("--shape: {e}"))?;
    Ok(ns)
}

/// A QMP connection.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts) and negotiates capabilities.
    fn connect(path: &Path) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context(format!("QMP socket {}", path.display())),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.read()?; // the greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `cmd`; its `return` value, or the error QEMU gave.
    fn cmd(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args}))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {}", e["desc"].as_str().unwrap_or("error"));
            }
            // An event: skip.
        }
    }
}

/// A QEMU process, killed when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_qemu(a: &QemuArgs, qmp: &Path, ram: Option<&Path>) -> anyhow::Result<Qemu> {
    let size = format!("{}M", a.memory >> 20);
    let backend = match ram {
        Some(file) => format!(
            "memory-backend-file,id=ram0,size={size},mem-path={},share=off",
            file.display()
        ),
        None => format!("memory-backend-ram,id=ram0,size={size}"),
    };
    let mut c = Command::new(&a.qemu);
    c.args([
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-S",
        "-m",
        &size,
    ])
    .args(["-object", &backend, "-machine", "pc,memory-backend=ram0"])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if ram.is_none() {
        c.args(["-incoming", "defer"]);
    }
    Ok(Qemu(c.spawn().with_context(|| {
        format!(
            "starting {} (install it with `apt-get install qemu-system-x86`)",
            a.qemu
        )
    })?))
}

/// A free loopback port (the listener is closed at once; QEMU binds it next).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One QEMU migration with multifd compression `compression`.
fn qemu_run(a: &QemuArgs, ram: &Path, dir: &Path, compression: &str) -> anyhow::Result<Run> {
    let (sq, dq) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let _ = std::fs::remove_file(&sq);
    let _ = std::fs::remove_file(&dq);
    let _src = spawn_qemu(a, &sq, Some(ram))?;
    let _dst = spawn_qemu(a, &dq, None)?;
    let (mut s, mut d) = (Qmp::connect(&sq)?, Qmp::connect(&dq)?);
    let mut params = json!({"multifd-channels": a.channels, "multifd-compression": compression});
    if let Some(b) = &a.max_bandwidth {
        params["max-bandwidth"] =
            json!(parse_rate(b).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?);
    } else {
        // QEMU caps migration at 128 MiB/s unless told otherwise.
        params["max-bandwidth"] = json!(u64::MAX >> 1);
    }
    for q in [&mut s, &mut d] {
        q.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )?;
        q.cmd("migrate-set-parameters", params.clone())?;
    }
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    d.cmd("migrate-incoming", json!({ "uri": uri }))?;
    let lo0 = loopback_bytes();
    let t0 = Instant::now();
    s.cmd("migrate", json!({ "uri": uri }))?;
    loop {
        let st = s.cmd("query-migrate", json!({}))?;
        match st["status"].as_str().unwrap_or("") {
            "completed" => {
                let wall = t0.elapsed();
                if std::env::var_os("FERRY_BENCH_QEMU_DEBUG").is_some() {
                    eprintln!("  query-migrate: {st}");
                }
                return Ok(Run {
                    total_ms: wall.as_secs_f64() * 1e3,
                    downtime_ms: st["downtime"].as_f64().unwrap_or(0.0),
                    wire_bytes: loopback_bytes().saturating_sub(lo0),
                    reported_bytes: st["ram"]["transferred"].as_u64().unwrap_or(0),
                });
            }
            "failed" | "cancelled" => {
                bail!("QEMU's migration {}: {}", st["status"], st["error-desc"])
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// One Ferry migration with codec `codec`.
fn ferry_run(a: &QemuArgs, codec: &str) -> anyhow::Result<Run> {
    let guest = GuestArgs::for_bench(a.memory, &a.fill.to_string_lossy(), "idle", "0", 1);
    let migration = MigrationArgs {
        max_bandwidth: a.max_bandwidth.clone(),
        ..MigrationArgs::for_bench(codec, "tcp", a.channels)
    };
    // Starting the guest and the destination sends nothing over loopback.
    let lo0 = loopback_bytes();
    let (r, _) = crate::bench::migrate_once(&guest, &migration)?;
    Ok(Run {
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        wire_bytes: loopback_bytes().saturating_sub(lo0),
        reported_bytes: r.bytes_on_wire,
    })
}

/// Runs the comparison.
pub fn run(a: QemuArgs) -> anyhow::Result<ExitCode> {
    if Command::new(&a.qemu).arg("--version").output().is_err() {
        bail!(
            "--qemu: {} not found; install QEMU with `apt-get install qemu-system-x86`",
            a.qemu
        );
    }
    if !a.fill.exists() {
        bail!("--fill: {} does not exist", a.fill.display());
    }
    for c in &a.codecs {
        MigrationArgs::for_bench(c, "tcp", a.channels).source_config("127.0.0.1:1")?;
    }
    // QEMU's RAM: the image repeated or cut to the guest's size, in a file it maps.
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-qemu-")
        .tempdir()?;
    let ram = dir.path().join("ram.img");
    let image = ferry_disk::content::read_image(&a.fill, a.memory)
        .map_err(|e| anyhow::anyhow!("--fill: {e}"))?;
    anyhow::ensure!(!image.is_empty(), "--fill: {} is empty", a.fill.display());
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&ram)?);
        let mut left = a.memory as usize;
        while left > 0 {
            let n = left.min(image.len());
            f.write_all(&image[..n])?;
            left -= n;
        }
        f.flush()?;
    }
    let _shaped = a.shape.map(enter_shaped_link).transpose()?;
    let link = match (&a.max_bandwidth, a.shape) {
        (Some(cap), _) => format!("loopback, both senders capped at {cap}"),
        (None, Some(rate)) => format!(
            "a loopback shaped to {:.0} Mbit/s (tbf)",
            rate as f64 * 8.0 / 1e6
        ),
        (None, None) => "loopback".into(),
    };
    if a.max_bandwidth.is_some() && a.qemu_compressions.iter().any(|c| c != "none") {
        eprintln!(
            "note: QEMU 7.2 applies max-bandwidth to multifd bytes before compression, so a \
             compressed QEMU run is capped below the link; for one link both tools see the \
             same, shape it (a tbf qdisc in a namespace) instead of --max-bandwidth"
        );
    }
    let settings: Vec<(String, String)> = a
        .qemu_compressions
        .iter()
        .map(|c| ("qemu".to_string(), format!("multifd×{} {c}", a.channels)))
        .chain(
            a.codecs
                .iter()
                .map(|c| ("ferry".to_string(), format!("tcp×{} {c}", a.channels))),
        )
        .collect();
    // A discarded warm-up of each tool: their first run after another program is slower
    // (cold caches), and the comparison is between warm runs.
    eprintln!("warm-up runs (discarded)...");
    qemu_run(&a, &ram, dir.path(), &a.qemu_compressions[0])?;
    ferry_run(&a, &a.codecs[0])?;
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); settings.len()];
    let total = settings.len() * a.repeat.max(1) as usize;
    for rep in 0..a.repeat.max(1) {
        for (k, (tool, what)) in settings.iter().enumerate() {
            let n = rep as usize * settings.len() + k + 1;
            eprintln!("[{n}/{total}] {tool} {what} over {link}...");
            let setting = what.rsplit(' ').next().unwrap_or("raw");
            let r = if tool == "qemu" {
                qemu_run(&a, &ram, dir.path(), setting)?
            } else {
                ferry_run(&a, setting)?
            };
            eprintln!(
                "  total {:.0} ms, downtime {:.1} ms, {} on the wire",
                r.total_ms,
                r.downtime_ms,
                human_bytes(r.wire_bytes)
            );
            runs[k].push(r);
        }
    }
    let best = |tool: &str| {
        settings
            .iter()
            .zip(&runs)
            .filter(|((t, _), _)| t == tool)
            .map(|(_, rs)| median(rs.iter().map(|r| r.total_ms).collect()))
            .fold(f64::INFINITY, f64::min)
    };
    let qemu_best = best("qemu");
    eprintln!(
        "\n{} of {} over {link}, medians of {} interleaved runs:\n",
        human_bytes(a.memory),
        a.fill.display(),
        a.repeat.max(1)
    );
    eprintln!("(on the wire: bytes across the loopback interface during the run, TCP/IP headers included)\n");
    eprintln!("| tool | setting | total | downtime | on the wire | ÷ QEMU's best |\n|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for ((tool, what), rs) in settings.iter().zip(&runs) {
        let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
        let (t, dt, w) = (
            m(|r| r.total_ms),
            m(|r| r.downtime_ms),
            m(|r| r.wire_bytes as f64),
        );
        eprintln!(
            "| {tool} | {what} | {t:.0} ms | {dt:.1} ms | {} | {:.2} |",
            human_bytes(w as u64),
            t / qemu_best
        );
        rows.push(
            json!({"tool": tool, "setting": what, "total_ms": t, "downtime_ms": dt,
            "wire_bytes": w, "total_vs_qemu_best": t / qemu_best, "runs": rs}),
        );
    }
    if a.json {
        println!(
            "{}",
            json!({"memory_bytes": a.memory, "fill": a.fill, "link": link, "shape_bytes_per_s": a.shape,
                "channels": a.channels, "repeat": a.repeat, "results": rows})
        );
    }
    Ok(ExitCode::SUCCESS)
}
