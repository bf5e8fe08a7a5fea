//! Ferry's WAN emulator. The kernel here has no `netem`, so this ships one: two network
//! namespaces, each with a TUN device, joined by a user-space link that applies bandwidth,
//! one-way delay, jitter and random loss in each direction to real packets — so TCP's and
//! QUIC's own congestion control react as they would on a real link.
//!
//! Namespace A holds 10.77.0.1, namespace B 10.77.0.2. Needs root and iproute2.

pub mod link;
pub mod measure;
pub mod ns;
pub mod profile;
pub mod tun;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use link::Counters;
pub use ns::Namespace;
pub use profile::{Direction, Profile};

/// Address of namespace A's side.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Address of namespace B's side.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const DEV: &str = "fwan0";

/// Setting up or running the emulator failed.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// Namespaces, devices or addresses could not be set up.
    #[error("{0}")]
    Setup(String),
    /// A measurement failed.
    #[error("{0}")]
    Measure(String),
}

/// A running emulated link between two namespaces; torn down when dropped.
pub struct Wan {
    /// Namespace A (10.77.0.1).
    pub a: Namespace,
    /// Namespace B (10.77.0.2).
    pub b: Namespace,
    /// The profile applied.
    pub profile: Profile,
    counters: [Arc<Counters>; 2],
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What one direction did, as reported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirectionReport {
    /// Packets that entered the link.
    pub packets_in: u64,
    /// Packets delivered.
    pub packets_out: u64,
    /// Bytes delivered.
    pub bytes_out: u64,
    /// Packets lost at random.
    pub lost: u64,
    /// Packets dropped at the full queue.
    pub dropped_queue: u64,
    /// Mean time a delivered packet spent in the link (queueing, serialization, delay), ms.
    pub mean_delay_ms: f64,
    /// The longest, ms.
    pub max_delay_ms: f64,
}

/// Both directions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WanReport {
    /// The profile.
    pub profile: Profile,
    /// A to B.
    pub a_to_b: DirectionReport,
    /// B to A.
    pub b_to_a: DirectionReport,
}

fn report(c: &Counters) -> DirectionReport {
    let out = c.packets_out.load(Ordering::Relaxed);
    DirectionReport {
        packets_in: c.packets_in.load(Ordering::Relaxed),
        packets_out: out,
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
        lost: c.lost.load(Ordering::Relaxed),
        dropped_queue: c.dropped_queue.load(Ordering::Relaxed),
        mean_delay_ms: if out == 0 {
            0.0
        } else {
            c.delay_ns.load(Ordering::Relaxed) as f64 / out as f64 / 1e6
        },
        max_delay_ms: c.max_delay_ns.load(Ordering::Relaxed) as f64 / 1e6,
    }
}

impl Wan {
    /// Creates namespaces `ferry-TAG-a` and `ferry-TAG-b` joined by a link with `profile`
    /// and packets of at most `mtu` bytes. TAG should carry this process's id, so that
    /// namespaces left by a killed run are recognised and removed.
    pub fn start(tag: &str, profile: Profile, mtu: u32) -> Result<Self, WanError> {
        ns::remove_stale();
        let a = Namespace::create(&format!("ferry-{tag}-a"))?;
        let b = Namespace::create(&format!("ferry-{tag}-b"))?;
        let tun_a = tun::open_in(&a, DEV)?;
        let tun_b = tun::open_in(&b, DEV)?;
        a.configure(DEV, &format!("{ADDR_A}/24"), mtu)?;
        b.configure(DEV, &format!("{ADDR_B}/24"), mtu)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = [Arc::new(Counters::default()), Arc::new(Counters::default())];
        let clone = |f: &std::fs::File| {
            f.try_clone()
                .map_err(|e| WanError::Setup(format!("cloning a TUN handle: {e}")))
        };
        let mut threads = link::spawn(
            clone(&tun_a)?,
            clone(&tun_b)?,
            profile.a_to_b,
            Arc::clone(&counters[0]),
            Arc::clone(&stop),
            0x05ee_da2b,
        )
        .map_err(|e| WanError::Setup(format!("starting the link: {e}")))?;
        threads.extend(
            link::spawn(
                tun_b,
                tun_a,
                profile.b_to_a,
                Arc::clone(&counters[1]),
                Arc::clone(&stop),
                0x05ee_db2a,
            )
            .map_err(|e| WanError::Setup(format!("starting the link: {e}")))?,
        );
        Ok(Self {
            a,
            b,
            profile,
            counters,
            stop,
            threads,
        })
    }

    /// What the link did so far.
    pub fn report(&self) -> WanReport {
        WanReport {
            profile: self.profile,
            a_to_b: report(&self.counters[0]),
            b_to_a: report(&self.counters[1]),
        }
    }

    /// Stops the link and removes the namespaces; returns the final report.
    pub fn stop(mut self) -> WanReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.halt();
    }
}
