//! The verifiable workload: threads that play the guest's vCPUs.
//!
//! Like QEMU's migration test guest, every write advances a counter: page `p` holds
//! `(c, tag(p, c))` in its first 16 bytes, and a *ledger* in guest memory records the last
//! `c` written to every page; disk block `b` holds `("FERRYBLK", b, s, tag(b, s))` and a
//! second ledger records `s`. Both ledgers live in guest memory, so they migrate with it.
//! After a migration the guest checks itself: every page and block must hold exactly the
//! version its ledger names — a lost or stale page or block cannot pass.
//!
//! The threads' own registers (random state, cursor, write count) are the "vCPU state"
//! saved at pause and restored on the destination.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_core::digest::mix_index;

use crate::Inner;

/// Where the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Any data page, uniformly.
    Uniform,
    /// 90% of writes to the first 10% of each thread's pages.
    Hotspot,
    /// Every page in order, pass after pass.
    Sequential,
    /// No writes.
    Idle,
}

impl Pattern {
    /// Parses a pattern name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Pattern::Uniform),
            "hotspot" => Ok(Pattern::Hotspot),
            "sequential" => Ok(Pattern::Sequential),
            "idle" => Ok(Pattern::Idle),
            _ => Err(format!(
                "unknown workload {s:?} (known: uniform, hotspot, sequential, idle)"
            )),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Uniform => "uniform",
            Pattern::Hotspot => "hotspot",
            Pattern::Sequential => "sequential",
            Pattern::Idle => "idle",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Pattern::Uniform => 0,
            Pattern::Hotspot => 1,
            Pattern::Sequential => 2,
            Pattern::Idle => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        [
            Pattern::Uniform,
            Pattern::Hotspot,
            Pattern::Sequential,
            Pattern::Idle,
        ]
        .get(c as usize)
        .copied()
    }
}

/// Workload settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Write pattern (memory and disk).
    pub pattern: Pattern,
    /// Page writes per second over all threads; 0 = as fast as possible.
    pub dirty_rate: u64,
    /// Block writes per second; 0 = no disk writes.
    pub disk_rate: u64,
    /// Memory-writing threads.
    pub threads: u16,
    /// Seed for the threads' random state.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            pattern: Pattern::Hotspot,
            dirty_rate: 100_000,
            disk_rate: 500,
            threads: 1,
            seed: 0x5eed,
        }
    }
}

/// A thread's registers: what is saved at pause and restored on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    /// xorshift state.
    pub rng: u64,
    /// Sequential cursor.
    pub cursor: u64,
    /// Writes done by this thread so far (over the guest's whole life).
    pub writes: u64,
}

impl Regs {
    pub(crate) fn seeded(seed: u64, thread: u64) -> Self {
        Self {
            rng: mix_index(seed, thread) | 1,
            cursor: 0,
            writes: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The next unit in `0..len` for `pattern`; the hot set is the first tenth.
    fn pick(&mut self, pattern: Pattern, len: u64) -> u64 {
        match pattern {
            Pattern::Sequential => {
                let c = self.cursor % len;
                self.cursor = (c + 1) % len;
                c
            }
            Pattern::Hotspot => {
                let r = self.next();
                if r % 10 < 9 {
                    (r >> 8) % (len / 10).max(1)
                } else {
                    (r >> 8) % len
                }
            }
            Pattern::Uniform | Pattern::Idle => self.next() % len,
        }
    }
}

/// Naps when the thread has nothing to do or is ahead of its schedule; true when it did.
/// Naps are short so a pause is seen quickly: the caller re-checks after each.
fn held_back(inner: &Inner, idle: bool, pacer: &Pacer) -> bool {
    if idle {
        inner.ctl.nap(Duration::from_millis(50));
        return true;
    }
    let wait = pacer.wait();
    if wait.is_zero() {
        return false;
    }
    inner.ctl.nap(wait.min(Duration::from_millis(20)));
    true
}

/// A safe point of a workload thread: parks while paused (saving the thread's registers).
/// `None` means stop; `Some(true)` that the thread was parked (its pacing restarts).
fn park_point(inner: &Inner, slot: usize, regs: Regs) -> Option<bool> {
    let mut saved = false;
    let go = inner.ctl.checkpoint(|| {
        inner.save_regs(slot, regs);
        saved = true;
    });
    go.then_some(saved)
}

/// The tag stored next to counter `c` in unit `i`.
pub fn tag(i: u64, c: u64) -> u64 {
    mix_index(c, i ^ 0xfe77_0000_0000_0000)
}

/// Block header magic.
pub const BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"FERRYBLK");

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// Run/pause/stop control shared by the threads.
pub(crate) struct RunControl {
    flag: AtomicU8,
    parked: Mutex<usize>,
    cond: Condvar,
    pub(crate) live: AtomicU64,
}

impl RunControl {
    pub(crate) fn new() -> Self {
        Self {
            flag: AtomicU8::new(RUN),
            parked: Mutex::new(0),
            cond: Condvar::new(),
            live: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every thread to park after its current write and waits until all have.
    pub(crate) fn pause(&self) -> Result<(), String> {
        self.flag.store(PAUSE, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut g = self.lock();
        self.cond.notify_all();
        while (*g as u64) < self.live.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("workload threads did not park within 10 s".into());
            }
            g = self
                .cond
                .wait_timeout(g, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Asks the threads to park at their next step, without waiting for them (a thread
    /// blocked on a page that has not arrived parks once it comes).
    pub(crate) fn request_pause(&self) {
        let _g = self.lock();
        self.flag.store(PAUSE, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub(crate) fn resume(&self) {
        let _g = self.lock();
        self.flag.store(RUN, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub(crate) fn stop(&self) {
        let _g = self.lock();
        self.flag.store(STOP, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.flag.load(Ordering::SeqCst) == PAUSE
    }

    /// Sleeps up to `d`, waking early on any state change.
    fn nap(&self, d: Duration) {
        let g = self.lock();
        if self.flag.load(Ordering::SeqCst) == RUN {
            let _ = self.cond.wait_timeout(g, d);
        }
    }

    /// Parks while paused; returns false when told to stop.
    fn checkpoint(&self, save: impl FnOnce()) -> bool {
        match self.flag.load(Ordering::Acquire) {
            RUN => true,
            STOP => {
                save();
                false
            }
            _ => {
                save();
                let mut g = self.lock();
                *g += 1;
                self.cond.notify_all();
                while self.flag.load(Ordering::SeqCst) == PAUSE {
                    g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                *g -= 1;
                self.flag.load(Ordering::SeqCst) != STOP
            }
        }
    }
}

/// Per-thread live counters for status output.
pub(crate) struct LiveCounters {
    pub(crate) page_writes: Vec<AtomicU64>,
    pub(crate) block_writes: AtomicU64,
}

/// Writes done between two pause checks: small, so a pause takes microseconds.
const BURST: u64 = 64;

/// Paces a thread at `rate` operations per second (0 = unpaced).
struct Pacer {
    rate: u64,
    start: Instant,
    done: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            start: Instant::now(),
            done: 0,
        }
    }

    /// Records `n` operations.
    fn record(&mut self, n: u64) {
        self.done += n;
    }

    /// How long until the next operation is due (zero when unpaced or behind).
    fn wait(&self) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        due.saturating_sub(self.start.elapsed())
    }
}

/// Body of memory thread `t`.
pub(crate) fn memory_thread(inner: &Inner, t: usize, check_first: bool) {
    let (lo, hi) = inner.map.partition(t, inner.config().threads as usize);
    if check_first {
        let r = inner.check_pages(lo, hi);
        inner.record_check(t, r);
    }
    let cfg = inner.config();
    let mut regs = inner.regs(t);
    let threads = u64::from(cfg.threads.max(1));
    // The workload's rate, or lower while auto-converge limits the guest's dirtying.
    let rate_now = || {
        let limit = inner.dirty_limit.load(Ordering::Relaxed);
        let total = match (cfg.dirty_rate, limit) {
            (0, l) => l,
            (r, 0) => r,
            (r, l) => r.min(l),
        };
        if total > 0 {
            (total / threads).max(1)
        } else {
            0
        }
    };
    let mut rate = rate_now();
    let mut pacer = Pacer::new(rate);
    let len = hi - lo;
    loop {
        let Some(parked) = park_point(inner, t, regs) else {
            return;
        };
        if parked || rate != rate_now() {
            rate = rate_now();
            pacer = Pacer::new(rate);
        }
        if held_back(inner, cfg.pattern == Pattern::Idle || len == 0, &pacer) {
            continue;
        }
        for _ in 0..BURST {
            let off = regs.pick(cfg.pattern, len);
            inner.write_page_version(lo + off);
            regs.writes += 1;
        }
        inner.live.page_writes[t].store(regs.writes, Ordering::Relaxed);
        pacer.record(BURST);
    }
}

/// Body of the disk thread (writes disk 0).
pub(crate) fn disk_thread(inner: &Inner, slot: usize, check_first: bool) {
    if check_first {
        let r = inner.check_blocks();
        inner.record_check(slot, r);
    }
    let cfg = inner.config();
    let mut regs = inner.regs(slot);
    // The rate is the workload's, or lower while the VMM throttles disk writes.
    let rate_now = || match inner.disk_limit.load(Ordering::Relaxed) {
        0 => cfg.disk_rate.max(1),
        limit => cfg.disk_rate.max(1).min(limit),
    };
    let mut rate = rate_now();
    let mut pacer = Pacer::new(rate);
    let blocks = inner.map.blocks;
    let mut failed = false;
    loop {
        let Some(parked) = park_point(inner, slot, regs) else {
            return;
        };
        if parked || rate != rate_now() {
            rate = rate_now();
            pacer = Pacer::new(rate);
        }
        let idle = cfg.pattern == Pattern::Idle || cfg.disk_rate == 0 || blocks == 0 || failed;
        if held_back(inner, idle, &pacer) {
            continue;
        }
        let b = regs.pick(cfg.pattern, blocks);
        if let Err(e) = inner.write_block_version(b) {
            tracing::error!("sim disk write failed, disk writes stop: {e}");
            failed = true;
            continue;
        }
        regs.writes += 1;
        inner
            .live
            .block_writes
            .store(regs.writes, Ordering::Relaxed);
        pacer.record(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_low_rates() {
        let mut p = Pacer::new(10);
        p.record(64);
        // 64 operations at 10/s are due over 6.4 s: the next one waits most of that.
        assert!(p.wait() > Duration::from_secs(6));
        let mut q = Pacer::new(0);
        q.record(1_000_000);
        assert_eq!(q.wait(), Duration::ZERO);
    }
}
