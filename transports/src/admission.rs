//! Admission of incoming connections, shared by every listener: strangers must not be able
//! to hold a listener.
//!
//! Every connection's handshake (the TLS handshake, the channel preamble) runs on its own,
//! concurrently with the others, under one overall deadline; a slow or silent peer only
//! ever holds its own slot. At most [`Limits::max_pending`] connections are unauthenticated
//! at once and at most [`Limits::per_peer`] of them come from one address (for `unix`, one
//! uid); past either bound the *oldest* is dropped, so a legitimate peer that arrives after
//! a flood of idle connections still gets through in the time its own handshake takes.
//! Errors of `accept()` itself (EMFILE, ECONNABORTED…) are logged and survived.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::transport::TransportError;

use crate::group::Socket;

/// How many unauthenticated connections, in all and per peer, may be pending, and for
/// how long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections whose handshake is still running, in all.
    pub max_pending: usize,
    /// Of those, from one peer address (or one uid for `unix`).
    pub per_peer: usize,
    /// A handshake (TLS, then the channel preamble) must be done within this.
    pub deadline: Duration,
    /// Admitted channels waiting for the engine to take them.
    pub max_admitted: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 64,
            per_peer: 16,
            deadline: Duration::from_secs(5),
            max_admitted: 64,
        }
    }
}

/// Who a pending connection comes from, for the per-peer bound.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// An IP address (the port does not count: one host, one budget).
    Ip(std::net::IpAddr),
    /// A local uid (`unix`).
    Uid(u32),
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

type Closer = Box<dyn Fn() + Send>;

struct Entry {
    id: u64,
    peer: PeerKey,
    since: Instant,
    close: Closer,
    /// Set when the table closes it (evicted or late), so its failure is not news.
    dropped: Arc<AtomicBool>,
}

impl Entry {
    fn drop_now(self) {
        self.dropped.store(true, Ordering::SeqCst);
        (self.close)();
    }
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: VecDeque<Entry>,
    dropped: u64,
}

/// The connections whose handshakes are running.
pub struct Pending {
    limits: Limits,
    table: Mutex<Table>,
    /// What the operator is told about refused connections, at a bounded rate.
    pub log: RateLimitedLog,
}

/// Lines for the operator at most [`RateLimitedLog::PER_SECOND`] a second, then a count
/// of what was left out: a flood of strangers must not flood the destination's log.
#[derive(Default)]
pub struct RateLimitedLog {
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl RateLimitedLog {
    /// Lines per second.
    pub const PER_SECOND: u32 = 5;

    /// Prints `line` (prefixed `ferry: `) unless too many were printed this second.
    pub fn note(&self, line: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, printed, left_out) = &mut *st;
        let now = Instant::now();
        if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            if *left_out > 0 {
                eprintln!("ferry: … and {left_out} more like these");
            }
            *start = Some(now);
            *printed = 0;
            *left_out = 0;
        }
        if *printed < Self::PER_SECOND {
            *printed += 1;
            eprintln!("ferry: {line}");
        } else {
            *left_out += 1;
        }
    }
}

/// A pending connection's place; dropping it (the handshake ended) frees the place.
pub struct Ticket {
    pending: Arc<Pending>,
    id: u64,
    dropped: Arc<AtomicBool>,
}

impl Ticket {
    /// Whether the table closed this connection (evicted or past the deadline).
    pub fn was_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.pending.lock();
        t.entries.retain(|e| e.id != self.id);
    }
}

impl Pending {
    /// An empty table with `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(Table::default()),
            log: RateLimitedLog::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new handshake from `peer`, which `close` aborts. Makes room first: the
    /// oldest handshake of the same peer past the per-peer bound, then the oldest of all
    /// past the total bound, is closed.
    pub fn register(self: &Arc<Self>, peer: PeerKey, close: Closer) -> Ticket {
        let dropped = Arc::new(AtomicBool::new(false));
        let mut evicted = Vec::new();
        let id = {
            let mut t = self.lock();
            let same = t.entries.iter().filter(|e| e.peer == peer).count();
            if same >= self.limits.per_peer.max(1) {
                if let Some(at) = t.entries.iter().position(|e| e.peer == peer) {
                    evicted.extend(t.entries.remove(at));
                }
            }
            while t.entries.len() >= self.max_pending() {
                evicted.extend(t.entries.pop_front());
            }
            t.dropped += evicted.len() as u64;
            let id = t.next_id;
            t.next_id += 1;
            t.entries.push_back(Entry {
                id,
                peer,
                since: Instant::now(),
                close,
                dropped: Arc::clone(&dropped),
            });
            id
        };
        if !evicted.is_empty() {
            self.log.note(&format!(
                "dropped the oldest pending connection of {} (too many unauthenticated connections)",
                evicted[0].peer
            ));
        }
        evicted.into_iter().for_each(Entry::drop_now);
        Ticket {
            pending: Arc::clone(self),
            id,
            dropped,
        }
    }

    /// The bound on pending handshakes in force: the configured one, but never more than
    /// a quarter of the descriptors the process may open (read each time: an operator may
    /// change the limit of a running listener), so strangers alone cannot exhaust them.
    fn max_pending(&self) -> usize {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `lim`, a live local.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let by_fds = if ok {
            usize::try_from(lim.rlim_cur / 4).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        self.limits.max_pending.min(by_fds).max(1)
    }

    /// Closes every handshake past the deadline.
    pub fn expire(&self) {
        let late: Vec<Entry> = {
            let mut t = self.lock();
            let (late, keep): (VecDeque<Entry>, VecDeque<Entry>) = std::mem::take(&mut t.entries)
                .into_iter()
                .partition(|e| e.since.elapsed() >= self.limits.deadline);
            t.entries = keep;
            t.dropped += late.len() as u64;
            late.into()
        };
        if let Some(e) = late.first() {
            self.log.note(&format!(
                "dropped a connection of {} whose handshake took longer than {:?}",
                e.peer, self.limits.deadline
            ));
        }
        late.into_iter().for_each(Entry::drop_now);
    }

    /// Closes the oldest quarter of the running handshakes (at least one): the process
    /// ran out of descriptors, and strangers must not keep a legitimate peer from getting
    /// one.
    pub fn shed(&self) {
        let shed: Vec<Entry> = {
            let mut t = self.lock();
            let n = t.entries.len().div_ceil(4);
            let shed: Vec<Entry> = t.entries.drain(..n).collect();
            t.dropped += shed.len() as u64;
            shed
        };
        if !shed.is_empty() {
            self.log
                .note("dropped pending connections: out of file descriptors");
        }
        shed.into_iter().for_each(Entry::drop_now);
    }

    /// Handshakes running now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no handshake runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections dropped so far (evicted or late).
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// A listening socket the acceptor polls.
pub trait AcceptSocket: AsRawFd + Send + 'static {
    /// The connected stream.
    type Stream: Socket;
    /// Accepts one connection (the socket is non-blocking: `WouldBlock` when none waits).
    fn accept_one(&self) -> io::Result<(Self::Stream, PeerKey, String)>;
}

impl AcceptSocket for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn accept_one(&self) -> io::Result<(Self::Stream, PeerKey, String)> {
        let (s, a) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok((s, PeerKey::Ip(a.ip()), a.to_string()))
    }
}

impl AcceptSocket for std::os::unix::net::UnixListener {
    type Stream = UnixStream;
    fn accept_one(&self) -> io::Result<(Self::Stream, PeerKey, String)> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        let uid = peer_uid(s.as_raw_fd()).unwrap_or(u32::MAX);
        Ok((s, PeerKey::Uid(uid), format!("uid {uid}")))
    }
}

/// The uid of the process at the other end of a Unix socket.
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a live ucred.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// What a handshake yields: the channel's preamble (group, index, count) and the stream
/// ready for data.
pub type Handshaken<T> = (([u8; 8], u16, u16), T);

/// One admitted channel and when it was admitted.
pub struct Admitted<T> {
    /// Preamble and stream.
    pub channel: Handshaken<T>,
    /// When its handshake finished.
    pub at: Instant,
}

/// The handshake of one connection, run on its own thread; it must give up by `deadline`.
pub type Handshake<S, T> = dyn Fn(S, Instant) -> Result<Handshaken<T>, String> + Send + Sync;

/// The accepting thread of a stream listener; dropping it stops the thread and closes the
/// listening socket before returning.
pub struct Acceptor<T> {
    /// Admitted channels, in the order their handshakes finished.
    pub admitted: Receiver<Admitted<T>>,
    wake: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T> Drop for Acceptor<T> {
    fn drop(&mut self) {
        let _ = self.wake.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the acceptor sleeps after `accept()` fails for want of descriptors, so it
/// does not spin while they are short.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The acceptor wakes at least this often to expire late handshakes.
const SWEEP: Duration = Duration::from_millis(100);

/// Starts accepting on `listener`: every connection runs `handshake` on a thread of its
/// own, under `limits`.
pub fn spawn<L, T>(
    listener: L,
    limits: Limits,
    handshake: Arc<Handshake<L::Stream, T>>,
) -> Result<Acceptor<T>, TransportError>
where
    L: AcceptSocket,
    T: Send + 'static,
{
    set_nonblocking(listener.as_raw_fd()).map_err(crate::io_err("configuring the listener"))?;
    let (wake, wake_rx) = UnixStream::pair().map_err(crate::io_err("creating a wake-up pipe"))?;
    let (tx, rx) = std::sync::mpsc::sync_channel(limits.max_admitted.max(1));
    let pending = Pending::new(limits);
    let thread = std::thread::Builder::new()
        .name("ferry-accept".into())
        .spawn(move || accept_loop(listener, wake_rx, &pending, &handshake, &tx))
        .map_err(crate::io_err("starting the accepting thread"))?;
    Ok(Acceptor {
        admitted: rx,
        wake,
        thread: Some(thread),
    })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            -1
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `listen` is readable, `wake` is closed, or `timeout` passes: (listen
/// readable, woken).
fn wait(listen: RawFd, wake: RawFd, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: listen,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll reads and writes the two live pollfd entries.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

fn accept_loop<L, T>(
    listener: L,
    wake: UnixStream,
    pending: &Arc<Pending>,
    handshake: &Arc<Handshake<L::Stream, T>>,
    tx: &SyncSender<Admitted<T>>,
) where
    L: AcceptSocket,
    T: Send + 'static,
{
    loop {
        let (ready, woken) = wait(listener.as_raw_fd(), wake.as_raw_fd(), SWEEP);
        if woken {
            return;
        }
        pending.expire();
        if !ready {
            continue;
        }
        // Take everything that waits, then poll again.
        loop {
            match listener.accept_one() {
                Ok((s, peer, shown)) => start(s, peer, &shown, pending, handshake, tx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    pending.log.note(&format!(
                        "accepting a connection failed (the listener goes on): {e}"
                    ));
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        pending.shed();
                        std::thread::sleep(ACCEPT_BACKOFF);
                    }
                    break;
                }
            }
        }
    }
}

/// Registers one connection and runs its handshake on a thread of its own.
fn start<S: Socket, T: Send + 'static>(
    s: S,
    peer: PeerKey,
    shown: &str,
    pending: &Arc<Pending>,
    handshake: &Arc<Handshake<S, T>>,
    tx: &SyncSender<Admitted<T>>,
) {
    let Ok(closer) = s.dup() else {
        return;
    };
    let deadline = Instant::now() + pending.limits.deadline;
    let ticket = pending.register(peer, Box::new(move || closer.close()));
    let (handshake, tx, table) = (Arc::clone(handshake), tx.clone(), Arc::clone(pending));
    let shown = shown.to_string();
    let spawned = std::thread::Builder::new()
        .name("ferry-handshake".into())
        .spawn(move || {
            let result = handshake(s, deadline);
            let dropped = ticket.was_dropped();
            drop(ticket);
            match result {
                Ok(channel) => match tx.try_send(Admitted {
                    channel,
                    at: Instant::now(),
                }) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    Err(TrySendError::Full(_)) => table.log.note(&format!(
                        "refused a channel from {shown}: too many wait for the engine"
                    )),
                },
                // The table closed it and said so already.
                Err(_) if dropped => {}
                Err(e) => table
                    .log
                    .note(&format!("refused a connection from {shown}: {e}")),
            }
        });
    if let Err(e) = spawned {
        pending
            .log
            .note(&format!("cannot start a handshake thread: {e}"));
    }
}

/// Reads exactly `buf.len()` bytes by `deadline`, however slowly the peer trickles them.
pub fn read_by(s: &mut impl io::Read, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    let mut at = 0;
    while at < buf.len() {
        if Instant::now() >= deadline {
            return Err("handshake deadline passed".into());
        }
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err("closed during the handshake".into()),
            Ok(n) => at += n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The time left until `deadline`, at least a millisecond (a zero socket timeout means
/// "none").
pub fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Takes admitted channels until one group is complete; channels that waited longer than
/// the group's time to live are dropped (their connector has given up).
pub fn next_group<T>(
    admitted: &Receiver<Admitted<T>>,
    groups: &mut crate::group::Groups<T>,
) -> Result<Vec<T>, TransportError> {
    loop {
        let a = admitted
            .recv()
            .map_err(|_| TransportError::Setup("the listener stopped accepting".into()))?;
        if a.at.elapsed() > crate::group::GROUP_TTL {
            continue;
        }
        let (pre, stream) = a.channel;
        match groups.add(pre, stream) {
            Ok(Some(set)) => return Ok(set),
            Ok(None) => {}
            Err(e) => tracing::warn!("dropping a channel: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(n: &Arc<AtomicUsize>) -> Closer {
        let n = Arc::clone(n);
        Box::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn the_oldest_is_dropped_past_each_bound() {
        let p = Pending::new(Limits {
            max_pending: 4,
            per_peer: 2,
            ..Limits::default()
        });
        let a = PeerKey::Uid(1);
        let closed_a = Arc::new(AtomicUsize::new(0));
        let t1 = p.register(a.clone(), counting(&closed_a));
        let _t2 = p.register(a.clone(), counting(&closed_a));
        // A third from the same peer closes the first.
        let _t3 = p.register(a.clone(), counting(&closed_a));
        assert_eq!(closed_a.load(Ordering::SeqCst), 1);
        assert_eq!(p.len(), 2);
        drop(t1); // its entry is gone already; dropping the ticket is harmless
        assert_eq!(p.len(), 2);
        let closed_b = Arc::new(AtomicUsize::new(0));
        let _b: Vec<Ticket> = (0..3)
            .map(|i| p.register(PeerKey::Uid(10 + i), counting(&closed_b)))
            .collect();
        // Four in all: the oldest (peer a) went first.
        assert_eq!(p.len(), 4);
        assert_eq!(closed_a.load(Ordering::SeqCst), 2);
        assert_eq!(p.dropped(), 2);
    }

    #[test]
    fn late_handshakes_are_closed() {
        let p = Pending::new(Limits {
            deadline: Duration::from_millis(10),
            ..Limits::default()
        });
        let closed = Arc::new(AtomicUsize::new(0));
        let _t = p.register(PeerKey::Uid(1), counting(&closed));
        p.expire();
        assert_eq!(closed.load(Ordering::SeqCst), 0);
        std::thread::sleep(Duration::from_millis(20));
        p.expire();
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert!(p.is_empty());
    }
}
