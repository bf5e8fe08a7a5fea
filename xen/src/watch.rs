//! The guest's service interruption as the hypervisor sees it, measured the same way for
//! any migration tool on one host: a guest "runs" while some domain other than dom0 is
//! neither paused, shut down (a suspend included) nor dying. Polled through
//! `xc_domain_getinfo` in a tight loop, so `xl migrate` and `ferry` can be compared on
//! the same clock; meant for a host that runs the one guest being migrated.

use std::time::{Duration, Instant};

use crate::ctrl::Xc;
use crate::XenError;

/// One interval with no guest domain running.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outage {
    /// Seconds from the start of the watch.
    pub at_s: f64,
    /// Length in milliseconds.
    pub ms: f64,
}

/// What a watch saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchReport {
    /// Polls made.
    pub samples: u64,
    /// Mean time between polls (the resolution), microseconds.
    pub poll_us: f64,
    /// Every outage, in order (the last one still going on if `ended_down`).
    pub outages: Vec<Outage>,
    /// No guest was running when the watch ended.
    pub ended_down: bool,
}

impl WatchReport {
    /// The longest outage, milliseconds (0 when there was none).
    pub fn longest_ms(&self) -> f64 {
        self.outages.iter().map(|o| o.ms).fold(0.0, f64::max)
    }
}

fn guest_runs(xc: &Xc) -> Result<bool, XenError> {
    Ok(xc
        .domains()?
        .iter()
        .any(|d| !d.paused && !d.shutdown && !d.dying))
}

/// Watches until `settle` after the first outage ended, or `limit` in all. Outages
/// before a guest was first seen running do not count.
pub fn watch(limit: Duration, settle: Duration) -> Result<WatchReport, XenError> {
    let xc = Xc::open()?;
    let t0 = Instant::now();
    let mut report = WatchReport::default();
    let mut seen_running = false;
    let mut down_since: Option<Instant> = None;
    let mut last_end: Option<Instant> = None;
    while t0.elapsed() < limit {
        let now = Instant::now();
        let runs = guest_runs(&xc)?;
        report.samples += 1;
        match (runs, down_since) {
            (true, Some(since)) => {
                report.outages.push(Outage {
                    at_s: (since - t0).as_secs_f64(),
                    ms: (now - since).as_secs_f64() * 1e3,
                });
                down_since = None;
                last_end = Some(now);
            }
            (false, None) if seen_running => down_since = Some(now),
            _ => {}
        }
        seen_running |= runs;
        if runs && last_end.is_some_and(|e| e.elapsed() >= settle) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if let Some(since) = down_since {
        report.outages.push(Outage {
            at_s: (since - t0).as_secs_f64(),
            ms: since.elapsed().as_secs_f64() * 1e3,
        });
        report.ended_down = true;
    }
    if report.samples > 0 {
        report.poll_us = t0.elapsed().as_secs_f64() * 1e6 / report.samples as f64;
    }
    Ok(report)
}
