//! The process-level fault switch: `FERRY_FAULT=SIDE:POINT:ACTION[,…]` makes the process
//! carrying that side of a migration die, close its link or stall its link at a chosen
//! step, so tests and operators can rehearse failures with real processes.
//!
//! - `SIDE`: `source` (the process hosting the guest) or `dest` (`ferry listen`).
//! - `POINT`: `handshake`, `storage`, `memory`, `pause`, `state`, `verified`, `commit`,
//!   `resumed`, `postcopy`, `verdict`: just before that step's message is sent (or, on the
//!   side that receives it, just after it arrived); for the data phases, after the
//!   phase's first round is queued, before its barrier.
//! - `ACTION`: `exit` (the process dies at once, as with SIGKILL), `close` (every channel
//!   is shut down), `stall` (the link stops carrying anything, both ways, while the
//!   process goes on and meets its own timeouts).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::Channel;

/// The environment variable.
pub const ENV: &str = "FERRY_FAULT";

/// Which side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The process hosting the guest being migrated.
    Source,
    /// The receiving process.
    Dest,
}

/// A step of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Hello / welcome.
    Handshake,
    /// Storage pre-copy.
    Storage,
    /// Memory pre-copy.
    Memory,
    /// The source pauses the guest (the destination: the final round arrives).
    Pause,
    /// The vCPU/device state.
    State,
    /// The destination's acknowledgement.
    Verified,
    /// The hand-over.
    Commit,
    /// The destination runs the guest.
    Resumed,
    /// Storage post-copy.
    Postcopy,
    /// The destination's self-check.
    Verdict,
}

/// What happens there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The process dies at once.
    Exit,
    /// The link is closed.
    Close,
    /// The link stops carrying anything.
    Stall,
}

/// One fault of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub side: Side,
    /// When.
    pub point: Point,
    /// What.
    pub action: Action,
}

/// A malformed `FERRY_FAULT`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{ENV}: {0:?} is not SIDE:POINT:ACTION (SIDE source|dest; POINT handshake|storage|memory|pause|state|verified|commit|resumed|postcopy|verdict; ACTION exit|close|stall)")]
pub struct FaultSpecError(pub String);

/// Parses a comma-separated fault list.
pub fn parse(spec: &str) -> Result<Vec<Fault>, FaultSpecError> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let bad = || FaultSpecError(item.to_string());
            let mut it = item.split(':');
            let (Some(side), Some(point), Some(action), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(bad());
            };
            let side = match side {
                "source" => Side::Source,
                "dest" => Side::Dest,
                _ => return Err(bad()),
            };
            let point = match point {
                "handshake" => Point::Handshake,
                "storage" => Point::Storage,
                "memory" => Point::Memory,
                "pause" => Point::Pause,
                "state" => Point::State,
                "verified" => Point::Verified,
                "commit" => Point::Commit,
                "resumed" => Point::Resumed,
                "postcopy" => Point::Postcopy,
                "verdict" => Point::Verdict,
                _ => return Err(bad()),
            };
            let action = match action {
                "exit" => Action::Exit,
                "close" => Action::Close,
                "stall" => Action::Stall,
                _ => return Err(bad()),
            };
            Ok(Fault {
                side,
                point,
                action,
            })
        })
        .collect()
}

/// The faults `FERRY_FAULT` asks for (none when unset).
pub fn from_env() -> Result<Vec<Fault>, FaultSpecError> {
    match std::env::var(ENV) {
        Ok(s) => parse(&s),
        Err(_) => Ok(Vec::new()),
    }
}

type Closer = Arc<dyn Fn() + Send + Sync>;

/// One migration's faults on one side, and the switches on its link.
pub struct Faults {
    side: Side,
    plan: Vec<Fault>,
    /// A stalled write fails after this long, as a socket's write timeout makes it.
    write_timeout: Duration,
    stalled: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    closers: Mutex<Vec<Closer>>,
}

impl Faults {
    /// This side's part of `FERRY_FAULT` (a malformed value is ignored with a warning;
    /// the command line refuses it before any migration starts).
    pub fn from_env(side: Side, write_timeout: Duration) -> Self {
        let plan = from_env().unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Vec::new()
        });
        Self::new(side, plan, write_timeout)
    }

    /// `plan`'s faults for `side`; a stalled write fails after `write_timeout`.
    pub fn new(side: Side, plan: Vec<Fault>, write_timeout: Duration) -> Self {
        Self {
            side,
            plan: plan.into_iter().filter(|f| f.side == side).collect(),
            write_timeout,
            stalled: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            closers: Mutex::new(Vec::new()),
        }
    }

    /// Puts a channel under the switches (a no-op without faults for this side).
    pub fn wrap(&self, ch: Channel) -> Channel {
        if self.plan.is_empty() {
            return ch;
        }
        let closer: Option<Closer> = ch.closer.map(Arc::from);
        if let Some(c) = &closer {
            self.closers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::clone(c));
        }
        let closed = Arc::clone(&self.closed);
        Channel {
            tx: Box::new(Switched {
                inner: ch.tx,
                stalled: Arc::clone(&self.stalled),
                closed: Arc::clone(&self.closed),
                timeout: self.write_timeout,
            }),
            rx: Box::new(Switched {
                inner: ch.rx,
                stalled: Arc::clone(&self.stalled),
                closed: Arc::clone(&self.closed),
                timeout: self.write_timeout,
            }),
            closer: Some(Box::new(move || {
                closed.store(true, Ordering::SeqCst);
                if let Some(c) = &closer {
                    c();
                }
            })),
        }
    }

    /// The migration reached `point`: carry out what the plan says for it.
    pub fn hit(&self, point: Point) {
        for f in self.plan.iter().filter(|f| f.point == point) {
            tracing::warn!("{ENV}: {:?} at {:?}: {:?}", self.side, point, f.action);
            match f.action {
                Action::Exit => {
                    // SAFETY: kill(2) of this very process with SIGKILL; no memory is
                    // passed. Nothing runs after it: no destructor, no flush, no
                    // message, exactly as when an operator or the OOM killer kills it.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
                Action::Close => {
                    self.closed.store(true, Ordering::SeqCst);
                    for c in self
                        .closers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                    {
                        c();
                    }
                }
                Action::Stall => self.stalled.store(true, Ordering::SeqCst),
            }
        }
    }
}

/// A channel half that a stall freezes and a close ends.
struct Switched<T> {
    inner: T,
    stalled: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    timeout: Duration,
}

impl<T> Switched<T> {
    /// While stalled and not closed: nothing moves.
    fn frozen(&self) -> bool {
        self.stalled.load(Ordering::Relaxed) && !self.closed.load(Ordering::Relaxed)
    }

    /// Blocks a write while the link is stalled, then fails as a socket's write timeout
    /// does; a closed link fails at once.
    fn wait_writable(&self) -> std::io::Result<()> {
        let deadline = std::time::Instant::now() + self.timeout;
        while self.frozen() {
            if std::time::Instant::now() >= deadline {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.stalled.load(Ordering::Relaxed) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }
}

impl<R: Read> Read for Switched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.frozen() {
            // As a socket with a read timeout and nothing arriving.
            std::thread::sleep(Duration::from_millis(20));
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.inner.read(buf)
    }
}

impl<W: Write> Write for Switched<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.wait_writable()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.wait_writable()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_names_what_is_wrong() {
        assert_eq!(
            parse("source:commit:exit, dest:verified:stall").unwrap(),
            vec![
                Fault {
                    side: Side::Source,
                    point: Point::Commit,
                    action: Action::Exit
                },
                Fault {
                    side: Side::Dest,
                    point: Point::Verified,
                    action: Action::Stall
                }
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        for bad in [
            "source:commit",
            "src:commit:exit",
            "dest:x:exit",
            "dest:commit:die",
            "a:b:c:d",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn a_stall_freezes_reads_and_a_close_ends_writes() {
        let f = Faults::new(
            Side::Dest,
            parse("dest:state:stall,dest:verdict:close").unwrap(),
            Duration::from_millis(50),
        );
        let ch = f.wrap(Channel {
            tx: Box::new(Vec::new()),
            rx: Box::new(std::io::Cursor::new(vec![1u8, 2, 3])),
            closer: None,
        });
        let (mut tx, mut rx) = (ch.tx, ch.rx);
        let mut b = [0u8; 3];
        f.hit(Point::State);
        let e = rx.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        let e = tx.write(b"x").unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "a stalled write times out"
        );
        f.hit(Point::Verdict);
        assert!(
            tx.write(b"x").is_err(),
            "a closed stalled link refuses writes"
        );
        assert_eq!(
            rx.read(&mut b).unwrap(),
            3,
            "closed: reads reach the socket"
        );
    }
}
