//! The guest a `ferry` process hosts, whichever backend runs it. Backend differences stay
//! here: the engine only sees the `SourceGuest`/`DestGuest` seams.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::guest::{DestGuest, GuestError, GuestLayout, OracleReport, SourceGuest};
use ferry_kvm::{DirtyMode, KvmGuest};
use ferry_sim::SimGuest;
use serde_json::{json, Value};

/// A hosted guest.
#[derive(Clone)]
pub enum Hosted {
    /// The embedded default guest.
    Sim(Arc<SimGuest>),
    /// A hardware-virtualized guest on `/dev/kvm`.
    Kvm(Arc<KvmGuest>),
    /// A Xen domain (this process runs in dom0 and steers it).
    #[cfg(feature = "xen")]
    Xen(Arc<ferry_xen::domain::XenGuest>),
}

/// How a destination builds what arrives.
pub struct Incoming {
    /// Directory for disk images.
    pub dir: PathBuf,
    /// Dirty logging of a received KVM guest.
    pub dirty: DirtyMode,
    /// xl configuration the Xen target domain is created from (paused).
    pub domain_config: Option<PathBuf>,
    /// Name for that domain (default: the configuration's).
    pub domain_name: Option<String>,
}

/// The error for `--backend xen` in a build without it.
#[cfg(not(feature = "xen"))]
pub const NO_XEN: &str = "this ferry was built without Xen support: install libxen-dev and libclang-dev, then cargo build --release -p ferry --features xen";

impl Hosted {
    /// Builds an empty guest to receive `layout` into (the layout names the backend).
    pub fn incoming(layout: &GuestLayout, how: &Incoming) -> Result<Self, GuestError> {
        match layout.backend.as_str() {
            ferry_sim::BACKEND => Ok(Self::Sim(Arc::new(SimGuest::incoming(layout, &how.dir)?))),
            ferry_kvm::BACKEND => Ok(Self::Kvm(Arc::new(KvmGuest::incoming(
                layout, &how.dir, how.dirty,
            )?))),
            #[cfg(feature = "xen")]
            ferry_xen::BACKEND => {
                let cfg = how.domain_config.as_deref().ok_or_else(|| {
                    GuestError::Unsupported(
                        "a Xen guest arrived but this listener has no --domain-config".into(),
                    )
                })?;
                let xerr = |e: ferry_xen::XenError| GuestError::Unsupported(e.to_string());
                // The disks are served before the domain exists: blkback opens them when
                // the toolstack creates it.
                let served = if layout.disks.is_empty() {
                    None
                } else {
                    let disks = ferry_disk::GuestDisks::incoming(&layout.disks, &how.dir)?;
                    Some(ferry_xen::disks::ServedDisks::serve(disks).map_err(xerr)?)
                };
                let setting = served.as_ref().map(|d| d.xl_override().to_string());
                let dom = match ferry_xen::create_domain(
                    cfg,
                    how.domain_name.as_deref(),
                    setting.as_deref(),
                    true,
                ) {
                    Ok(dom) => dom,
                    Err(e) => {
                        if let Some(d) = served {
                            d.discard();
                        }
                        return Err(xerr(e));
                    }
                };
                ferry_xen::domain::XenGuest::destination(dom, layout, served)
                    .map(|g| Self::Xen(Arc::new(g)))
                    .map_err(|e| {
                        xl_destroy(dom);
                        xerr(e)
                    })
            }
            #[cfg(not(feature = "xen"))]
            "xen" => Err(GuestError::Unsupported(NO_XEN.into())),
            other => Err(GuestError::Unsupported(format!(
                "backend {other:?} (this ferry runs sim, kvm and xen guests)"
            ))),
        }
    }

    /// A running Xen domain to migrate (by name or id), with disks of its own.
    pub fn xen_domain(name: &str, stop: &str) -> anyhow::Result<Self> {
        #[cfg(feature = "xen")]
        {
            let stop = ferry_xen::domain::StopMode::parse(stop)
                .map_err(|e| anyhow::anyhow!("--xen-stop: {e}"))?;
            let dom = ferry_xen::resolve_domain(name)?;
            Ok(Self::Xen(Arc::new(ferry_xen::domain::XenGuest::source(
                dom, stop, None,
            )?)))
        }
        #[cfg(not(feature = "xen"))]
        {
            let _ = stop;
            anyhow::bail!("--backend xen --domain {name}: {NO_XEN}")
        }
    }

    /// A new Xen domain created (running) from the xl configuration `config`, its
    /// `disks` served by this process through `/dev/nbdN` (they replace any `disk =` of
    /// the configuration).
    pub fn xen_created(
        config: &std::path::Path,
        disks: &[ferry_disk::DiskSpec],
        stop: &str,
    ) -> anyhow::Result<Self> {
        #[cfg(feature = "xen")]
        {
            use anyhow::Context;
            let stop = ferry_xen::domain::StopMode::parse(stop)
                .map_err(|e| anyhow::anyhow!("--xen-stop: {e}"))?;
            let disks = ferry_disk::GuestDisks::open_live(disks).context("--disk")?;
            let served = ferry_xen::disks::ServedDisks::serve(disks).context("--disk")?;
            let dom =
                match ferry_xen::create_domain(config, None, Some(served.xl_override()), false) {
                    Ok(dom) => dom,
                    Err(e) => {
                        served.close();
                        return Err(e).context("--domain-config");
                    }
                };
            match ferry_xen::domain::XenGuest::source(dom, stop, Some(served)) {
                Ok(g) => Ok(Self::Xen(Arc::new(g))),
                Err(e) => {
                    xl_destroy(dom);
                    Err(e.into())
                }
            }
        }
        #[cfg(not(feature = "xen"))]
        {
            let _ = (disks, stop);
            anyhow::bail!("--domain-config {}: {NO_XEN}", config.display())
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sim(_) => ferry_sim::BACKEND,
            Self::Kvm(_) => ferry_kvm::BACKEND,
            #[cfg(feature = "xen")]
            Self::Xen(_) => ferry_xen::BACKEND,
        }
    }

    /// The source seam.
    pub fn source(&self) -> Arc<dyn SourceGuest> {
        match self {
            Self::Sim(g) => Arc::clone(g) as Arc<dyn SourceGuest>,
            Self::Kvm(g) => Arc::clone(g) as Arc<dyn SourceGuest>,
            #[cfg(feature = "xen")]
            Self::Xen(g) => Arc::clone(g) as Arc<dyn SourceGuest>,
        }
    }

    /// The destination seam.
    pub fn dest(&self) -> Arc<dyn DestGuest> {
        match self {
            Self::Sim(g) => Arc::clone(g) as Arc<dyn DestGuest>,
            Self::Kvm(g) => Arc::clone(g) as Arc<dyn DestGuest>,
            #[cfg(feature = "xen")]
            Self::Xen(g) => Arc::clone(g) as Arc<dyn DestGuest>,
        }
    }

    /// Runs the guest (again).
    pub fn start(&self) {
        match self {
            Self::Sim(g) => g.start(),
            Self::Kvm(g) => g.start(),
            // A Xen domain runs under the hypervisor already; a received one was unpaused
            // by the engine.
            #[cfg(feature = "xen")]
            Self::Xen(_) => {}
        }
    }

    /// Stops the guest for good.
    pub fn stop(&self) {
        match self {
            Self::Sim(g) => g.stop(),
            Self::Kvm(g) => g.stop(),
            // A domain whose disks this process serves cannot outlive it: it is shut down.
            // One with disks of its own is left to the toolstack.
            #[cfg(feature = "xen")]
            Self::Xen(g) => g.shut_down(),
        }
    }

    /// The guest's self-check, now.
    pub fn check_now(&self) -> Result<OracleReport, GuestError> {
        match self {
            Self::Sim(g) => g.check_now(),
            Self::Kvm(g) => g.check_now(),
            #[cfg(feature = "xen")]
            Self::Xen(_) => Err(GuestError::Unsupported(
                "a Xen guest has no self-check here".into(),
            )),
        }
    }

    /// Disk images.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Sim(g) => g.disk_paths(),
            Self::Kvm(g) => g.disk_paths(),
            #[cfg(feature = "xen")]
            Self::Xen(g) => g.disk_paths(),
        }
    }

    /// Progress and workload, as `ferry status` shows them.
    pub fn status(&self) -> (Value, Value) {
        match self {
            Self::Sim(g) => {
                let s = g.stats();
                let w = g.workload();
                (
                    json!({"page_writes": s.page_writes, "block_writes": s.block_writes, "running": s.running}),
                    json!({"pattern": w.pattern.name(), "dirty_rate": w.dirty_rate, "disk_rate": w.disk_rate, "threads": w.threads}),
                )
            }
            Self::Kvm(g) => {
                let s = g.stats();
                let w = g.workload();
                (
                    json!({"page_writes": s.page_writes, "block_writes": s.block_writes, "passes": s.passes,
                        "running": s.running, "fault": g.fault()}),
                    json!({"pattern": w.pattern.name(), "dirty_rate": w.dirty_rate, "disk_rate": w.disk_rate,
                        "vcpus": g.vcpu_count(), "dirty_log": g.dirty_mode().name()}),
                )
            }
            #[cfg(feature = "xen")]
            Self::Xen(g) => (json!({"domid": g.domid()}), Value::Null),
        }
    }
}

impl Incoming {
    /// Checks the Xen options before anything arrives.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(n) = &self.domain_name {
            if n.is_empty() || n.contains(['"', '\'', '\n']) {
                anyhow::bail!("--domain-name: {n:?} is not a usable domain name");
            }
        }
        match &self.domain_config {
            None => Ok(()),
            #[cfg(not(feature = "xen"))]
            Some(_) => anyhow::bail!("--domain-config: {NO_XEN}"),
            #[cfg(feature = "xen")]
            Some(p) if !p.is_file() => {
                anyhow::bail!("--domain-config: {} is not a file", p.display())
            }
            #[cfg(feature = "xen")]
            Some(_) => Ok(()),
        }
    }
}

/// Destroys a domain this process created and could not use.
#[cfg(feature = "xen")]
fn xl_destroy(dom: u32) {
    let _ = std::process::Command::new("xl")
        .args(["destroy", &dom.to_string()])
        .status();
}
