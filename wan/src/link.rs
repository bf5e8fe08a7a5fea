//! One direction of the emulated link: a reader thread that takes packets from one TUN,
//! drops the unlucky ones, puts the rest through a rate-limited queue (a virtual departure
//! clock: a packet leaves when the link has finished sending the ones before it, and is
//! dropped when the queue ahead of it exceeds its limit), and stamps the time it is due on
//! the far side; and a writer thread that writes each packet into the other TUN when due,
//! in order. The writer sleeps until the next packet is due rather than waking on every
//! arrival.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::profile::Direction;
use crate::tun::readable;

/// What one direction did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the sending side.
    pub packets_in: AtomicU64,
    /// Their bytes.
    pub bytes_in: AtomicU64,
    /// Packets delivered.
    pub packets_out: AtomicU64,
    /// Their bytes.
    pub bytes_out: AtomicU64,
    /// Packets lost at random (`loss`).
    pub lost: AtomicU64,
    /// Packets dropped because the queue was full.
    pub dropped_queue: AtomicU64,
    /// Sum of the time delivered packets spent in the emulator, nanoseconds.
    pub delay_ns: AtomicU64,
    /// The longest such time, nanoseconds.
    pub max_delay_ns: AtomicU64,
}

struct Queue {
    packets: Mutex<VecDeque<(Instant, Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// A small PRNG for loss and jitter (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Starts both threads of one direction.
pub fn spawn(
    mut from: File,
    mut to: File,
    d: Direction,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let queue = Arc::new(Queue {
        packets: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
    });
    let (q, c, s) = (Arc::clone(&queue), Arc::clone(&counters), Arc::clone(&stop));
    let reader = std::thread::Builder::new()
        .name("wan-reader".into())
        .spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut buf = vec![0u8; 65536];
            let mut next_free = Instant::now();
            let mut last_due = Instant::now();
            let limit = d.queue_limit();
            while !s.load(Ordering::Relaxed) {
                if !readable(&from, 100) {
                    continue;
                }
                let n = match from.read(&mut buf) {
                    Ok(n) if n > 0 => n,
                    _ => continue,
                };
                c.packets_in.fetch_add(1, Ordering::Relaxed);
                c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if d.loss > 0.0 && rng.next_f64() < d.loss {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = Instant::now();
                let arrived = match d.rate_bps {
                    Some(rate) => {
                        let start = next_free.max(now);
                        let backlog = (start - now).as_secs_f64() * rate as f64 / 8.0;
                        if backlog as usize + n > limit {
                            c.dropped_queue.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        next_free = start + Duration::from_secs_f64(n as f64 * 8.0 / rate as f64);
                        next_free
                    }
                    None => now,
                };
                let mut due = arrived + d.delay;
                if !d.jitter.is_zero() {
                    let j = d.jitter.as_secs_f64() * (2.0 * rng.next_f64() - 1.0);
                    due = if j >= 0.0 {
                        due + Duration::from_secs_f64(j)
                    } else {
                        due.checked_sub(Duration::from_secs_f64(-j)).unwrap_or(due)
                    };
                }
                // Packets keep their order.
                due = due.max(last_due);
                last_due = due;
                let mut p = q.packets.lock().unwrap_or_else(|e| e.into_inner());
                let was_empty = p.is_empty();
                p.push_back((now, due, buf[..n].to_vec()));
                drop(p);
                if was_empty {
                    q.ready.notify_one();
                }
            }
            q.ready.notify_all();
        })?;
    let writer = std::thread::Builder::new()
        .name("wan-writer".into())
        .spawn(move || {
            // Sleep to the nanosecond, not the default 50 µs slack.
            // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
            loop {
                let next = {
                    let mut p = queue.packets.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if let Some(front) = p.pop_front() {
                            break Some(front);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break None;
                        }
                        p = queue
                            .ready
                            .wait_timeout(p, Duration::from_millis(100))
                            .map(|r| r.0)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                };
                let Some((read_at, due, packet)) = next else {
                    return;
                };
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&packet).is_ok() {
                    let spent = u64::try_from(read_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    counters.packets_out.fetch_add(1, Ordering::Relaxed);
                    counters
                        .bytes_out
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                    counters.delay_ns.fetch_add(spent, Ordering::Relaxed);
                    counters.max_delay_ns.fetch_max(spent, Ordering::Relaxed);
                }
            }
        })?;
    Ok(vec![reader, writer])
}
