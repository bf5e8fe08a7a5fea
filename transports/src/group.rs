//! The channel preamble and the grouping of a connector's channels on the listener, shared
//! by the stream transports (`tcp`, `tls`, `unix`). Each channel starts with
//! `"FERRYCH1" group:u64 index:u16 count:u16`; the listener hands over a complete, ordered
//! set of one group. A group is random per connect, so channels of different migrations
//! never mix; with `tls` the preamble travels inside the authenticated stream.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferry_core::transport::{Channel, TransportError};

use crate::io_err;

/// Preamble magic.
pub const PREAMBLE_MAGIC: &[u8; 8] = b"FERRYCH1";
/// Preamble length.
pub const PREAMBLE_LEN: usize = 20;
/// Incomplete groups are forgotten after this long.
pub(crate) const GROUP_TTL: Duration = Duration::from_secs(30);

/// The preamble of channel `index` of `count` in `group`.
pub fn preamble(group: [u8; 8], index: usize, count: usize) -> [u8; PREAMBLE_LEN] {
    let mut pre = [0u8; PREAMBLE_LEN];
    pre[..8].copy_from_slice(PREAMBLE_MAGIC);
    pre[8..16].copy_from_slice(&group);
    pre[16..18].copy_from_slice(&(index as u16).to_le_bytes());
    pre[18..20].copy_from_slice(&(count as u16).to_le_bytes());
    pre
}

/// Checks a received preamble: (group, index, count).
pub fn parse(pre: &[u8; PREAMBLE_LEN]) -> Result<([u8; 8], u16, u16), String> {
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

/// Checks a requested channel count.
pub fn check_count(channels: usize) -> Result<(), ferry_core::transport::TransportError> {
    if channels == 0 || channels > usize::from(ferry_core::wire::MAX_CHANNELS) {
        return Err(ferry_core::transport::TransportError::Config(format!(
            "channel count {channels} out of range 1..={}",
            ferry_core::wire::MAX_CHANNELS
        )));
    }
    Ok(())
}

/// A fresh random group id.
pub fn new_group() -> [u8; 8] {
    let mut group = [0u8; 8];
    ferry_core::engine::fill_random(&mut group);
    group
}

/// At most this many incomplete groups wait at once (the oldest is forgotten first): over
/// `tcp` anyone may send a valid preamble.
const MAX_PARTIAL: usize = 64;

/// One incomplete group: its size, the channels so far, when it began.
struct Partial<S> {
    count: u16,
    streams: Vec<Option<S>>,
    since: Instant,
}

/// Channels waiting for the rest of their group.
pub struct Groups<S> {
    partial: HashMap<[u8; 8], Partial<S>>,
}

impl<S> Default for Groups<S> {
    fn default() -> Self {
        Self {
            partial: HashMap::new(),
        }
    }
}

impl<S> Groups<S> {
    /// Adds a channel; returns its whole group, in order, once complete.
    pub fn add(&mut self, pre: ([u8; 8], u16, u16), stream: S) -> Result<Option<Vec<S>>, String> {
        let (group, index, count) = pre;
        self.partial.retain(|_, g| g.since.elapsed() < GROUP_TTL);
        if !self.partial.contains_key(&group) && self.partial.len() >= MAX_PARTIAL {
            let oldest = self
                .partial
                .iter()
                .min_by_key(|(_, g)| g.since)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.partial.remove(&k);
            }
        }
        let entry = self.partial.entry(group).or_insert_with(|| Partial {
            count,
            streams: (0..count).map(|_| None).collect(),
            since: Instant::now(),
        });
        if entry.count != count || entry.streams[index as usize].is_some() {
            return Err("inconsistent channel group".into());
        }
        entry.streams[index as usize] = Some(stream);
        if !entry.streams.iter().all(Option::is_some) {
            return Ok(None);
        }
        Ok(self
            .partial
            .remove(&group)
            .map(|p| p.streams.into_iter().flatten().collect()))
    }
}

/// A connected stream socket: `tcp`, `unix`, and the socket under `tls`.
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    /// Another handle to the same socket.
    fn dup(&self) -> std::io::Result<Self>;
    /// Shuts both directions down, so a thread blocked on it returns.
    fn close(&self);
}

impl Socket for TcpStream {
    fn dup(&self) -> std::io::Result<Self> {
        self.try_clone()
    }

    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Socket for UnixStream {
    fn dup(&self) -> std::io::Result<Self> {
        self.try_clone()
    }

    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// A closer for a channel over `s` (it shuts the socket down).
pub fn closer<S: Socket>(s: &S) -> Result<Box<dyn Fn() + Send + Sync>, TransportError> {
    let handle = s.dup().map_err(io_err("cloning a socket"))?;
    Ok(Box::new(move || handle.close()))
}

/// A channel that reads and writes `s` directly (one handle each).
pub fn socket_channel<S: Socket>(s: S) -> Result<Channel, TransportError> {
    let tx = s.dup().map_err(io_err("cloning a socket"))?;
    Ok(Channel {
        closer: Some(closer(&s)?),
        tx: Box::new(tx),
        rx: Box::new(s),
    })
}
