//! Helpers shared by the engine and storage tests: real sim guests migrated over the
//! in-memory transport.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::engine::{self, DestConfig, DestOutcome, SourceConfig};
use ferry_core::guest::{GuestLayout, SourceGuest};
use ferry_core::policy::ConvergencePolicy;
use ferry_core::transport::Transport;
use ferry_core::wire::VerifyMode;
use ferry_core::{DestGuest, Report};
use ferry_sim::{Fill, Pattern, SimConfig, SimGuest, WorkloadConfig};
use ferry_transports::MemTransport;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A test guest: 48 MiB of memory and a 16 MiB `disk0.img` by default.
pub struct Spec {
    /// Memory size.
    pub memory: u64,
    /// Disk size.
    pub disk_size: u64,
    /// Block writes per second.
    pub disk_rate: u64,
    /// Page writes per second (0 = flat out).
    pub dirty_rate: u64,
    /// Write pattern.
    pub pattern: Pattern,
    /// Initial memory.
    pub fill: Fill,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            memory: 48 << 20,
            disk_size: 16 << 20,
            disk_rate: 400,
            dirty_rate: 20_000,
            pattern: Pattern::Hotspot,
            fill: Fill::Zero,
        }
    }
}

impl Spec {
    /// Creates the guest in `dir` (two workload threads, seed 7) and starts it.
    pub fn start(self, dir: &Path) -> Arc<SimGuest> {
        let g = SimGuest::create(&SimConfig {
            memory: self.memory,
            disk_path: Some(dir.join("disk0.img")),
            disk_size: self.disk_size,
            fill: self.fill,
            workload: WorkloadConfig {
                pattern: self.pattern,
                dirty_rate: self.dirty_rate,
                disk_rate: self.disk_rate,
                threads: 2,
                seed: 7,
            },
            ..SimConfig::default()
        })
        .unwrap();
        g.start();
        Arc::new(g)
    }
}

/// A finished migration.
pub struct Run {
    /// The source's report.
    pub report: Report,
    /// The destination's outcome.
    pub outcome: DestOutcome,
    /// The destination guest, if one was built.
    pub dest: Option<Arc<SimGuest>>,
}

/// Migrates `source` into a destination whose images live in `dest_dir`.
pub fn migrate_with(
    source: Arc<dyn SourceGuest>,
    transport: MemTransport,
    codec: &str,
    channels: usize,
    verify: VerifyMode,
    dest_dir: &Path,
) -> Run {
    migrate_tuned(source, transport, codec, channels, verify, dest_dir, |_| {})
}

/// Like [`migrate_with`], with `tune` adjusting the source's configuration.
pub fn migrate_tuned(
    source: Arc<dyn SourceGuest>,
    transport: MemTransport,
    codec: &str,
    channels: usize,
    verify: VerifyMode,
    dest_dir: &Path,
    tune: impl FnOnce(&mut SourceConfig),
) -> Run {
    let name = format!("engine-test-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut listener = transport.listen(&name).unwrap();
    let dest_dir = dest_dir.to_path_buf();
    let slot: Arc<Mutex<Option<Arc<SimGuest>>>> = Arc::default();
    let slot2 = Arc::clone(&slot);
    let dest = std::thread::spawn(move || {
        let chans = listener.accept().unwrap();
        engine::receive(
            chans,
            &|l: &GuestLayout| {
                let g = Arc::new(SimGuest::incoming(l, &dest_dir)?);
                *slot2.lock().unwrap() = Some(Arc::clone(&g));
                Ok(g as Arc<dyn DestGuest>)
            },
            &ferry_codecs::resolve,
            &DestConfig {
                io_timeout: Duration::from_secs(2),
                ..DestConfig::default()
            },
            &|| {},
        )
    });
    let cfg = SourceConfig {
        addr: name,
        channels,
        policy: ConvergencePolicy {
            downtime_target: Duration::from_millis(20),
            ..Default::default()
        },
        verify,
        io_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let mut cfg = cfg;
    tune(&mut cfg);
    let report = engine::migrate(
        source,
        &transport,
        ferry_codecs::resolve(codec).unwrap(),
        &cfg,
        &|_| {},
    );
    let outcome = dest.join().unwrap();
    let dest = slot.lock().unwrap().take();
    Run {
        report,
        outcome,
        dest,
    }
}
