//! Ferry's KVM backend: a small VMM that runs a bundled ring-3 guest program on `/dev/kvm`
//! and lets the engine migrate it live.
//!
//! - [`layout`]: guest-physical layout, boot structures (long mode entered directly at
//!   CPL 3: on the nested `kvm_pvm` of the development machines ring-0 code is emulated).
//! - [`memory`]: guest RAM as one mapping in one or more KVM memory slots.
//! - [`dirty`]: KVM's dirty bitmap or dirty ring, plus the VMM's own writes.
//! - `vcpu`: vCPU threads, ports, pacing, pausing at an instruction boundary.
//! - [`state`]: the versioned state blob and the save/restore order.
//! - `oracle`: the page-counter and block-sequence check.
//! - [`KvmGuest`]: the engine's source and destination seams.

pub mod dirty;
mod guest;
pub mod layout;
pub mod memory;
mod oracle;
pub mod state;
mod vcpu;
pub mod workload;

pub use dirty::DirtyMode;
pub use guest::{KvmConfig, KvmGuest, KvmStats};
pub use workload::{Pattern, Workload};

/// Backend name in the handshake.
pub const BACKEND: &str = "kvm";

/// The bundled guest program (`guest/workload.S`, assembled by `build.rs`).
pub const WORKLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));

/// An error creating or running a KVM guest.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// KVM cannot be used here.
    #[error("KVM is not available: {0}")]
    Unavailable(String),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Mapping memory or a file failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad setting.
    #[error("{0}")]
    Config(String),
    /// The disks.
    #[error(transparent)]
    Guest(#[from] ferry_core::guest::GuestError),
}

impl KvmError {
    /// As a guest error (for the destination seam).
    pub fn into_guest(self) -> ferry_core::guest::GuestError {
        match self {
            KvmError::Guest(g) => g,
            KvmError::Io { what, source } => ferry_core::guest::GuestError::Io { what, source },
            e => ferry_core::guest::GuestError::Unsupported(e.to_string()),
        }
    }
}

/// Whether `/dev/kvm` can be opened here, with the reason when not.
pub fn available() -> Result<(), KvmError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => Err(KvmError::Unavailable(format!(
            "/dev/kvm: {e} (load the kvm module, or run where hardware virtualization is exposed)"
        ))),
    }
}
