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
                let dom =
                    ferry_xen::create_paused(cfg, how.domain_name.as_deref()).map_err(xerr)?;
                match ferry_xen::domain::XenGuest::destination(dom, layout) {
                    Ok(g) => Ok(Self::Xen(Arc::new(g))),
                    Err(e) => {
                        let _ = std::process::Command::new("xl")
                            .args(["destroy", &dom.to_string()])
                            .status();
                        Err(xerr(e))
                    }
                }
            }
            #[cfg(not(feature = "xen"))]
            "xen" => Err(GuestError::Unsupported(NO_XEN.into())),
            other => Err(GuestError::Unsupported(format!(
                "backend {other:?} (this ferry runs sim, kvm and xen guests)"
            ))),
        }
    }

    /// A running Xen domain to migrate (by name or id).
    pub fn xen_domain(name: &str, stop: &str) -> anyhow::Result<Self> {
        #[cfg(feature = "xen")]
        {
            let stop = ferry_xen::domain::StopMode::parse(stop)
                .map_err(|e| anyhow::anyhow!("--xen-stop: {e}"))?;
            let dom = ferry_xen::resolve_domain(name)?;
            Ok(Self::Xen(Arc::new(ferry_xen::domain::XenGuest::source(
                dom, stop,
            )?)))
        }
        #[cfg(not(feature = "xen"))]
        {
            let _ = stop;
            anyhow::bail!("--backend xen --domain {name}: {NO_XEN}")
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
            // The toolstack owns a Xen domain's life: `xl shutdown`/`xl destroy`.
            #[cfg(feature = "xen")]
            Self::Xen(_) => {}
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
            Self::Xen(_) => Vec::new(),
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
