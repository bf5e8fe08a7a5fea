//! Multi-channel TCP. The connector opens N connections and starts each with a preamble
//! `"FERRYCH1" group:u64 index:u16 count:u16`; the listener groups connections by `group`
//! and hands over a complete, ordered set. Connections that do not speak the preamble are
//! dropped without reaching the engine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ferry_core::transport::{Channel, Listener, Transport, TransportError};

const PREAMBLE_MAGIC: &[u8; 8] = b"FERRYCH1";
const PREAMBLE_LEN: usize = 20;
/// Read timeout used as a poll interval, so readers can notice cancellation.
const POLL: Duration = Duration::from_millis(200);

/// TCP with 1..N connections.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    io_timeout: Duration,
}

impl TcpTransport {
    /// Writes that block longer than `io_timeout` fail (a stopped network).
    pub fn new(io_timeout: Duration) -> Self {
        Self { io_timeout }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TransportError {
    let what = what.into();
    move |source| TransportError::Io { what, source }
}

fn tune(stream: &TcpStream, io_timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Socket buffers are left to the kernel's autotuning: an explicit SO_SNDBUF/SO_RCVBUF
    // turns autotuning off and is capped by net.core.[rw]mem_max, which can be far below
    // a WAN's bandwidth-delay product; on loopback, oversized buffers push data out of
    // the cache before the receiver copies it.
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(())
}

fn channel(stream: TcpStream) -> Result<Channel, TransportError> {
    let tx = stream.try_clone().map_err(io("cloning a socket"))?;
    let closer = stream.try_clone().map_err(io("cloning a socket"))?;
    Ok(Channel {
        tx: Box::new(tx),
        rx: Box::new(stream),
        closer: Some(Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        })),
    })
}

impl Transport for TcpTransport {
    fn name(&self) -> String {
        "tcp".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        if channels == 0 || channels > usize::from(ferry_core::wire::MAX_CHANNELS) {
            return Err(TransportError::Config(format!(
                "channel count {channels} out of range 1..={}",
                ferry_core::wire::MAX_CHANNELS
            )));
        }
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(io(format!("resolving {addr}")))?
            .next()
            .ok_or_else(|| TransportError::Config(format!("{addr} resolves to nothing")))?;
        let mut group = [0u8; 8];
        ferry_core::engine::fill_random(&mut group);
        let mut out = Vec::with_capacity(channels);
        for i in 0..channels {
            let mut s = TcpStream::connect_timeout(&target, self.io_timeout)
                .map_err(io(format!("connecting to {addr}")))?;
            tune(&s, self.io_timeout).map_err(io("configuring a socket"))?;
            let mut pre = [0u8; PREAMBLE_LEN];
            pre[..8].copy_from_slice(PREAMBLE_MAGIC);
            pre[8..16].copy_from_slice(&group);
            pre[16..18].copy_from_slice(&(i as u16).to_le_bytes());
            pre[18..20].copy_from_slice(&(channels as u16).to_le_bytes());
            s.write_all(&pre)
                .map_err(io("sending the channel preamble"))?;
            out.push(channel(s)?);
        }
        Ok(out)
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let l = TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
        Ok(Box::new(TcpChannelListener {
            listener: l,
            io_timeout: self.io_timeout,
            partial: HashMap::new(),
        }))
    }
}

type Group = (u16, Vec<Option<TcpStream>>, Instant);

/// A listener that assembles channel groups.
pub struct TcpChannelListener {
    listener: TcpListener,
    io_timeout: Duration,
    partial: HashMap<[u8; 8], Group>,
}

fn read_preamble(s: &mut TcpStream) -> Result<([u8; 8], u16, u16), String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut pre = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut pre)
        .map_err(|e| format!("no channel preamble: {e}"))?;
    if &pre[..8] != PREAMBLE_MAGIC {
        return Err("peer does not speak the ferry channel preamble".into());
    }
    let mut group = [0u8; 8];
    group.copy_from_slice(&pre[8..16]);
    let index = u16::from_le_bytes([pre[16], pre[17]]);
    let count = u16::from_le_bytes([pre[18], pre[19]]);
    if count == 0 || count > ferry_core::wire::MAX_CHANNELS || index >= count {
        return Err(format!("bad channel preamble (index {index} of {count})"));
    }
    Ok((group, index, count))
}

impl Listener for TcpChannelListener {
    fn local_addr(&self) -> String {
        self.listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        loop {
            let (mut s, peer) = self.listener.accept().map_err(io("accepting"))?;
            let (group, index, count) = match read_preamble(&mut s) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%peer, "dropping connection: {e}");
                    continue;
                }
            };
            if let Err(e) = tune(&s, self.io_timeout) {
                tracing::warn!(%peer, "dropping connection: {e}");
                continue;
            }
            // Forget groups that never completed.
            self.partial
                .retain(|_, g| g.2.elapsed() < Duration::from_secs(30));
            let entry = self
                .partial
                .entry(group)
                .or_insert_with(|| (count, (0..count).map(|_| None).collect(), Instant::now()));
            if entry.0 != count || entry.1[index as usize].is_some() {
                tracing::warn!(%peer, "dropping connection: inconsistent channel group");
                continue;
            }
            entry.1[index as usize] = Some(s);
            if entry.1.iter().all(Option::is_some) {
                let Some((_, streams, _)) = self.partial.remove(&group) else {
                    continue;
                };
                return streams.into_iter().flatten().map(channel).collect();
            }
        }
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
