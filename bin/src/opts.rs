//! Option groups shared by several commands, and their conversion into configs.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use ferry_core::codec::CodecFactory;
use ferry_core::engine::{MemoryMode, SourceConfig, StorageMode, Throttle};
use ferry_core::policy::ConvergencePolicy;
use ferry_core::wire::VerifyMode;
use ferry_disk::DiskSpec;
use ferry_sim::{Fill, Pattern, SimConfig, SimGuest, WorkloadConfig};

use crate::guest::Hosted;

use crate::units::{parse_duration, parse_fraction, parse_rate, parse_size};

/// The guest to start.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest backend: `sim` (the embedded default: memory, disk and workload threads in
    /// this process), `kvm` (a hardware-virtualized VM on /dev/kvm running Ferry's
    /// bundled ring-3 guest program and block device) or `xen` (a Xen domain, running
    /// `--domain` or new `--domain-config`; needs a build with `--features xen`, in dom0).
    #[arg(long, default_value = "sim", value_parser = ["sim", "kvm", "xen"])]
    pub backend: String,
    /// xen: the running domain to migrate (name or id), with disks of its own.
    #[arg(long, conflicts_with = "domain_config")]
    pub domain: Option<String>,
    /// xen: create the domain from this xl configuration, with `--disk` served to it by
    /// this process (as `/dev/nbdN`, a `phy:` disk xvda, replacing the configuration's
    /// `disk =`), so every guest write is logged for the storage migration.
    #[arg(long)]
    pub domain_config: Option<PathBuf>,
    /// xen: how the domain is stopped for the last copy: `pause`, `suspend` (the guest
    /// suspends itself; for guests with PV devices) or `auto` (suspend when the guest
    /// advertises it or has disks Ferry serves).
    #[arg(long, default_value = "auto")]
    pub xen_stop: String,
    /// Guest memory size.
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    pub memory: u64,
    /// Disk image (created sparse when missing). Default: a temporary image removed at exit.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Disk size.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub disk_size: u64,
    /// The disk's block size: the unit of dirty tracking and of transfer, a power of two
    /// from 4KiB to 2MiB. Per-block state (bitmaps, digest chunks, the sidecar) costs
    /// one bit to 16 bytes per block: for disks of many TiB, use 64KiB or more.
    #[arg(long, value_parser = parse_size, default_value = "4KiB")]
    pub block_size: u64,
    /// Run without a disk.
    #[arg(long, conflicts_with_all = ["disk"])]
    pub no_disk: bool,
    /// Share of a new disk image filled with data (0..1 or a percentage).
    #[arg(long, value_parser = parse_fraction, default_value = "0.5")]
    pub disk_used: f64,
    /// Write pattern. sim: uniform, hotspot (default), sequential, idle. kvm: sequential
    /// (default), scatter (every page once per pass in a scrambled order), idle.
    #[arg(long)]
    pub workload: Option<String>,
    /// Page writes per second (`100000`), or a byte rate (`400MiB/s`); 0 = unthrottled.
    #[arg(long, default_value = "100000")]
    pub dirty_rate: String,
    /// Disk block writes per second (0 = none).
    #[arg(long, default_value_t = 500)]
    pub disk_rate: u64,
    /// Workload threads (sim) or vCPUs (kvm).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Initial memory content: zero (a fresh guest), random, or a file (a memory image,
    /// repeated or cut to size; `.zst` is decompressed).
    #[arg(long, default_value = "zero")]
    pub fill: String,
    /// Workload seed.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// kvm: how dirty pages are collected, `bitmap` (KVM_GET_DIRTY_LOG) or `ring` (the
    /// per-vCPU dirty ring).
    #[arg(long, default_value = "bitmap", value_parser = ["bitmap", "ring"])]
    pub dirty_log: String,
}

/// Parses `--dirty-rate` into page writes per second.
pub fn dirty_rate_pages(s: &str, page_size: u64) -> anyhow::Result<u64> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    let bytes = parse_rate(s).map_err(|e| anyhow::anyhow!("--dirty-rate: {e}"))?;
    Ok((bytes / page_size).max(1))
}

/// The disk (if any) of the guest `cfg` describes, as a backend opens it.
fn disk_spec(cfg: &SimConfig) -> Option<DiskSpec> {
    cfg.disk_path.as_ref().map(|path| DiskSpec {
        path: path.clone(),
        block_size: cfg.block_size,
        size: cfg.disk_size,
        used: cfg.disk_used,
        seed: cfg.workload.seed,
    })
}

/// A started guest plus the temporary directory holding its default disk.
pub struct StartedGuest {
    /// The guest.
    pub guest: Hosted,
    /// Keeps the temporary disk alive.
    pub _tmp: Option<tempfile::TempDir>,
}

impl GuestArgs {
    /// An idle-or-not sim guest without a disk, as the bench commands start.
    pub fn for_bench(memory: u64, fill: &str, workload: &str, dirty_rate: &str, seed: u64) -> Self {
        Self {
            backend: "sim".into(),
            domain: None,
            domain_config: None,
            xen_stop: "auto".into(),
            memory,
            disk: None,
            disk_size: 0,
            block_size: 4096,
            no_disk: true,
            disk_used: 0.0,
            workload: Some(workload.to_string()),
            dirty_rate: dirty_rate.to_string(),
            disk_rate: 0,
            threads: 1,
            fill: fill.to_string(),
            seed,
            dirty_log: "bitmap".into(),
        }
    }

    /// The workload pattern's name (the backend's default when not given).
    pub fn workload_name(&self) -> &str {
        match (&self.workload, self.backend.as_str()) {
            (Some(w), _) => w,
            (None, "kvm") => "sequential",
            (None, _) => "hotspot",
        }
    }

    /// The sim workload pattern.
    fn sim_pattern(&self) -> anyhow::Result<Pattern> {
        Pattern::parse(self.workload_name()).map_err(|e| anyhow::anyhow!("--workload: {e}"))
    }

    /// Builds the sim config; a default disk goes into a new temporary directory.
    pub fn config(&self) -> anyhow::Result<(SimConfig, Option<tempfile::TempDir>)> {
        let page_size = 4096u64;
        let fill = Fill::parse(&self.fill);
        if let Fill::File(p) = &fill {
            if !p.exists() {
                bail!(
                    "--fill: {} does not exist (use zero, random or a file)",
                    p.display()
                );
            }
        }
        let (disk_path, tmp) = if self.no_disk {
            (None, None)
        } else if let Some(p) = &self.disk {
            (Some(p.clone()), None)
        } else {
            let t = tempfile::Builder::new()
                .prefix("ferry-disk-")
                .tempdir()
                .context("creating a temporary directory for the disk image")?;
            (Some(t.path().join("disk0.img")), Some(t))
        };
        if !self.memory.is_multiple_of(page_size) || self.memory == 0 {
            bail!(
                "--memory: {} is not a positive multiple of 4 KiB",
                self.memory
            );
        }
        if !self.block_size.is_power_of_two() || !(4096..=(2 << 20)).contains(&self.block_size) {
            bail!(
                "--block-size: {} is not a power of two from 4KiB to 2MiB",
                self.block_size
            );
        }
        if disk_path.is_some()
            && (!self.disk_size.is_multiple_of(self.block_size) || self.disk_size == 0)
        {
            bail!(
                "--disk-size: {} is not a positive multiple of the block size ({})",
                self.disk_size,
                self.block_size
            );
        }
        Ok((
            SimConfig {
                memory: self.memory,
                page_size: page_size as u32,
                disk_path,
                disk_size: self.disk_size,
                block_size: self.block_size as u32,
                disk_used: self.disk_used,
                fill,
                workload: WorkloadConfig {
                    // The KVM guest parses its own patterns (`kvm_guest`).
                    pattern: if self.backend == "kvm" {
                        Pattern::Idle
                    } else {
                        self.sim_pattern()?
                    },
                    dirty_rate: dirty_rate_pages(&self.dirty_rate, page_size)?,
                    disk_rate: self.disk_rate,
                    threads: self.threads,
                    seed: self.seed,
                },
            },
            tmp,
        ))
    }

    /// Creates and starts the guest.
    pub fn start(&self) -> anyhow::Result<StartedGuest> {
        if self.backend == "xen" {
            return self.xen_guest();
        }
        if self.domain.is_some() || self.domain_config.is_some() {
            bail!("--domain and --domain-config name a Xen guest: add --backend xen");
        }
        let (cfg, tmp) = self.config()?;
        let guest = match self.backend.as_str() {
            "kvm" => Hosted::Kvm(Arc::new(self.kvm_guest(&cfg)?)),
            _ => Hosted::Sim(Arc::new(
                SimGuest::create(&cfg).context("creating the sim guest")?,
            )),
        };
        guest.start();
        Ok(StartedGuest { guest, _tmp: tmp })
    }

    /// The Xen domain these flags name or create.
    fn xen_guest(&self) -> anyhow::Result<StartedGuest> {
        if let Some(cfg) = &self.domain_config {
            if !cfg.is_file() {
                bail!("--domain-config: {} is not a file", cfg.display());
            }
            let (sim, tmp) = self.config()?;
            let disks: Vec<DiskSpec> = disk_spec(&sim).into_iter().collect();
            return Ok(StartedGuest {
                guest: Hosted::xen_created(cfg, &disks, &self.xen_stop)?,
                _tmp: tmp,
            });
        }
        let Some(name) = self.domain.as_deref() else {
            bail!("--backend xen needs --domain NAME (a running domain) or --domain-config CFG (a new one)");
        };
        if self.disk.is_some() {
            bail!("--disk: the running domain {name} has disks of its own; use --domain-config to have Ferry serve --disk to a new domain");
        }
        Ok(StartedGuest {
            guest: Hosted::xen_domain(name, &self.xen_stop)?,
            _tmp: None,
        })
    }

    /// The KVM guest these flags describe (memory, disk and fill checked by `config`).
    fn kvm_guest(&self, cfg: &SimConfig) -> anyhow::Result<ferry_kvm::KvmGuest> {
        let pattern = ferry_kvm::Pattern::parse(self.workload_name())
            .map_err(|e| anyhow::anyhow!("--workload: {e}"))?;
        let dirty_mode = ferry_kvm::DirtyMode::parse(&self.dirty_log)
            .map_err(|e| anyhow::anyhow!("--dirty-log: {e}"))?;
        ferry_kvm::layout::check_memory(self.memory)
            .map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
        if usize::from(self.threads) > ferry_kvm::layout::MAX_VCPUS {
            bail!("--threads: at most {} vCPUs", ferry_kvm::layout::MAX_VCPUS);
        }
        let kc = ferry_kvm::KvmConfig {
            memory: self.memory,
            vcpus: usize::from(self.threads),
            workload: ferry_kvm::Workload {
                pattern,
                dirty_rate: cfg.workload.dirty_rate,
                disk_rate: cfg.workload.disk_rate,
            },
            disk: disk_spec(cfg),
            fill: cfg.fill.clone(),
            seed: self.seed,
            dirty_mode,
        };
        ferry_kvm::KvmGuest::create(&kc).context("--backend kvm: creating the KVM guest")
    }
}

/// How to migrate. Over the control socket every field is optional and defaults to the
/// command line's default.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct MigrationArgs {
    /// Codec pipeline, in order: `raw`, `auto` (chosen per batch from the measured link
    /// and codec speed), or a list of `dedup[:SIZE]`, `xor-delta`, `lz4`, `zstd[:LEVEL]`,
    /// e.g. `dedup,xor-delta,lz4`.
    #[arg(long, default_value = "raw")]
    pub codec: String,
    /// Last-sent versions `xor-delta` keeps per channel on the source.
    #[arg(long, default_value = "64MiB")]
    pub xor_cache: String,
    /// Transport and peer authentication.
    #[command(flatten)]
    pub peer: crate::auth::PeerArgs,
    /// Parallel channels (pages and blocks are pinned to channels by number). Two by
    /// default: on loopback here one channel reaches 0.76 of plain memory-to-memory TCP and
    /// two 1.36 (`ferry bench throughput`), as each side gets a core per channel.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Downtime target (pause once the rest is estimated to move within it).
    #[arg(long, default_value = "10ms")]
    pub downtime: String,
    /// Memory pre-copy rounds at most.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Bandwidth cap, e.g. `100Mbit` or `50MiB/s`.
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// Verification: `digest` (free) or `full` (hash the whole guest during the pause).
    #[arg(long, value_enum, default_value_t = VerifyArg::Digest)]
    pub verify: VerifyArg,
    /// How long to wait for the peer before giving up (and resuming the source).
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Disk write throttling: `auto` (when the guest writes faster than half the link),
    /// `off`, or a cap such as `10MiB/s`.
    #[arg(long, default_value = "auto")]
    pub throttle: String,
    /// When the disk blocks still dirty at the pause move: `precopy` (in the pause) or
    /// `postcopy` (after the hand-over, pulled first when the guest reads them).
    #[arg(long, value_enum, default_value_t = StorageModeArg::Precopy)]
    pub storage_mode: StorageModeArg,
    /// When guest memory moves: `precopy` (rounds while the guest runs, the rest in the
    /// pause), `postcopy` (after the hand-over: the guest runs on the destination at once
    /// and faults pages in while the rest is pushed), or `hybrid` (pre-copy rounds, then
    /// post-copy when they would not reach the downtime target, or on `ferry postcopy`).
    #[arg(long, value_enum, default_value_t = MemoryModeArg::Precopy)]
    #[serde(default)]
    pub memory_mode: MemoryModeArg,
    /// Memory auto-converge in pre-copy: throttle the guest's vCPUs (20%, then 10 points
    /// more per round, up to 99%) while the rounds do not converge.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    #[serde(default)]
    pub auto_converge: OnOff,
}

/// An enumerated flag: its values appear in `--help`, and the control socket and the
/// JSON Schema take the same kebab-case names.
macro_rules! flag_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(
            clap::ValueEnum,
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            Default,
            serde::Serialize,
            serde::Deserialize,
            schemars::JsonSchema,
        )]
        #[serde(rename_all = "kebab-case")]
        pub enum $name { $($body)* }
    };
}

flag_enum! {
    /// `--verify`.
    pub enum VerifyArg {
        /// Keyed per-unit digests kept as units move, compared at the pause (no downtime).
        #[default]
        Digest,
        /// Also hash the whole guest on both sides during the pause.
        Full,
    }
}

flag_enum! {
    /// `--storage-mode`.
    pub enum StorageModeArg {
        /// The last dirty blocks move in the pause.
        #[default]
        Precopy,
        /// They move after the hand-over, pulled first when the guest reads them.
        Postcopy,
    }
}

flag_enum! {
    /// `--memory-mode`.
    pub enum MemoryModeArg {
        /// Pre-copy rounds, then the rest in the pause.
        #[default]
        Precopy,
        /// Every page after the hand-over.
        Postcopy,
        /// Pre-copy, then post-copy when pre-copy would not converge.
        Hybrid,
    }
}

impl From<MemoryModeArg> for MemoryMode {
    fn from(m: MemoryModeArg) -> Self {
        match m {
            MemoryModeArg::Precopy => MemoryMode::PreCopy,
            MemoryModeArg::Postcopy => MemoryMode::PostCopy,
            MemoryModeArg::Hybrid => MemoryMode::Hybrid,
        }
    }
}

flag_enum! {
    /// An on/off switch.
    pub enum OnOff {
        /// Enabled.
        #[default]
        On,
        /// Disabled.
        Off,
    }
}

impl Default for MigrationArgs {
    /// The command line's defaults (a test checks they agree).
    fn default() -> Self {
        Self {
            codec: "raw".into(),
            xor_cache: "64MiB".into(),
            peer: crate::auth::PeerArgs::default(),
            channels: 2,
            downtime: "10ms".into(),
            max_rounds: 30,
            max_bandwidth: None,
            verify: VerifyArg::Digest,
            timeout: "10s".into(),
            throttle: "auto".into(),
            storage_mode: StorageModeArg::Precopy,
            memory_mode: MemoryModeArg::Precopy,
            auto_converge: OnOff::On,
        }
    }
}

impl MigrationArgs {
    /// The settings the bench commands start from: `codec` over `transport` with
    /// `channels`, the flags' defaults otherwise, and plain `tcp` accepted (both ends are
    /// ours, on loopback or in namespaces we made).
    pub fn for_bench(codec: &str, transport: &str, channels: u16) -> Self {
        Self {
            codec: codec.to_string(),
            peer: crate::auth::PeerArgs {
                transport: transport.to_string(),
                insecure: transport == "tcp",
                ..Default::default()
            },
            channels,
            timeout: "30s".into(),
            ..Default::default()
        }
    }

    /// The codec pipeline `--codec` and `--xor-cache` ask for.
    pub fn codec(&self) -> anyhow::Result<Arc<dyn CodecFactory>> {
        let xor_cache =
            parse_size(&self.xor_cache).map_err(|e| anyhow::anyhow!("--xor-cache: {e}"))?;
        let pipeline =
            ferry_codecs::parse(&self.codec).map_err(|e| anyhow::anyhow!("--codec: {e}"))?;
        Ok(Arc::new(pipeline.with_xor_cache(
            usize::try_from(xor_cache).map_err(|_| anyhow::anyhow!("--xor-cache: too large"))?,
        )))
    }

    /// Validates and converts into an engine config for `to`.
    pub fn source_config(&self, to: &str) -> anyhow::Result<SourceConfig> {
        let downtime =
            parse_duration(&self.downtime).map_err(|e| anyhow::anyhow!("--downtime: {e}"))?;
        let timeout =
            parse_duration(&self.timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
        let max_bandwidth = self
            .max_bandwidth
            .as_deref()
            .map(parse_rate)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?;
        let verify = match self.verify {
            VerifyArg::Digest => VerifyMode::Digest,
            VerifyArg::Full => VerifyMode::Full,
        };
        if self.max_rounds == 0 {
            bail!("--max-rounds: must be at least 1");
        }
        // Checked, not built: the command builds its codec and transport once, where it
        // runs the migration.
        ferry_codecs::parse(&self.codec).map_err(|e| anyhow::anyhow!("--codec: {e}"))?;
        parse_size(&self.xor_cache).map_err(|e| anyhow::anyhow!("--xor-cache: {e}"))?;
        self.peer.check(timeout)?;
        let throttle = match self.throttle.as_str() {
            "auto" => Throttle::Auto,
            "off" => Throttle::Off,
            rate => Throttle::Cap(
                parse_rate(rate).map_err(|e| anyhow::anyhow!("--throttle: {e} (or auto, off)"))?,
            ),
        };
        let storage_mode = match self.storage_mode {
            StorageModeArg::Precopy => StorageMode::PreCopy,
            StorageModeArg::Postcopy => StorageMode::PostCopy,
        };
        Ok(SourceConfig {
            throttle,
            storage_mode,
            memory_mode: self.memory_mode.into(),
            auto_converge: self.auto_converge == OnOff::On,
            addr: to.to_string(),
            channels: usize::from(self.channels),
            policy: ConvergencePolicy {
                downtime_target: downtime,
                max_rounds: self.max_rounds,
                ..Default::default()
            },
            max_bandwidth,
            verify,
            io_timeout: timeout,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod defaults_tests {
    use super::*;
    use clap::FromArgMatches;

    /// A request over the control socket that leaves a field out gets what the command
    /// line would.
    #[test]
    fn serde_defaults_are_the_command_lines() {
        let cmd = <MigrationArgs as Args>::augment_args(clap::Command::new("ferry"));
        let parsed = MigrationArgs::from_arg_matches(&cmd.get_matches_from(["ferry"]));
        let parsed = serde_json::to_value(parsed.ok()).ok();
        let default = serde_json::to_value(Some(MigrationArgs::default())).ok();
        assert_eq!(parsed, default);
        let empty: MigrationArgs = serde_json::from_str("{}").unwrap_or_default();
        assert_eq!(
            serde_json::to_value(empty).ok(),
            serde_json::to_value(MigrationArgs::default()).ok()
        );
    }
}
