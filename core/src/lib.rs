//! Ferry's engine: whole-system live migration (memory, vCPU/device state and local
//! disks) in three phases over any transport and codec.
//!
//! - [`guest`]: the source and destination guest seams a backend implements.
//! - [`bitmap`]: dirty bitmaps (live, atomic) and their snapshots.
//! - [`wire`]: checked frames and the messages of the protocol.
//! - [`machine`]: the phase and session state machines, free of I/O.
//! - [`policy`]: the convergence policy, a pure function of measured figures.
//! - [`engine`]: the threaded drivers around the machines.
//! - [`fault`]: the process-level fault switch (`FERRY_FAULT`).
//! - [`codec`], [`transport`]: the seams codecs and transports plug into.

pub mod basecmp;
pub mod bitmap;
pub mod bytemap;
pub mod codec;
pub mod control;
pub mod digest;
pub mod engine;
pub mod envelope;
pub mod fault;
pub mod guest;
pub mod image;
pub mod machine;
pub mod pacer;
pub mod policy;
pub mod prefault;
pub mod report;
pub mod transport;
pub mod units;
pub mod wire;
pub mod zero;

pub use bitmap::{Bitmap, DirtyBitmap};
pub use guest::{
    DestGuest, DiskLayout, GuestError, GuestLayout, OracleReport, SourceGuest, StateBlob,
};
pub use report::{Progress, Report};
