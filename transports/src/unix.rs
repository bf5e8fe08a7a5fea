//! `unix`: N connections over a Unix socket, for moves between processes on one host. The
//! address is the socket's path; who may connect is decided by its file permissions.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use ferry_core::transport::{Channel, Listener, Transport, TransportError};

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
        Ok(Box::new(UnixChannelListener {
            listener: l,
            path,
            io_timeout: self.io_timeout,
            groups: Groups::default(),
        }))
    }
}

/// A listener that assembles channel groups; removes its socket file when dropped.
pub struct UnixChannelListener {
    listener: UnixListener,
    path: PathBuf,
    io_timeout: Duration,
    groups: Groups<UnixStream>,
}

impl Drop for UnixChannelListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener for UnixChannelListener {
    fn local_addr(&self) -> String {
        self.path.display().to_string()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        loop {
            let (mut s, _) = self.listener.accept().map_err(io("accepting"))?;
            let mut pre = [0u8; PREAMBLE_LEN];
            let parsed = s
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    s.read_exact(&mut pre)
                        .map_err(|e| format!("no channel preamble: {e}"))
                })
                .and_then(|_| group::parse(&pre));
            let pre = match parsed {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("dropping unix connection: {e}");
                    continue;
                }
            };
            match self.groups.add(pre, s) {
                Ok(Some(set)) => {
                    return set
                        .into_iter()
                        .map(|s| channel(s, self.io_timeout))
                        .collect()
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("dropping unix connection: {e}"),
            }
        }
    }
}
