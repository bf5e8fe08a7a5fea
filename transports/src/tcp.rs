//! Multi-channel TCP. The connector opens N connections and starts each with a preamble
//! `"FERRYCH1" group:u64 index:u16 count:u16`; the listener groups connections by `group`
//! and hands over a complete, ordered set. Connections that do not speak the preamble are
//! dropped without reaching the engine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::transport::{Channel, Listener, Transport, TransportError};

use crate::admission::{self, Acceptor, Handshaken, Limits};
use crate::group::{self, Groups, PREAMBLE_LEN};
use crate::io_err as io;
use crate::quic::Congestion;

/// Read timeout used as a poll interval, so readers can notice cancellation.
const POLL: Duration = Duration::from_millis(200);

/// TCP with 1..N connections.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    io_timeout: Duration,
    congestion: Option<Congestion>,
}

impl TcpTransport {
    /// Writes that block longer than `io_timeout` fail (a stopped network).
    pub fn new(io_timeout: Duration) -> Self {
        Self {
            io_timeout,
            congestion: None,
        }
    }

    /// Uses congestion controller `cc` for the connections it opens.
    pub fn with_congestion(mut self, cc: Congestion) -> Self {
        self.congestion = Some(cc);
        self
    }
}

/// Sets up a data connection: no Nagle, reads that time out as a poll interval, writes
/// that fail when blocked past `io_timeout`.
pub(crate) fn tune(stream: &TcpStream, io_timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Socket buffers are left to the kernel's autotuning: an explicit SO_SNDBUF/SO_RCVBUF
    // turns autotuning off and is capped by net.core.[rw]mem_max, which can be far below
    // a WAN's bandwidth-delay product; on loopback, oversized buffers push data out of
    // the cache before the receiver copies it.
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(())
}

/// Chooses the socket's congestion controller (the kernel's default otherwise, which on
/// some machines is bbr: benchmarks comparing transports must say which they ran).
pub(crate) fn set_congestion(stream: &TcpStream, cc: Option<Congestion>) -> std::io::Result<()> {
    let Some(cc) = cc else { return Ok(()) };
    let name: &[u8] = match cc {
        Congestion::Cubic => b"cubic",
        Congestion::NewReno => b"reno",
        Congestion::Bbr => b"bbr",
    };
    // SAFETY: TCP_CONGESTION reads `name.len()` bytes from a live buffer.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("congestion control {}: {e}", String::from_utf8_lossy(name)),
        ));
    }
    Ok(())
}

fn channel(stream: TcpStream) -> Result<Channel, TransportError> {
    group::socket_channel(stream)
}

impl Transport for TcpTransport {
    fn name(&self) -> String {
        "tcp".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        group::check_count(channels)?;
        let target = crate::resolve(addr)?;
        let g = group::new_group();
        let mut out = Vec::with_capacity(channels);
        for i in 0..channels {
            let mut s = TcpStream::connect_timeout(&target, self.io_timeout)
                .map_err(io(format!("connecting to {addr}")))?;
            tune(&s, self.io_timeout).map_err(io("configuring a socket"))?;
            set_congestion(&s, self.congestion).map_err(io("configuring a socket"))?;
            s.write_all(&group::preamble(g, i, channels))
                .map_err(io("sending the channel preamble"))?;
            admitted(&mut s, self.io_timeout)?;
            out.push(channel(s)?);
        }
        Ok(out)
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let l = TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let io_timeout = self.io_timeout;
        let acceptor = admission::spawn(
            l,
            Limits::default(),
            Arc::new(move |s, deadline| admit(s, deadline, io_timeout)),
        )?;
        Ok(Box::new(TcpChannelListener {
            local,
            acceptor,
            groups: Groups::default(),
        }))
    }
}

/// What the listener answers once a channel's preamble is accepted.
const ADMITTED: u8 = b'K';

/// Waits (at most `timeout`) for the listener's answer, explaining a refusal.
fn admitted(s: &mut TcpStream, timeout: Duration) -> Result<(), TransportError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut b = [0u8; 1];
    let refused =
        |why: &str| TransportError::Setup(format!("the destination refused the channel: {why}"));
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == ADMITTED => return Ok(()),
            // A TLS alert record.
            Ok(1) if b[0] == 0x15 => {
                return Err(refused(
                    "it speaks TLS (use --transport tls with --cert, --key, --peer)",
                ))
            }
            Ok(_) => {
                return Err(refused(
                    "it closed the connection (does it expect another transport?)",
                ))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                // The poll interval; the listener answers at once unless it is stuck.
                if std::time::Instant::now() >= deadline {
                    return Err(refused("no answer to the channel preamble"));
                }
            }
            Err(e) => {
                return Err(refused(&format!(
                    "{e} (does it expect another transport, e.g. --transport tls?)"
                )))
            }
        }
    }
}

/// A listener that assembles channel groups.
pub struct TcpChannelListener {
    local: String,
    acceptor: Acceptor<TcpStream>,
    groups: Groups<TcpStream>,
}

/// A connection's handshake on the listener: its preamble by `deadline`, then the answer.
fn admit(
    mut s: TcpStream,
    deadline: Instant,
    io_timeout: Duration,
) -> Result<Handshaken<TcpStream>, String> {
    s.set_read_timeout(Some(admission::left(deadline)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(admission::left(deadline)))
        .map_err(|e| e.to_string())?;
    let mut pre = [0u8; PREAMBLE_LEN];
    admission::read_by(&mut s, &mut pre, deadline)
        .map_err(|e| format!("no channel preamble: {e}"))?;
    if pre[0] == 0x16 {
        return Err("the peer speaks TLS: use --transport tls on both sides".into());
    }
    let pre = group::parse(&pre)?;
    s.write_all(&[ADMITTED]).map_err(|e| e.to_string())?;
    tune(&s, io_timeout).map_err(|e| e.to_string())?;
    Ok((pre, s))
}

impl Listener for TcpChannelListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        admission::next_group(&self.acceptor.admitted, &mut self.groups)?
            .into_iter()
            .map(channel)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_arrive_in_order_and_strangers_are_dropped() {
        let t = TcpTransport::new(Duration::from_secs(5));
        let mut l = t.listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        let stranger = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\nxx");
            })
        };
        stranger.join().unwrap();
        let c = std::thread::spawn(move || {
            let mut chans = t.connect(&addr, 3).unwrap();
            for (i, ch) in chans.iter_mut().enumerate() {
                ch.tx.write_all(&[i as u8]).unwrap();
            }
            chans
        });
        let mut got = l.accept().unwrap();
        assert_eq!(got.len(), 3);
        for (i, ch) in got.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            ch.rx.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        drop(c.join().unwrap());
    }
}
