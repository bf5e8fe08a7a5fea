//! Transports for Ferry: every one opens N ordered, reliable byte channels and hands them
//! to the engine, which frames and checks everything it sends.
//!
//! - [`mem`]: in-process pipes, with fault injection for the safety-rule tests.
//! - [`tcp`]: N TCP connections grouped by a preamble (QEMU's multifd idea).

pub mod mem;
pub mod tcp;

pub use mem::{MemFault, MemTransport};
pub use tcp::TcpTransport;

use ferry_core::transport::Transport;
use std::time::Duration;

/// Builds a transport by name (`tcp`, `mem`).
pub fn by_name(name: &str, io_timeout: Duration) -> Result<Box<dyn Transport>, String> {
    match name {
        "tcp" => Ok(Box::new(TcpTransport::new(io_timeout))),
        "mem" => Ok(Box::new(MemTransport::new())),
        other => Err(format!("unknown transport {other:?} (known: tcp, mem)")),
    }
}
