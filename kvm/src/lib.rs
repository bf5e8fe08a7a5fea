//! Ferry's KVM backend (work in progress): a VMM that enters 64-bit long mode directly at
//! CPL 3 (ring-0 code is emulated on this machine's nested KVM; ring-3 code runs natively)
//! and runs the bundled workload.

pub mod vm;

/// The guest workload, assembled from `guest/workload.S` by `build.rs`.
pub const WORKLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));
