//! `ferry wan`: two network namespaces joined by an emulated WAN link (see `ferry-wan`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_wan::{Profile, Wan, ADDR_A, ADDR_B};

use crate::units::{parse_duration, parse_rate};

/// Options of `ferry wan`.
#[derive(Args)]
pub struct WanArgs {
    /// Link profile: lan, metro (1 Gbit/s, 2 ms RTT), wan (100 Mbit/s, 40 ms), lossy
    /// (50 Mbit/s, 80 ms, 1% loss), intercontinental (200 Mbit/s, 150 ms, 0.1%).
    #[arg(long, default_value = "wan")]
    profile: String,
    /// Override the rate (both directions), e.g. `100Mbit`, or `none`.
    #[arg(long)]
    rate: Option<String>,
    /// Override the round-trip time (split evenly between the directions), e.g. `40ms`.
    #[arg(long)]
    rtt: Option<String>,
    /// Jitter on each one-way delay, ± this much (packets keep their order).
    #[arg(long)]
    jitter: Option<String>,
    /// Random loss in each direction, e.g. `1%` or `0.01`.
    #[arg(long)]
    loss: Option<String>,
    /// MTU of the link's devices (1500 when shaping; larger only unshaped).
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Measure the link (round trips and one TCP flow A→B), print, and exit.
    #[arg(long)]
    check: bool,
    /// Congestion control of the measuring flow.
    #[arg(long, default_value = "cubic")]
    congestion: String,
    /// How long the measuring flow runs.
    #[arg(long, default_value = "10s")]
    seconds: String,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    /// A command to run while the link is up (the namespaces are in its environment:
    /// FERRY_WAN_A, FERRY_WAN_B, FERRY_WAN_ADDR_A, FERRY_WAN_ADDR_B); the link goes down
    /// when it exits.
    #[arg(last = true)]
    command: Vec<String>,
}

fn profile(a: &WanArgs) -> anyhow::Result<Profile> {
    let mut p = Profile::named(&a.profile).with_context(|| {
        format!(
            "--profile: unknown profile {:?} (known: {})",
            a.profile,
            Profile::NAMES.join(", ")
        )
    })?;
    for d in [&mut p.a_to_b, &mut p.b_to_a] {
        if let Some(r) = &a.rate {
            d.rate_bps = match r.as_str() {
                "none" => None,
                r => Some(parse_rate(r).map_err(|e| anyhow::anyhow!("--rate: {e}"))? * 8),
            };
        }
        if let Some(r) = &a.rtt {
            d.delay = parse_duration(r).map_err(|e| anyhow::anyhow!("--rtt: {e}"))? / 2;
        }
        if let Some(j) = &a.jitter {
            d.jitter = parse_duration(j).map_err(|e| anyhow::anyhow!("--jitter: {e}"))?;
        }
        if let Some(l) = &a.loss {
            let v = match l.strip_suffix('%') {
                Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
                None => l.trim().parse::<f64>(),
            }
            .ok()
            .filter(|x| (0.0..1.0).contains(x))
            .with_context(|| format!("--loss: {l:?} is not a share such as 1% or 0.01"))?;
            d.loss = v;
        }
    }
    Ok(p)
}

/// Blocks SIGINT and SIGTERM (in this thread and the threads it starts later) so they can
/// be waited for, and the namespaces removed, rather than killing the process.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Runs `ferry wan`.
pub fn run(a: WanArgs) -> anyhow::Result<ExitCode> {
    let p = profile(&a)?;
    let seconds = parse_duration(&a.seconds).map_err(|e| anyhow::anyhow!("--seconds: {e}"))?;
    let signals = (!a.check && a.command.is_empty()).then(block_signals);
    let wan = Wan::start(&std::process::id().to_string(), p, a.mtu)
        .map_err(|e| anyhow::anyhow!("setting up the link: {e}"))?;
    eprintln!(
        "ferry wan: {} ({ADDR_A}) <-> {} ({ADDR_B}); profile {}: {}",
        wan.a.name,
        wan.b.name,
        a.profile,
        describe(&p)
    );
    let mut code = ExitCode::SUCCESS;
    let mut measured = None;
    if a.check {
        let m = ferry_wan::measure::measure(&wan, 20, seconds.as_secs_f64(), &a.congestion)
            .map_err(|e| anyhow::anyhow!("measuring: {e}"))?;
        eprintln!(
            "ferry wan: round trip {:.1} ms (min {:.1}, max {:.1}); one TCP flow ({}) {:.1} Mbit/s over {:.1} s",
            m.rtt_ms, m.rtt_min_ms, m.rtt_max_ms, m.congestion, m.tcp_mbps, m.seconds
        );
        measured = Some(m);
    } else if let Some((cmd, args)) = a.command.split_first() {
        let status = std::process::Command::new(cmd)
            .args(args)
            .env("FERRY_WAN_A", &wan.a.name)
            .env("FERRY_WAN_B", &wan.b.name)
            .env("FERRY_WAN_ADDR_A", ADDR_A.to_string())
            .env("FERRY_WAN_ADDR_B", ADDR_B.to_string())
            .status()
            .with_context(|| format!("running {cmd}"))?;
        if !status.success() {
            code = ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8);
        }
    } else if let Some(set) = signals {
        eprintln!(
            "ferry wan: up; run commands with `ip netns exec {} ...` / `ip netns exec {} ...`; Ctrl-C ends it",
            wan.a.name, wan.b.name
        );
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals in `set`.
        unsafe { libc::sigwait(&set, &mut sig) };
    }
    let r = wan.stop();
    for (name, d) in [("A→B", &r.a_to_b), ("B→A", &r.b_to_a)] {
        eprintln!(
            "ferry wan: {name}: {} packets in, {} delivered, {} lost at random, {} dropped at the full queue; delay mean {:.1} ms, max {:.1} ms",
            d.packets_in, d.packets_out, d.lost, d.dropped_queue, d.mean_delay_ms, d.max_delay_ms
        );
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"profile": a.profile, "link": r, "measurement": measured})
        );
    }
    std::thread::sleep(Duration::from_millis(10));
    Ok(code)
}

fn describe(p: &Profile) -> String {
    let d = &p.a_to_b;
    format!(
        "{}, RTT {:.1} ms, jitter ±{:.1} ms, loss {:.2}%",
        d.rate_bps.map_or("no rate limit".into(), |r| format!(
            "{:.0} Mbit/s",
            r as f64 / 1e6
        )),
        (d.delay + p.b_to_a.delay).as_secs_f64() * 1e3,
        d.jitter.as_secs_f64() * 1e3,
        d.loss * 100.0
    )
}
