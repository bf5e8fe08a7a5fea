//! `ferry`: live-migrate a whole VM — memory, vCPU/device state and local disks — between
//! hosts that share no storage.

mod auth;
mod bench;
mod bench_codecs;
mod bench_kvm;
mod bench_matrix;
mod bench_overhead;
mod bench_qemu;
mod child;
mod guest;
mod host;
mod live;
mod opts;
mod output;
mod plots;
mod units;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry_core::engine::{self, DestConfig, DestOutcome};
use ferry_core::GuestLayout;
use serde_json::{json, Value};

use guest::Hosted;
use host::{Host, HostState, Request};
use opts::{GuestArgs, MigrationArgs};
use output::{print_summary, ProgressView};
use units::parse_duration;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrate a whole VM — memory, vCPU/device state and local disks — between hosts that share no storage."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a guest (sim, or kvm with `--backend kvm`) in this process until it is stopped
    /// or migrated away.
    Run(RunArgs),
    /// Receive a migration, verify it, resume the guest and keep running it.
    Listen(ListenArgs),
    /// Migrate a running guest (`--vm SOCKET`) or a new one started here.
    Migrate(MigrateArgs),
    /// Show a guest's state, workload progress, the running migration (phase, round,
    /// bytes, rates, expected downtime) and the last one; `--watch` follows it.
    Status(StatusArgs),
    /// Cancel a guest's running migration: before the hand-over the source keeps running
    /// and the destination discards what it received; after it, too late.
    Cancel(VmArgs),
    /// Change a guest's running migration: its bandwidth cap and downtime target.
    Set(SetArgs),
    /// Print the JSON Schema of the control socket's requests (docs/control.schema.json).
    ControlSchema,
    /// Run a guest's self-check now (every page and block against its ledger).
    Check(VmArgs),
    /// Stop a guest and its process.
    Stop(VmArgs),
    /// Resume an in-doubt guest on a destination (the source is known to have handed over).
    Resume(VmArgs),
    /// Discard an in-doubt guest on a destination (the source is known to have kept it).
    Discard(VmArgs),
    /// Switch the running `--memory-mode hybrid` migration of a guest to post-copy now:
    /// the rest of its memory moves after the hand-over.
    Postcopy(VmArgs),
    /// Migrate a guest between two processes on this machine over loopback and report
    /// (TLS with a fresh pair of keys unless told otherwise).
    Demo(DemoArgs),
    /// Two network namespaces joined by an emulated WAN link (bandwidth, delay, jitter,
    /// loss); measure it with `--check`, or run a command while it is up. Needs root.
    Wan(wan::WanArgs),
    /// Make a self-signed certificate and key for `--cert`/`--key`, and print the
    /// fingerprint the peer pins with `--peer`.
    Keygen {
        /// Directory for NAME.crt, NAME.key (mode 0600) and NAME.fingerprint.
        #[arg(long)]
        out: PathBuf,
        /// File name stem (and the certificate's name).
        #[arg(long, default_value = "ferry")]
        name: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measurements: plain TCP baseline, engine throughput as a ratio of it.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Disk image metadata.
    #[command(subcommand)]
    Image(ImageCmd),
    /// The Xen backend's checks on a live domain (in dom0, a build with `--features xen`).
    #[command(subcommand)]
    Xen(XenCmd),
}

#[derive(Subcommand)]
enum XenCmd {
    /// Log-dirty on and off, dirty counts while the guest runs, batched foreign reads
    /// equal to single-page ones, HVM context get/set round trip.
    Probe {
        /// The domain (name or id); it should be running a guest that writes memory.
        #[arg(long)]
        domain: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measure a migration's downtime from outside, the same way for any tool (`xl
    /// migrate` or `ferry`) on one host: the intervals in which no guest domain runs
    /// (every domain but dom0 paused, shut down or dying), polled through libxenctrl.
    Watch {
        /// Give up after this long.
        #[arg(long = "for", default_value = "300s")]
        limit: String,
        /// Stop once the guest has run this long after its first outage.
        #[arg(long, default_value = "3s")]
        settle: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Identity, generation and blocks written since the generation began.
    Info {
        /// The disk image (its metadata is `PATH.ferry`).
        path: PathBuf,
        /// Block size of the image.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Control socket path.
    #[arg(long)]
    control: PathBuf,
}

#[derive(Args)]
struct ListenArgs {
    /// Address to listen on (port 0 picks a free port; the chosen one is printed).
    #[arg(long)]
    bind: String,
    /// Directory for the received disk images.
    #[arg(long)]
    dir: PathBuf,
    /// Control socket for the received guest.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Transport and peer authentication.
    #[command(flatten)]
    peer: auth::PeerArgs,
    /// Silence from the source longer than this aborts the receive.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// For a received kvm guest: how its dirty pages are collected when it migrates on,
    /// `bitmap` or `ring`.
    #[arg(long, default_value = "bitmap", value_parser = ["bitmap", "ring"])]
    dirty_log: String,
    /// For a received Xen guest: the xl configuration its domain is created from
    /// (`xl create -p`), the source's configuration.
    #[arg(long)]
    domain_config: Option<PathBuf>,
    /// For a received Xen guest: the new domain's name (default: the configuration's).
    #[arg(long)]
    domain_name: Option<String>,
    /// Print the destination's report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Refuse guests with more memory than this (e.g. `16GiB`; default: this host's
    /// physical memory), in the handshake, before anything is allocated.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Refuse disks larger than this (default: 64TiB).
    #[arg(long, value_name = "SIZE")]
    max_disk_size: Option<String>,
}

#[derive(Args)]
struct MigrateArgs {
    /// Control socket of the running guest to migrate; without it a guest is started here.
    #[arg(long)]
    vm: Option<PathBuf>,
    /// Destination address.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    migration: MigrationArgs,
    #[command(flatten)]
    guest: GuestArgs,
    /// With a guest started here: let its workload run this long first.
    #[arg(long, default_value = "1s")]
    warmup: String,
    /// Recover an interrupted post-copy (`--resume` is the same): push the pages and
    /// blocks the destination at `--to`, which holds the guest, still owes, and nothing it
    /// has. From the handed-over guest at `--vm`, or, for disks only, when the source
    /// process is gone, from the image it left (`--disk IMAGE --migration-id ID`, the id
    /// the destination's `ferry status` shows; memory goes with its process).
    #[arg(long, alias = "resume")]
    recover: bool,
    /// With `--recover` and no `--vm`: the migration whose post-copy is recovered.
    #[arg(long, requires = "recover", conflicts_with = "vm")]
    migration_id: Option<String>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VmArgs {
    /// Control socket of the guest.
    #[arg(long)]
    vm: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Print the status again every `--interval` until no migration runs.
    #[arg(long)]
    watch: bool,
    /// How often `--watch` prints.
    #[arg(long, default_value = "1s")]
    interval: String,
}

#[derive(Args)]
struct SetArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// New bandwidth cap, e.g. `100Mbit` or `50MiB/s`; `none` lifts it.
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// New downtime target, e.g. `50ms`.
    #[arg(long)]
    downtime: Option<String>,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migration: MigrationArgs,
    /// Let the workload run this long before migrating.
    #[arg(long, default_value = "1s")]
    warmup: String,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A fault switch that does not parse is refused before anything starts.
    if let Err(e) = ferry_core::fault::from_env() {
        eprintln!("ferry: error: {e}");
        return ExitCode::from(2);
    }
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Listen(a) => listen(a),
        Cmd::Migrate(a) => migrate(a),
        Cmd::Status(a) => status(a),
        Cmd::Cancel(a) => simple(a, Request::Cancel),
        Cmd::Set(a) => set(a),
        Cmd::ControlSchema => {
            println!("{}", host::request_schema());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check(a) => simple(a, Request::Check),
        Cmd::Stop(a) => simple(a, Request::Stop),
        Cmd::Resume(a) => simple(a, Request::Resume),
        Cmd::Postcopy(a) => simple(a, Request::Postcopy),
        Cmd::Discard(a) => simple(a, Request::Discard),
        Cmd::Demo(a) => demo(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Wan(a) => wan::run(a),
        Cmd::Keygen { out, name, json } => keygen(&out, &name, json),
        Cmd::Xen(XenCmd::Probe { domain, json }) => xen_probe(&domain, json),
        Cmd::Xen(XenCmd::Watch {
            limit,
            settle,
            json,
        }) => xen_watch(&limit, &settle, json),
        Cmd::Image(ImageCmd::Info {
            path,
            block_size,
            json,
        }) => image_info(&path, block_size, json),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn describe(g: &GuestArgs) -> String {
    if g.backend == "xen" {
        return match (&g.domain, &g.domain_config) {
            (Some(d), _) => format!("xen domain {d}"),
            (None, Some(c)) if g.no_disk => format!("xen domain from {}", c.display()),
            (None, Some(c)) => format!(
                "xen domain from {}, a {} disk served by ferry",
                c.display(),
                units::human_bytes(g.disk_size)
            ),
            (None, None) => "xen domain ?".into(),
        };
    }
    format!(
        "{} {} memory, {}, workload {} at {} page writes/s{}",
        g.backend,
        units::human_bytes(g.memory),
        if g.no_disk {
            "no disk".to_string()
        } else {
            format!("{} disk", units::human_bytes(g.disk_size))
        },
        g.workload_name(),
        g.dirty_rate,
        if g.no_disk {
            String::new()
        } else {
            format!(" and {} block writes/s", g.disk_rate)
        }
    )
}

fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let started = a.guest.start()?;
    let host = Host::new(started.guest.clone(), HostState::Running, "source");
    let _sock = host.serve(&a.control)?;
    eprintln!(
        "ferry: guest running ({}); control socket {}",
        describe(&a.guest),
        a.control.display()
    );
    host.wait_done();
    // Let the last answer reach the client before the socket goes.
    std::thread::sleep(Duration::from_millis(100));
    Ok(ExitCode::SUCCESS)
}

fn listen(a: ListenArgs) -> anyhow::Result<ExitCode> {
    let dirty = ferry_kvm::DirtyMode::parse(&a.dirty_log)
        .map_err(|e| anyhow::anyhow!("--dirty-log: {e}"))?;
    let how = guest::Incoming {
        dir: a.dir.clone(),
        dirty,
        domain_config: a.domain_config.clone(),
        domain_name: a.domain_name.clone(),
    };
    how.check()?;
    let timeout = parse_duration(&a.timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    let size_or = |flag: &str, v: &Option<String>, default: u64| {
        v.as_deref().map_or(Ok(default), |s| {
            units::parse_size(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
        })
    };
    let dest_cfg = DestConfig {
        io_timeout: timeout,
        max_memory: size_or(
            "--max-memory",
            &a.max_memory,
            ferry_core::engine::host_memory(),
        )?,
        max_disk: size_or(
            "--max-disk-size",
            &a.max_disk_size,
            ferry_core::engine::DEFAULT_MAX_DISK,
        )?,
    };
    let transport = a.peer.transport(timeout)?;
    let mut listener = transport
        .listen(&a.bind)
        .map_err(|e| anyhow::anyhow!("--bind {}: {}", a.bind, engine::error_chain(&e)))?;
    let host = Host::listening("destination");
    let _sock = a.control.as_ref().map(|c| host.serve(c)).transpose()?;
    // `ferry demo` and scripts read this line to learn the port.
    eprintln!("ferry: listening on {}", listener.local_addr());
    let channels = listener
        .accept()
        .map_err(|e| anyhow::anyhow!("accepting: {}", engine::error_chain(&e)))?;
    let slot: Mutex<Option<Hosted>> = Mutex::new(None);
    let outcome = engine::receive(
        channels,
        &|layout: &GuestLayout| {
            let g = Hosted::incoming(layout, &how)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(g.clone());
            host.set_state(HostState::Receiving);
            Ok(g.dest())
        },
        &ferry_codecs::resolve,
        &dest_cfg,
        // Publish the running guest before the source hears that it runs here.
        &|| {
            if let Some(g) = slot.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                host.attach(g, HostState::Running);
            }
        },
    );
    let guest = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    match outcome {
        DestOutcome::Discarded { error } => {
            host.set_state(HostState::Stopped);
            eprintln!("ferry: migration failed, nothing kept: {error}");
            if a.json {
                print_json(&json!({"ok": false, "error": error}))?;
            }
            Ok(ExitCode::from(1))
        }
        DestOutcome::InDoubt {
            error,
            report,
            session,
            ..
        } => {
            eprintln!(
                "ferry: WARNING: the guest was received and verified but the hand-over never came ({error}). \
                 It is kept paused: the source may or may not have handed over. Ask the source (`ferry status --vm SOCKET`): \
                 if it says handed-over (or is gone), resume it here (`ferry resume --vm SOCKET`); if it says running, discard it here (`ferry discard --vm SOCKET`)."
            );
            let held = Held::new(HostState::InDoubt, session, error);
            hold_received(&host, guest, &a, held, report, listener, timeout)
        }
        DestOutcome::Held {
            error,
            report,
            session,
            ..
        } => {
            eprintln!(
                "ferry: WARNING: the guest was handed over to this host but cannot run yet: {error}. \
                 It is kept paused and is never discarded here; `ferry status --vm SOCKET` shows why."
            );
            let held = Held::new(HostState::Held, session, error);
            hold_received(&host, guest, &a, held, report, listener, timeout)
        }
        DestOutcome::Resumed { report, .. } => {
            let verified = report.manifest_ok && report.oracle_ok != Some(false);
            eprintln!(
                "ferry: guest received and resumed ({} pages, {} blocks; manifest {}, self-check {})",
                report.pages_received,
                report.blocks_received,
                if report.manifest_ok { "ok" } else { "MISMATCH" },
                match report.oracle_ok {
                    Some(true) => "passed".to_string(),
                    Some(false) => format!("FAILED: {}", report.oracle_detail),
                    None => "n/a".to_string(),
                }
            );
            if a.json {
                print_json(&json!({"ok": true, "verified": verified, "destination": report}))?;
            }
            let Some(g) = guest else {
                anyhow::bail!("the received guest went missing");
            };
            if !verified {
                // Handed over: the only copy runs here now. Stopping it would lose the VM,
                // so it keeps running and the failure is reported for an operator.
                eprintln!(
                    "ferry: WARNING: the guest's check after the hand-over failed; it keeps running here (the source no longer runs it)"
                );
            }
            host.set_last_report(serde_json::to_value(&report)?);
            match &a.control {
                Some(ctl) => {
                    eprintln!("ferry: guest running; control socket {}", ctl.display());
                    host.wait_done();
                    std::thread::sleep(Duration::from_millis(100));
                }
                None => {
                    eprintln!("ferry: guest running (no --control socket; terminate to stop it)");
                    host.wait_done();
                }
            }
            drop(g);
            Ok(if verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// A received guest held for an operator.
struct Held {
    state: HostState,
    session: ferry_core::machine::DestSession,
    reason: String,
    /// Owed post-copy blocks: the listener stays open for the source to push them.
    recovery: Option<Recovery>,
}

impl Held {
    fn new(state: HostState, session: ferry_core::machine::DestSession, reason: String) -> Self {
        Self {
            state,
            session,
            reason,
            recovery: None,
        }
    }
}

/// What a post-copy recovery needs on this side.
struct Recovery {
    listener: Box<dyn ferry_core::transport::Listener>,
    migration_id: String,
    timeout: Duration,
}

/// Reports a received guest that is held or in doubt, then keeps it for an operator; while
/// it owes post-copy blocks, `listener` stays open for the source's recovery.
fn hold_received(
    host: &std::sync::Arc<Host>,
    guest: Option<Hosted>,
    a: &ListenArgs,
    mut held: Held,
    report: engine::DestReport,
    listener: Box<dyn ferry_core::transport::Listener>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let owed = guest.as_ref().map_or(0, |g| g.dest().owed_blocks());
    let owed_pages = guest.as_ref().map_or(0, |g| g.dest().owed_pages());
    if owed_pages > 0 {
        eprintln!(
            "ferry: {owed_pages} memory pages and {owed} disk blocks are still owed by the source (post-copy): the guest is paused here until they arrive. \
             The handed-over source pushes them with `ferry migrate --vm SOURCE_SOCKET --to {addr} --resume`; \
             if the source process is gone, its memory went with it and the guest is lost.",
            addr = listener.local_addr(),
        );
    } else if owed > 0 {
        eprintln!(
            "ferry: {owed} disk blocks are still owed by the source (storage post-copy): the guest cannot run here without them. \
             The handed-over source pushes them again with `ferry migrate --vm SOURCE_SOCKET --to {addr} --recover`, \
             or, if the source process is gone, its image does: `ferry migrate --to {addr} --recover --disk SOURCE_IMAGE --migration-id {}`",
            report.migration_id,
            addr = listener.local_addr(),
        );
    }
    if owed + owed_pages > 0 {
        held.recovery = Some(Recovery {
            listener,
            migration_id: report.migration_id.clone(),
            timeout,
        });
    }
    host.set_last_report(serde_json::to_value(&report)?);
    if a.json {
        let state = if held.state == HostState::Held {
            "held"
        } else {
            "in_doubt"
        };
        print_json(&json!({"ok": false, state: true, "error": held.reason,
            "owed_blocks": owed, "owed_pages": owed_pages, "destination": report}))?;
    }
    hold_for_operator(host, guest, a.control.as_ref(), held)
}

/// Keeps a held or in-doubt guest for an operator until it is resumed (then runs it) or
/// discarded. While it owes post-copy blocks, the listener accepts the source's recovery.
fn hold_for_operator(
    host: &std::sync::Arc<Host>,
    guest: Option<Hosted>,
    control: Option<&PathBuf>,
    held: Held,
) -> anyhow::Result<ExitCode> {
    let (Some(g), Some(_)) = (guest, control) else {
        eprintln!(
            "ferry: no --control socket: the guest stays held until this process is terminated"
        );
        loop {
            std::thread::park();
        }
    };
    let recovery = held.recovery;
    host.hold(g.clone(), held.state, held.session, held.reason);
    if let Some(r) = recovery {
        let host = std::sync::Arc::clone(host);
        std::thread::spawn(move || accept_recovery(&host, &g, r));
    }
    host.wait_done();
    std::thread::sleep(Duration::from_millis(100));
    Ok(ExitCode::from(1))
}

/// Accepts recovery connections until the owed blocks are all here.
fn accept_recovery(host: &Host, guest: &Hosted, mut r: Recovery) {
    let Some(id) = host::parse_id(&r.migration_id) else {
        return;
    };
    let cfg = DestConfig {
        io_timeout: r.timeout,
        ..DestConfig::default()
    };
    loop {
        let channels = match r.listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ferry: accepting a recovery: {}", engine::error_chain(&e));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        match engine::receive_owed_blocks(
            channels,
            &guest.dest(),
            &id,
            &ferry_codecs::resolve,
            &cfg,
        ) {
            Ok(n) => {
                host.owed_arrived();
                // Only the source that handed the guest over recovers a post-copy (the
                // hello names this migration, with the recovery bit): the guest is this
                // side's and now has everything, so it runs again, as after QEMU's
                // post-copy recovery.
                match host.decide_held(true) {
                    Ok(_) => eprintln!(
                        "ferry: post-copy recovered: {n} owed pages and blocks arrived; the guest runs again"
                    ),
                    Err(e) => eprintln!(
                        "ferry: post-copy recovered: {n} owed pages and blocks arrived, but resuming failed ({e}); resume it with `ferry resume --vm SOCKET`"
                    ),
                }
                return;
            }
            Err(e) => eprintln!("ferry: post-copy recovery failed: {e}"),
        }
    }
}

fn report_exit(r: &ferry_core::Report) -> ExitCode {
    if r.ok && r.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn migrate(mut a: MigrateArgs) -> anyhow::Result<ExitCode> {
    // Validate everything before touching a guest; paths mean the same in the guest's
    // process.
    a.migration.peer = a.migration.peer.clone().absolute()?;
    a.migration.source_config(&a.to)?;
    let view = ProgressView::new(false);
    // Ctrl-C cancels the migration (before the hand-over; after it, it says it is too
    // late); a second one leaves at once.
    let control: std::sync::Arc<ferry_core::control::MigrationControl> = Default::default();
    {
        let (control, vm) = (std::sync::Arc::clone(&control), a.vm.clone());
        let presses = std::sync::atomic::AtomicU32::new(0);
        let _ = ctrlc::set_handler(move || {
            if presses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
                eprintln!("ferry: interrupted again: leaving now");
                std::process::exit(130);
            }
            eprintln!("ferry: cancelling (Ctrl-C again to leave at once)");
            let answer = match &vm {
                Some(vm) => host::request(vm, &Request::Cancel, |_| {})
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from)),
                None => Some(match control.cancel() {
                    ferry_core::control::CancelOutcome::Cancelling => {
                        "cancelling: the guest stays here".into()
                    }
                    ferry_core::control::CancelOutcome::TooLate => {
                        "too late: the guest was handed over".into()
                    }
                }),
            };
            if let Some(m) = answer {
                eprintln!("ferry: {m}");
            }
        });
    }
    let report = match &a.vm {
        Some(vm) => {
            let last = host::request(
                vm,
                &Request::Migrate {
                    to: a.to.clone(),
                    args: Box::new(a.migration.clone()),
                    recover: a.recover,
                },
                |v| {
                    if let Some(p) = v.get("progress") {
                        if let Ok(p) = serde_json::from_value(p.clone()) {
                            view.on(&p);
                        }
                    }
                },
            )?;
            match last.get("report") {
                Some(r) => serde_json::from_value::<ferry_core::Report>(r.clone())?,
                None => anyhow::bail!(
                    "{}",
                    last.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the guest process answered without a report")
                ),
            }
        }
        None if a.recover => {
            let disk = a.guest.disk.clone().ok_or_else(|| {
                anyhow::anyhow!("--recover without --vm: --disk names the image the source left")
            })?;
            let id = a.migration_id.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "--recover without --vm: --migration-id names the migration (the destination's `ferry status` shows it)"
                )
            })?;
            let id = host::parse_id(id)
                .ok_or_else(|| anyhow::anyhow!("--migration-id: {id:?} is not 32 hex digits"))?;
            let source = ferry_disk::ImageSource::open(&[disk], 4096)
                .map_err(|e| anyhow::anyhow!("--disk: {}", engine::error_chain(&e)))?;
            host::drive_source(
                std::sync::Arc::new(source),
                &a.to,
                &a.migration,
                Some(id),
                &|p| view.on(&p),
            )?
        }
        None => {
            let warmup = parse_duration(&a.warmup).map_err(|e| anyhow::anyhow!("--warmup: {e}"))?;
            let started = a.guest.start()?;
            eprintln!("ferry: started a guest here ({})", describe(&a.guest));
            std::thread::sleep(warmup);
            host::run_source_holding(started.guest.clone(), &a.to, &a.migration, control, &|p| {
                view.on(&p)
            })?
        }
    };
    print_summary(&report);
    if a.json {
        print_json(&report)?;
    }
    Ok(report_exit(&report))
}

fn set(a: SetArgs) -> anyhow::Result<ExitCode> {
    // Refused here with the flag's name before anything is asked of the guest.
    if let Some(r) = a.max_bandwidth.as_deref().filter(|r| *r != "none") {
        units::parse_rate(r).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?;
    }
    if let Some(d) = a.downtime.as_deref() {
        parse_duration(d).map_err(|e| anyhow::anyhow!("--downtime: {e}"))?;
    }
    if a.max_bandwidth.is_none() && a.downtime.is_none() {
        anyhow::bail!("ferry set: give --max-bandwidth or --downtime");
    }
    simple(
        a.vm,
        Request::Set {
            max_bandwidth: a.max_bandwidth,
            downtime: a.downtime,
        },
    )
}

fn status(s: StatusArgs) -> anyhow::Result<ExitCode> {
    if !s.watch {
        return status_once(&s.vm);
    }
    let every = parse_duration(&s.interval).map_err(|e| anyhow::anyhow!("--interval: {e}"))?;
    loop {
        let v = host::request(&s.vm.vm, &Request::Status, |_| {})?;
        let m = v.get("migration").filter(|m| !m.is_null());
        if s.vm.json {
            println!("{v}");
        } else if let Some(m) = m {
            print_migration(m);
        } else {
            eprintln!("state {}: no migration running", v["state"]);
        }
        if m.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(every);
    }
}

/// One line of a running migration's status.
fn print_migration(m: &Value) {
    let f = |k: &str| m.get(k).and_then(Value::as_f64);
    let opt = |x: Option<f64>, unit: &str| x.map_or("-".to_string(), |x| format!("{x:.1}{unit}"));
    eprintln!(
        "migrating: {} round {} — {}/{} units, {} on the wire, {} Mbit/s now, link {} Mbit/s, dirty {} pages/s, pending {}, expected downtime {}, round ETA {}",
        m["phase"].as_str().unwrap_or("?"),
        m["round"],
        m["round_units_sent"],
        m["round_units"],
        units::human_bytes(m["bytes_on_wire"].as_u64().unwrap_or(0)),
        opt(f("wire_mbps"), ""),
        opt(f("link_mbps"), ""),
        opt(f("dirty_pages_per_s"), ""),
        m["pending_bytes"]
            .as_u64()
            .map_or("-".into(), units::human_bytes),
        opt(f("expected_downtime_ms"), " ms"),
        opt(f("round_eta_s"), " s"),
    );
}

fn status_once(a: &VmArgs) -> anyhow::Result<ExitCode> {
    let v = host::request(&a.vm, &Request::Status, |_| {})?;
    if v.get("event").and_then(Value::as_str) == Some("error") {
        anyhow::bail!(
            "--vm {}: {}",
            a.vm.display(),
            v.get("message").and_then(Value::as_str).unwrap_or("error")
        );
    }
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let g = |p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
    eprintln!(
        "state {}  role {}  pid {}  memory {}",
        g("/state"),
        g("/role"),
        g("/pid"),
        units::human_bytes(g("/memory_bytes").as_u64().unwrap_or(0))
    );
    eprintln!(
        "workload {} at {} page writes/s, {} block writes/s; done so far: {} page writes, {} block writes",
        g("/workload/pattern"),
        g("/workload/dirty_rate"),
        g("/workload/disk_rate"),
        g("/progress/page_writes"),
        g("/progress/block_writes")
    );
    if let Some(r) = v.get("reason").and_then(Value::as_str) {
        eprintln!("why: {r}");
    }
    if let Some(n) = v
        .get("owed_blocks")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
    {
        eprintln!(
            "owed post-copy blocks: {n} (the source pushes them with `ferry migrate --recover`)"
        );
    }
    if let Some(n) = v
        .get("owed_pages")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
    {
        eprintln!(
            "owed post-copy pages: {n} (the handed-over source pushes them with `ferry migrate --vm SOURCE --resume`)"
        );
    }
    if let Some(m) = v.get("migration").filter(|m| !m.is_null()) {
        print_migration(m);
    }
    if let Some(r) = v.get("last_migration").filter(|r| !r.is_null()) {
        eprintln!("last migration: {r}");
    }
    Ok(ExitCode::SUCCESS)
}

fn simple(a: VmArgs, req: Request) -> anyhow::Result<ExitCode> {
    let v = host::request(&a.vm, &req, |_| {})?;
    if a.json {
        print_json(&v)?;
    }
    match v.get("event").and_then(Value::as_str) {
        Some("error") => {
            eprintln!(
                "ferry: {}",
                v.get("message").and_then(Value::as_str).unwrap_or("error")
            );
            Ok(ExitCode::from(1))
        }
        Some("check") => {
            let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
            eprintln!(
                "ferry: self-check {}: {} pages, {} blocks checked{}",
                if ok { "passed" } else { "FAILED" },
                v.get("pages_checked").cloned().unwrap_or(Value::Null),
                v.get("blocks_checked").cloned().unwrap_or(Value::Null),
                if ok {
                    String::new()
                } else {
                    format!("; {}", v.get("problems").cloned().unwrap_or(Value::Null))
                }
            );
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        _ => {
            if let Some(m) = v.get("message").and_then(Value::as_str) {
                eprintln!("ferry: {m}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn keygen(out: &std::path::Path, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let fp = auth::keygen(out, name)?;
    let base = out.join(name);
    if json {
        println!(
            "{}",
            json!({"fingerprint": fp.to_string(),
                "cert": format!("{}.crt", base.display()),
                "key": format!("{}.key", base.display())})
        );
    }
    eprintln!(
        "ferry: wrote {0}.crt, {0}.key and {0}.fingerprint; peers pin it with --peer {fp}",
        base.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn demo(mut a: DemoArgs) -> anyhow::Result<ExitCode> {
    // Both ends are ours: without credentials, make a pair that pins each other.
    let ((source_peer, dest_peer), _keys) = a.migration.peer.clone().absolute()?.for_both_ends()?;
    a.migration.peer = source_peer;
    a.migration.source_config("127.0.0.1:1")?;
    let warmup = parse_duration(&a.warmup).map_err(|e| anyhow::anyhow!("--warmup: {e}"))?;
    let mut dest = child::Destination::spawn(&a.migration.timeout, &dest_peer)?;
    eprintln!(
        "ferry demo: destination process {} listening on {}",
        dest.pid(),
        dest.addr
    );
    let started = a.guest.start()?;
    eprintln!(
        "ferry demo: source guest in process {} ({}); workload warms up for {}",
        std::process::id(),
        describe(&a.guest),
        a.warmup
    );
    std::thread::sleep(warmup);
    let view = ProgressView::new(false);
    let report = host::run_source(started.guest.clone(), &dest.addr, &a.migration, &|p| {
        view.on(&p)
    })?;
    let mut after = json!(null);
    let mut dest_ok = true;
    if report.ok {
        // The guest must keep running correctly on the destination.
        let s1 = dest.wait_running()?;
        std::thread::sleep(Duration::from_secs(1));
        let s2 = host::request(&dest.control, &Request::Status, |_| {})?;
        let check = host::request(&dest.control, &Request::Check, |_| {})?;
        let w = |s: &Value| {
            s.pointer("/progress/page_writes")
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let advancing = w(&s2) > w(&s1) || a.guest.workload_name() == "idle";
        let check_ok = check.get("ok").and_then(Value::as_bool).unwrap_or(false);
        dest_ok = advancing && check_ok;
        eprintln!(
            "ferry demo: destination workload {} ({} -> {} page writes in 1 s); self-check after 1 s {}",
            if advancing { "keeps running" } else { "is NOT advancing" },
            w(&s1),
            w(&s2),
            if check_ok { "passed" } else { "FAILED" }
        );
        after = json!({"page_writes_before": w(&s1), "page_writes_after_1s": w(&s2),
            "advancing": advancing, "check": check});
        let _ = host::request(&dest.control, &Request::Stop, |_| {});
    }
    dest.finish();
    print_summary(&report);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Value::Object(m) = &mut v {
            m.insert("destination_after".into(), after);
        }
        print_json(&v)?;
    }
    Ok(if report.ok && report.verified && dest_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(feature = "xen")]
fn xen_probe(domain: &str, json: bool) -> anyhow::Result<ExitCode> {
    let dom = ferry_xen::resolve_domain(domain).map_err(|e| anyhow::anyhow!("--domain: {e}"))?;
    let r = ferry_xen::probe::probe(dom)?;
    let v = json!({"ok": r.ok(), "domid": r.domid, "pages": r.pages, "scan_ms": r.scan_ms,
        "dirty_peek": r.dirty_peek, "dirty_first": r.dirty_first, "dirty_second": r.dirty_second,
        "pages_compared": r.pages_compared, "pages_differing": r.pages_differing,
        "read_all_ms": r.read_all_ms, "context_bytes": r.context_bytes,
        "context_records": r.context_records, "context_differing_types": r.context_differing_types,
        "context_round_trip": r.context_round_trip, "problems": r.problems});
    if json {
        print_json(&v)?;
    }
    eprintln!(
        "ferry xen probe: domain {} ({} RAM pages, physmap scan {:.0} ms): dirty {} (peek) / {} / {} per second; \
         {} pages read in {:.0} ms, {} compared with single mappings, {} differ; HVM context {} bytes, round trip {}: {}",
        r.domid, r.pages, r.scan_ms, r.dirty_peek, r.dirty_first, r.dirty_second, r.pages, r.read_all_ms,
        r.pages_compared, r.pages_differing, r.context_bytes,
        if r.context_round_trip { "equal" } else { "DIFFERENT" },
        if r.ok() { "PASSED".to_string() } else { format!("FAILED: {}", r.problems.join("; ")) }
    );
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn xen_watch(limit: &str, settle: &str, json: bool) -> anyhow::Result<ExitCode> {
    let limit = parse_duration(limit).map_err(|e| anyhow::anyhow!("--for: {e}"))?;
    let settle = parse_duration(settle).map_err(|e| anyhow::anyhow!("--settle: {e}"))?;
    #[cfg(feature = "xen")]
    {
        let r = ferry_xen::watch::watch(limit, settle)?;
        let outages: Vec<Value> = r
            .outages
            .iter()
            .map(|o| json!({"at_s": o.at_s, "ms": o.ms}))
            .collect();
        if json {
            print_json(&json!({"longest_ms": r.longest_ms(), "outages": outages,
                "samples": r.samples, "poll_us": r.poll_us, "ended_down": r.ended_down}))?;
        }
        eprintln!(
            "ferry xen watch: longest outage {:.1} ms over {} outage(s){}; {} polls, one per {:.0} µs",
            r.longest_ms(),
            r.outages.len(),
            if r.ended_down { " (the last still going on)" } else { "" },
            r.samples,
            r.poll_us
        );
        Ok(ExitCode::SUCCESS)
    }
    #[cfg(not(feature = "xen"))]
    {
        let _ = (limit, settle, json);
        anyhow::bail!("xen watch: {}", guest::NO_XEN)
    }
}

#[cfg(not(feature = "xen"))]
fn xen_probe(domain: &str, _json: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("xen probe --domain {domain}: {}", guest::NO_XEN)
}

fn image_info(path: &std::path::Path, block_size: u32, json: bool) -> anyhow::Result<ExitCode> {
    use ferry_core::image::{id_hex, sidecar_path, Sidecar, SidecarState, SidecarStatus};
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if block_size == 0 || meta.len() % u64::from(block_size) != 0 {
        anyhow::bail!(
            "--block-size: {} is not a multiple of {block_size}",
            meta.len()
        );
    }
    let blocks = meta.len() / u64::from(block_size);
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    };
    let status = Sidecar::load(path, block_size, blocks);
    let v = match &status {
        SidecarStatus::Missing => {
            json!({"image": path, "bytes": meta.len(), "allocated_bytes": allocated,
            "managed": false, "metadata": sidecar_path(path)})
        }
        SidecarStatus::Corrupt(why) => {
            json!({"image": path, "bytes": meta.len(), "allocated_bytes": allocated,
            "managed": false, "metadata_error": why})
        }
        SidecarStatus::Valid(sc) => json!({
            "image": path, "bytes": meta.len(), "allocated_bytes": allocated, "managed": true,
            "id": id_hex(&sc.identity.id), "generation": sc.identity.generation,
            "state": match sc.state { SidecarState::Closed => "closed", SidecarState::Open => "open (in use, or not closed cleanly)", SidecarState::Base => "base (left by a hand-over)" },
            "blocks": blocks, "written_since_generation": sc.written.count(),
            "history_trusted": sc.state != SidecarState::Open,
        }),
    };
    if json {
        print_json(&v)?;
    } else {
        match &status {
            SidecarStatus::Missing => eprintln!(
                "{}: {} ({} allocated), not managed by ferry (no {})",
                path.display(),
                units::human_bytes(meta.len()),
                units::human_bytes(allocated),
                sidecar_path(path).display()
            ),
            SidecarStatus::Corrupt(why) => eprintln!(
                "{}: metadata not trusted: {why}",
                sidecar_path(path).display()
            ),
            SidecarStatus::Valid(sc) => eprintln!(
                "{}: id {}  generation {}  state {}  {} of {} blocks written since the generation began  ({} allocated of {})",
                path.display(),
                id_hex(&sc.identity.id),
                sc.identity.generation,
                v["state"].as_str().unwrap_or(""),
                sc.written.count(),
                blocks,
                units::human_bytes(allocated),
                units::human_bytes(meta.len())
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
