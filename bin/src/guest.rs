//! The guest a `ferry` process hosts, whichever backend runs it. Backend differences stay
//! here: the engine only sees the `SourceGuest`/`DestGuest` seams.

use std::path::{Path, PathBuf};
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
}

impl Hosted {
    /// Builds an empty guest to receive `layout` into (the layout names the backend).
    pub fn incoming(
        layout: &GuestLayout,
        dir: &Path,
        dirty: DirtyMode,
    ) -> Result<Self, GuestError> {
        match layout.backend.as_str() {
            ferry_sim::BACKEND => Ok(Self::Sim(Arc::new(SimGuest::incoming(layout, dir)?))),
            ferry_kvm::BACKEND => Ok(Self::Kvm(Arc::new(KvmGuest::incoming(layout, dir, dirty)?))),
            other => Err(GuestError::Unsupported(format!(
                "backend {other:?} (this ferry runs sim and kvm guests)"
            ))),
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sim(_) => ferry_sim::BACKEND,
            Self::Kvm(_) => ferry_kvm::BACKEND,
        }
    }

    /// The source seam.
    pub fn source(&self) -> Arc<dyn SourceGuest> {
        match self {
            Self::Sim(g) => Arc::clone(g) as Arc<dyn SourceGuest>,
            Self::Kvm(g) => Arc::clone(g) as Arc<dyn SourceGuest>,
        }
    }

    /// The destination seam.
    pub fn dest(&self) -> Arc<dyn DestGuest> {
        match self {
            Self::Sim(g) => Arc::clone(g) as Arc<dyn DestGuest>,
            Self::Kvm(g) => Arc::clone(g) as Arc<dyn DestGuest>,
        }
    }

    /// Runs the guest (again).
    pub fn start(&self) {
        match self {
            Self::Sim(g) => g.start(),
            Self::Kvm(g) => g.start(),
        }
    }

    /// Stops the guest for good.
    pub fn stop(&self) {
        match self {
            Self::Sim(g) => g.stop(),
            Self::Kvm(g) => g.stop(),
        }
    }

    /// The guest's self-check, now.
    pub fn check_now(&self) -> Result<OracleReport, GuestError> {
        match self {
            Self::Sim(g) => g.check_now(),
            Self::Kvm(g) => g.check_now(),
        }
    }

    /// Disk images.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        match self {
            Self::Sim(g) => g.disk_paths(),
            Self::Kvm(g) => g.disk_paths(),
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
        }
    }
}
