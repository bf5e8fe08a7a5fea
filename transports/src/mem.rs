//! In-process channels: bounded byte pipes with read timeouts, and fault injection to test
//! the safety rule (a peer that dies, a network that stops).

use std::collections::{HashMap, VecDeque};
use std::io::{Error, ErrorKind, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use ferry_core::transport::{Channel, Listener, Transport, TransportError};

/// Bytes a pipe buffers before the writer blocks (backpressure, like a socket buffer).
const PIPE_CAPACITY: usize = 4 << 20;
/// Read timeout used as a poll interval.
const POLL: Duration = Duration::from_millis(100);

/// A fault to inject on the source → destination direction of channel 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemFault {
    /// After this many bytes the pipe breaks (the peer died).
    BreakAfter(u64),
    /// After this many bytes the pipe silently stops moving data (the network stopped).
    StallAfter(u64),
}

#[derive(Default)]
struct PipeState {
    buf: VecDeque<u8>,
    written: u64,
    reader_gone: bool,
    writer_gone: bool,
    broken: bool,
    fault: Option<MemFault>,
}

#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    cond: Condvar,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_both(&self) {
        let mut s = self.lock();
        s.broken = true;
        self.cond.notify_all();
    }
}

struct PipeWriter(Arc<Pipe>);
struct PipeReader(Arc<Pipe>);

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut s = self.0.lock();
        loop {
            if s.broken || s.reader_gone {
                return Err(Error::new(ErrorKind::BrokenPipe, "pipe closed"));
            }
            let mut allowed = data.len();
            match s.fault {
                Some(MemFault::BreakAfter(n)) if s.written >= n => {
                    s.broken = true;
                    self.0.cond.notify_all();
                    return Err(Error::new(
                        ErrorKind::ConnectionReset,
                        "peer died (injected)",
                    ));
                }
                Some(MemFault::BreakAfter(n)) => allowed = allowed.min((n - s.written) as usize),
                Some(MemFault::StallAfter(n)) if s.written >= n => {
                    // Swallow nothing, deliver nothing: block like a dead network until
                    // the pipe is closed, then fail.
                    let (g, _) = self
                        .0
                        .cond
                        .wait_timeout(s, POLL)
                        .unwrap_or_else(|p| p.into_inner());
                    s = g;
                    continue;
                }
                Some(MemFault::StallAfter(n)) => allowed = allowed.min((n - s.written) as usize),
                None => {}
            }
            let room = PIPE_CAPACITY.saturating_sub(s.buf.len());
            if room == 0 {
                s = self.0.cond.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let n = allowed.min(room);
            s.buf.extend(&data[..n]);
            s.written += n as u64;
            self.0.cond.notify_all();
            return Ok(n);
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.writer_gone = true;
        self.0.cond.notify_all();
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock();
        loop {
            // Bytes written before the break still arrive, as on a TCP connection that
            // was shut down after a last write.
            if !s.buf.is_empty() {
                let n = out.len().min(s.buf.len());
                let (a, b) = s.buf.as_slices();
                let first = n.min(a.len());
                out[..first].copy_from_slice(&a[..first]);
                if n > first {
                    out[first..n].copy_from_slice(&b[..n - first]);
                }
                s.buf.drain(..n);
                self.0.cond.notify_all();
                return Ok(n);
            }
            if s.broken {
                return Err(Error::new(ErrorKind::ConnectionReset, "pipe broken"));
            }
            if s.writer_gone {
                return Ok(0);
            }
            let (g, t) = self
                .0
                .cond
                .wait_timeout(s, POLL)
                .unwrap_or_else(|p| p.into_inner());
            s = g;
            if t.timed_out() && s.buf.is_empty() && !s.writer_gone && !s.broken {
                return Err(Error::new(ErrorKind::TimedOut, "no data yet"));
            }
        }
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.reader_gone = true;
        self.0.cond.notify_all();
    }
}

/// `n` connected channel pairs: `(connector side, listener side)`. `fault` applies to the
/// connector → listener direction of channel 0.
pub fn pair(n: usize, fault: Option<MemFault>) -> (Vec<Channel>, Vec<Channel>) {
    let mut a = Vec::with_capacity(n);
    let mut b = Vec::with_capacity(n);
    for i in 0..n {
        let ab = Arc::new(Pipe::default());
        let ba = Arc::new(Pipe::default());
        if i == 0 {
            ab.lock().fault = fault;
        }
        let closer = |p: &Arc<Pipe>, q: &Arc<Pipe>| -> Box<dyn Fn() + Send + Sync> {
            let (p, q) = (Arc::clone(p), Arc::clone(q));
            Box::new(move || {
                p.close_both();
                q.close_both();
            })
        };
        a.push(Channel {
            tx: Box::new(PipeWriter(Arc::clone(&ab))),
            rx: Box::new(PipeReader(Arc::clone(&ba))),
            closer: Some(closer(&ab, &ba)),
        });
        b.push(Channel {
            tx: Box::new(PipeWriter(Arc::clone(&ba))),
            rx: Box::new(PipeReader(Arc::clone(&ab))),
            closer: Some(closer(&ab, &ba)),
        });
    }
    (a, b)
}

type Registry = Mutex<HashMap<String, Sender<Vec<Channel>>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

/// In-process transport: `listen("name")` registers a name, `connect("name", n)` reaches it.
#[derive(Debug, Clone, Default)]
pub struct MemTransport {
    fault: Option<MemFault>,
}

impl MemTransport {
    /// A faultless transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport whose connections suffer `fault`.
    pub fn with_fault(fault: MemFault) -> Self {
        Self { fault: Some(fault) }
    }
}

impl Transport for MemTransport {
    fn name(&self) -> String {
        "mem".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        let tx = reg.get(addr).ok_or_else(|| {
            TransportError::Config(format!("no in-memory listener named {addr:?}"))
        })?;
        let (mine, theirs) = pair(channels, self.fault);
        tx.send(theirs)
            .map_err(|_| TransportError::Config(format!("listener {addr:?} is gone")))?;
        Ok(mine)
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let (tx, rx) = unbounded();
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), tx);
        Ok(Box::new(MemListener {
            name: addr.to_string(),
            rx,
        }))
    }
}

struct MemListener {
    name: String,
    rx: Receiver<Vec<Channel>>,
}

impl Listener for MemListener {
    fn local_addr(&self) -> String {
        self.name.clone()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        self.rx
            .recv()
            .map_err(|_| TransportError::Config("in-memory listener closed".into()))
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_in_order_with_backpressure_and_eof() {
        let (mut a, mut b) = pair(1, None);
        let Channel { tx, .. } = a.remove(0);
        let mut tx = tx;
        let data: Vec<u8> = (0..(PIPE_CAPACITY * 2 + 17)).map(|i| i as u8).collect();
        let expect = data.clone();
        let w = std::thread::spawn(move || {
            tx.write_all(&data).unwrap();
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let rx = &mut b[0].rx;
        loop {
            match rx.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() == expect.len() {
                w.join().unwrap();
                break;
            }
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn injected_break_fails_the_writer_and_the_reader() {
        let (mut a, mut b) = pair(1, Some(MemFault::BreakAfter(10)));
        assert_eq!(a[0].tx.write(&[1; 8]).unwrap(), 8);
        assert_eq!(a[0].tx.write(&[1; 8]).unwrap(), 2);
        assert!(a[0].tx.write(&[1; 8]).is_err());
        // What got through before the break is delivered, then the reader fails.
        let mut buf = [0u8; 32];
        assert_eq!(b[0].rx.read(&mut buf).unwrap(), 10);
        assert!(b[0].rx.read(&mut buf).is_err());
    }

    #[test]
    fn closer_unblocks_a_stalled_writer() {
        let (mut a, _b) = pair(1, Some(MemFault::StallAfter(0)));
        let closer = a[0].closer.take().unwrap();
        let mut tx = a.remove(0).tx;
        let w = std::thread::spawn(move || tx.write_all(&[0; 10]));
        std::thread::sleep(Duration::from_millis(50));
        closer();
        assert!(w.join().unwrap().is_err());
    }
}
