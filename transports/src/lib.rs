//! Transports for Ferry: every one opens N ordered, reliable byte channels and hands them
//! to the engine, which frames and checks everything it sends.
//!
//! - [`mem`]: in-process pipes, with fault injection for the safety-rule tests.
//! - [`tcp`]: N TCP connections grouped by a preamble (QEMU's multifd idea); neither
//!   encrypted nor authenticated, so it must be asked for with `--insecure`.
//! - [`tls`]: the same inside TLS 1.3, both peers pinned by certificate fingerprint.
//! - [`quic`]: QUIC (quinn), N streams on one connection or N connections, same pinning.
//! - [`unix`]: a Unix socket, for moves on one host.

pub mod admission;
pub mod auth;
mod group;
pub mod mem;
pub mod quic;
pub mod tcp;
pub mod tls;
pub mod unix;

pub use auth::{Fingerprint, Identity};
pub use mem::{MemFault, MemTransport};
pub use quic::{Congestion, QuicLayout, QuicOptions, QuicTransport};
pub use tcp::TcpTransport;
pub use tls::TlsTransport;
pub use unix::UnixTransport;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::transport::Transport;

/// Transport names `by_name` knows.
pub const TRANSPORT_NAMES: &[&str] = &["tls", "quic", "tcp", "unix", "mem"];

/// What a transport is built with.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    /// Writes blocked longer than this fail.
    pub io_timeout: Duration,
    /// Our certificate and the peers we accept (`tls`).
    pub identity: Option<Arc<Identity>>,
    /// The operator accepts an unauthenticated, unencrypted transport (`tcp`).
    pub insecure: bool,
    /// `quic` settings; its congestion controller applies to `tcp` and `tls` too.
    pub quic: QuicOptions,
}

/// Builds a transport by name.
pub fn by_name(name: &str, opts: &TransportOptions) -> Result<Box<dyn Transport>, String> {
    check(name, opts)?;
    match name {
        "tcp" if !opts.insecure => Err(
            "tcp is neither encrypted nor authenticated: pass --insecure, or use --transport tls \
             with --auth FILE (or --cert, --key and --peer; `ferry keygen` makes them)"
                .into(),
        ),
        "tcp" => Ok(Box::new(
            TcpTransport::new(opts.io_timeout).with_congestion(opts.quic.congestion),
        )),
        "tls" => match &opts.identity {
            Some(id) => Ok(Box::new(
                TlsTransport::new(opts.io_timeout, Arc::clone(id))
                    .with_congestion(opts.quic.congestion),
            )),
            None => Err(
                "tls needs an identity: --auth FILE, or --cert, --key and --peer \
                         (`ferry keygen` makes them)"
                    .into(),
            ),
        },
        "quic" => match &opts.identity {
            Some(id) => QuicTransport::new(opts.io_timeout, Arc::clone(id), opts.quic.clone())
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .map_err(|e| error_chain(&e)),
            None => Err(
                "quic needs an identity: --auth FILE, or --cert, --key and --peer \
                         (`ferry keygen` makes them)"
                    .into(),
            ),
        },
        "unix" => Ok(Box::new(UnixTransport::new(opts.io_timeout))),
        "mem" => Ok(Box::new(MemTransport::new())),
        other => Err(format!(
            "unknown transport {other:?} (known: {})",
            TRANSPORT_NAMES.join(", ")
        )),
    }
}

/// Whether `by_name` would build this transport, without building it (QUIC starts a
/// runtime): for validating a command line before anything runs.
pub fn check(name: &str, opts: &TransportOptions) -> Result<(), String> {
    match name {
        "tcp" if !opts.insecure => Err(
            "tcp is neither encrypted nor authenticated: pass --insecure, or use --transport tls \
             with --auth FILE (or --cert, --key and --peer; `ferry keygen` makes them)"
                .into(),
        ),
        "tls" | "quic" if opts.identity.is_none() => Err(format!(
            "{name} needs an identity: --auth FILE, or --cert, --key and --peer \
             (`ferry keygen` makes them)"
        )),
        "tcp" | "tls" | "quic" | "unix" | "mem" => Ok(()),
        other => Err(format!(
            "unknown transport {other:?} (known: {})",
            TRANSPORT_NAMES.join(", ")
        )),
    }
}

pub use ferry_core::engine::error_chain;

/// Maps an I/O error to a transport error saying what was being done.
pub(crate) fn io_err(
    what: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> ferry_core::transport::TransportError {
    let what = what.into();
    move |source| ferry_core::transport::TransportError::Io { what, source }
}

/// Resolves `addr` to its first socket address.
pub(crate) fn resolve(
    addr: &str,
) -> Result<std::net::SocketAddr, ferry_core::transport::TransportError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(io_err(format!("resolving {addr}")))?
        .next()
        .ok_or_else(|| {
            ferry_core::transport::TransportError::Config(format!("{addr} resolves to nothing"))
        })
}
