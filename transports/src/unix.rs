//! `unix`: N connections over a Unix socket, for moves between processes on one host. The
//! address is the socket's path; who may connect is decided by its file permissions.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::transport::{Channel, Listener, Transport, TransportError};

use crate::admission::{self, Acceptor, Handshaken, Limits};
use crate::group::{self, Groups, PREAMBLE_LEN};
use crate::io_err as io;

/// Read timeout used as a poll interval, so readers can notice cancellation.
const POLL: Duration = Duration::from_millis(200);

/// Unix-socket channels.
#[derive(Debug, Clone)]
pub struct UnixTransport {
    io_timeout: Duration,
}

impl UnixTransport {
    /// Writes that block longer than `io_timeout` fail.
    pub fn new(io_timeout: Duration) -> Self {
        Self { io_timeout }
    }
}

fn channel(s: UnixStream, io_timeout: Duration) -> Result<Channel, TransportError> {
    s.set_read_timeout(Some(POLL))
        .map_err(io("configuring a socket"))?;
    s.set_write_timeout(Some(io_timeout))
        .map_err(io("configuring a socket"))?;
    group::socket_channel(s)
}

impl Transport for UnixTransport {
    fn name(&self) -> String {
        "unix".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        group::check_count(channels)?;
        let g = group::new_group();
        (0..channels)
            .map(|i| {
                let mut s =
                    UnixStream::connect(addr).map_err(io(format!("connecting to {addr}")))?;
                s.set_write_timeout(Some(self.io_timeout))
                    .map_err(io("configuring a socket"))?;
                s.write_all(&group::preamble(g, i, channels))
                    .map_err(io("sending the channel preamble"))?;
                channel(s, self.io_timeout)
            })
            .collect()
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let path = PathBuf::from(addr);
        // A stale socket left by a dead listener is replaced; any other file is not.
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.file_type().is_socket() && UnixStream::connect(&path).is_err() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let l = UnixListener::bind(&path).map_err(io(format!("binding {addr}")))?;
        let acceptor = admission::spawn(l, Limits::default(), Arc::new(admit))?;
        Ok(Box::new(UnixChannelListener {
            acceptor: Some(acceptor),
            path,
            io_timeout: self.io_timeout,
            groups: Groups::default(),
        }))
    }
}

/// A connection's handshake on the listener: its preamble by `deadline`.
fn admit(mut s: UnixStream, deadline: Instant) -> Result<Handshaken<UnixStream>, String> {
    s.set_read_timeout(Some(admission::left(deadline)))
        .map_err(|e| e.to_string())?;
    let mut pre = [0u8; PREAMBLE_LEN];
    admission::read_by(&mut s, &mut pre, deadline)
        .map_err(|e| format!("no channel preamble: {e}"))?;
    Ok((group::parse(&pre)?, s))
}

/// A listener that assembles channel groups; removes its socket file when dropped.
pub struct UnixChannelListener {
    /// `Some` until dropped: the accepting thread is stopped before the file goes.
    acceptor: Option<Acceptor<UnixStream>>,
    path: PathBuf,
    io_timeout: Duration,
    groups: Groups<UnixStream>,
}

impl Drop for UnixChannelListener {
    fn drop(&mut self) {
        drop(self.acceptor.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener for UnixChannelListener {
    fn local_addr(&self) -> String {
        self.path.display().to_string()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        let Some(acceptor) = &self.acceptor else {
            return Err(TransportError::Setup("the listener is closed".into()));
        };
        admission::next_group(&acceptor.admitted, &mut self.groups)?
            .into_iter()
            .map(|s| channel(s, self.io_timeout))
            .collect()
    }
}
