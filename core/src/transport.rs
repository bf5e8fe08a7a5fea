//! The transport seam: N ordered, reliable byte channels between a connector (the source)
//! and a listener (the destination). Framing lives in [`crate::wire`], so every transport
//! carries the same checked frames and every decoder sees hostile bytes the same way.
//!
//! Reads may time out (`ErrorKind::TimedOut` or `WouldBlock`) so that readers can poll
//! for cancellation; the frame reader keeps partial frames across such timeouts.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One direction-pair of a channel.
pub struct Channel {
    /// Sending half.
    pub tx: Box<dyn Write + Send>,
    /// Receiving half.
    pub rx: Box<dyn Read + Send>,
    /// Forcibly closes both halves (e.g. `shutdown(2)` on a socket) so that a thread
    /// blocked on a dead peer returns at once.
    pub closer: Option<Box<dyn Fn() + Send + Sync>>,
}

/// A transport error.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Resolving, binding, connecting or accepting failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The peer spoke something other than the channel preamble.
    #[error("channel setup: {0}")]
    Setup(String),
    /// A bad address or option.
    #[error("{0}")]
    Config(String),
}

/// A way to open channels to a peer.
pub trait Transport: Send + Sync {
    /// Short name for reports ("tcp", "mem", ...).
    fn name(&self) -> String;
    /// Opens `channels` channels to `addr`.
    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError>;
    /// Starts listening on `addr`.
    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError>;
}

/// A bound listener.
pub trait Listener: Send {
    /// The address peers connect to (with the real port when bound to port 0).
    fn local_addr(&self) -> String;
    /// Waits for one connector and returns all of its channels, in channel order.
    fn accept(&mut self) -> Result<Vec<Channel>, TransportError>;
}

/// Counts bytes written through it (the report's `bytes_on_wire`).
pub struct CountingWriter<W> {
    inner: W,
    count: Arc<AtomicU64>,
}

impl<W> CountingWriter<W> {
    /// Wraps `inner`, adding to `count`.
    pub fn new(inner: W, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
