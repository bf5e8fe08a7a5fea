//! The backend's smoke checks on a live domain, run in dom0 by the lab harness
//! (`ferry xen probe --domain NAME`): log-dirty on and off, dirty counts while the guest
//! runs, foreign reads through the batched windows equal to single-page mappings, and the
//! HVM context surviving a get/set round trip.

use std::time::{Duration, Instant};

use ferry_core::guest::SourceGuest;

use crate::ctrl::PAGE;
use crate::domain::XenGuest;
use crate::state::hvm_records;
use crate::XenError;

/// HVM record types that carry time (CPU: its TSC; PIT, RTC, HPET, PM timer; LAPIC
/// registers: the timer's current count), which a paused domain's context may change in
/// between two reads.
const TIME_RECORDS: [u16; 6] = [2, 6, 10, 11, 12, 13];

/// What the probe found.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// Domain id.
    pub domid: u32,
    /// RAM pages carried.
    pub pages: u64,
    /// Time to scan the physmap.
    pub scan_ms: f64,
    /// Dirty pages seen by PEEK after 1 s of logging (not cleared).
    pub dirty_peek: u64,
    /// Dirty pages fetched by CLEAN right after.
    pub dirty_first: u64,
    /// Dirty pages fetched by CLEAN after one more second.
    pub dirty_second: u64,
    /// Pages compared between window and single-page mappings (domain paused).
    pub pages_compared: u64,
    /// Pages that differed.
    pub pages_differing: u64,
    /// Bytes of HVM context.
    pub context_bytes: usize,
    /// Records in the HVM context.
    pub context_records: usize,
    /// Types of the records whose bodies differed after get → set → get.
    pub context_differing_types: Vec<u16>,
    /// Whether get → set → get returned the same context (time records aside).
    pub context_round_trip: bool,
    /// Time to read every page once through the windows (domain paused).
    pub read_all_ms: f64,
    /// What failed, if anything.
    pub problems: Vec<String>,
}

impl ProbeReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Runs the checks on domain `dom`, which must be running a guest that writes memory.
pub fn probe(dom: u32) -> Result<ProbeReport, XenError> {
    let t = Instant::now();
    let g = XenGuest::source(dom, Some(crate::domain::StopMode::Pause), None)?;
    let mut r = ProbeReport {
        domid: dom,
        pages: g.memmap().pages(),
        scan_ms: t.elapsed().as_secs_f64() * 1e3,
        ..Default::default()
    };
    let xc = g.xc().clone();
    xc.logdirty_on(dom)?;
    let _ = g.dirty(true)?;
    std::thread::sleep(Duration::from_secs(1));
    r.dirty_peek = g.dirty(false)?.count();
    r.dirty_first = g.dirty(true)?.count();
    std::thread::sleep(Duration::from_secs(1));
    r.dirty_second = g.dirty(true)?.count();
    xc.logdirty_off(dom)?;
    if r.dirty_peek == 0 || r.dirty_first < r.dirty_peek || r.dirty_second == 0 {
        r.problems.push(format!(
            "dirty counts {} (peek) {} (clean) {} (clean, 1 s later): the guest's writes are not all seen",
            r.dirty_peek, r.dirty_first, r.dirty_second
        ));
    }
    // Log-dirty can be switched on again after being off.
    xc.logdirty_on(dom)?;
    xc.logdirty_off(dom)?;

    xc.pause(dom)?;
    let result = (|| -> Result<(), XenError> {
        let t = Instant::now();
        let mut a = vec![0u8; PAGE];
        for i in 0..r.pages {
            g.read_page(i, &mut a)
                .map_err(|e| XenError::Unsupported(format!("reading page {i}: {e}")))?;
        }
        r.read_all_ms = t.elapsed().as_secs_f64() * 1e3;
        let step = (r.pages / 512).max(1);
        for i in (0..r.pages).step_by(step as usize) {
            g.read_page(i, &mut a)
                .map_err(|e| XenError::Unsupported(format!("reading page {i}: {e}")))?;
            let single = xc.map(dom, &[g.memmap().gfn(i)], false)?;
            let mut b = vec![0u8; PAGE];
            single.read(0, &mut b);
            r.pages_compared += 1;
            if a != b {
                r.pages_differing += 1;
            }
        }
        let c1 = xc.hvm_context(dom)?;
        xc.set_hvm_context(dom, &c1)?;
        let c2 = xc.hvm_context(dom)?;
        r.context_bytes = c1.len();
        let (a, b) = (
            hvm_records(&c1).map_err(XenError::Unsupported)?,
            hvm_records(&c2).map_err(XenError::Unsupported)?,
        );
        r.context_records = a.len();
        // Same records in the same order; bodies equal except where time moves on while
        // the domain is paused (TSC in the CPU record, timer counters).
        let same_shape = a.len() == b.len()
            && a.iter()
                .zip(&b)
                .all(|(x, y)| x.0 == y.0 && x.1 == y.1 && x.2.len() == y.2.len());
        r.context_differing_types = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.2 != y.2)
            .map(|(x, _)| x.0)
            .collect();
        r.context_round_trip = same_shape
            && r.context_differing_types
                .iter()
                .all(|t| TIME_RECORDS.contains(t));
        Ok(())
    })();
    xc.unpause(dom)?;
    result?;
    if r.pages_differing > 0 {
        r.problems.push(format!(
            "{} of {} pages differ between batched and single mappings",
            r.pages_differing, r.pages_compared
        ));
    }
    if !r.context_round_trip {
        r.problems
            .push("the HVM context changed across get/set".into());
    }
    Ok(r)
}
