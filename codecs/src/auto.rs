//! `auto`: the codec chosen per batch, so that effective throughput — the smaller of what
//! the link carries after compression and what the encoder produces — is highest.
//!
//! Three candidates: `raw`, and `lz4` or `zstd:3` behind `dedup` and `xor-delta` (the
//! history stages are cheap next to a compressor and are only worth their bookkeeping when
//! compression pays at all). The candidate in use is measured on every batch (ratio, CPU
//! seconds, and how much faster than one core the batch ran); the others are measured by
//! trial compressions of a few units as one group, within a small CPU budget, without touching history
//! or the wire. While `raw` is chosen the encoder steps aside entirely (the engine's
//! zero-copy path) and only offers units for trials. The link is measured from the sender's feedback: when
//! the sender spends a good part of its time waiting to send, what left per second is
//! what the link carries; otherwise the link is at least that fast.

use std::time::{Duration, Instant};

use ferry_core::codec::{EncodeItem, Unit, TAG_REFERENCE};

use crate::lz4::Lz4;
use crate::stage::Stage;
use crate::zstd_stage::Zstd;

/// Stage masks over [`crate::pipeline::auto_stages`]: dedup, xor-delta, lz4, zstd.
const RAW: u8 = 0;
const LZ4: u8 = 0b0111;
const ZSTD: u8 = 0b1011;

/// Share of the encoder's wall time that trials may take.
const TRIAL_BUDGET: f64 = 0.03;
/// Units compressed (as one group) per trial.
const TRIAL_UNITS: usize = 8;
/// A candidate must beat the one in use by this factor to take over.
const HYSTERESIS: f64 = 1.1;
/// Leaving raw, a compressor's encoding speed counts divided by this: the model sees the
/// sender's cores and the link, not the receiver, which pays for decoding (and on one host
/// shares the sender's cores: there grouped lz4 promised 1.3x raw and delivered a third).
/// Where the link bounds a compressor (ratio × link), it counts in full.
const LEAVE_RAW: f64 = 2.0;
/// Sender time spent waiting, as a share of wall time, that marks the link as the limit.
const LINK_BOUND: f64 = 0.3;
/// Link feedback is judged over windows this long.
const WINDOW: Duration = Duration::from_millis(100);
/// Windows at the start in which the link is not judged.
const WARMUP_WINDOWS: u32 = 1;
/// Windows without waiting after which a compressor forgets the link estimate.
const FORGET_LINK_AFTER: u32 = 3;
/// Weight of a new measurement in the running averages.
const ALPHA: f64 = 0.3;

#[derive(Debug, Clone, Copy)]
struct Candidate {
    name: &'static str,
    mask: u8,
    /// Input bytes over output bytes.
    ratio: Option<f64>,
    /// Input bytes per CPU second.
    speed: Option<f64>,
    /// Whether `speed` was measured on batches in use: trials then no longer move it
    /// (their few units, hot in the cache, compress several times faster than batches).
    speed_in_use: bool,
    batches: u64,
}

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    if !new.is_finite() {
        return old;
    }
    Some(match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    })
}

/// The per-channel chooser.
pub(crate) struct Auto {
    candidates: [Candidate; 3],
    current: usize,
    /// Bytes per second this channel's share of the link carries; `None` until the link
    /// has been seen to be the limit.
    link: Option<f64>,
    /// How many cores a batch keeps busy (CPU time over wall time).
    parallel: f64,
    window: (u64, Duration, Duration),
    /// Windows in a row in which the sender did not wait for the link.
    unwaited: u32,
    /// Windows seen so far.
    windows: u32,
    /// Sender wall time seen, and the part of it trials took (nanoseconds).
    wall_ns: f64,
    trial_ns: f64,
    next_trial: usize,
    /// The trial under way: candidate and units gathered so far (in `trial_input`).
    trial: Option<(usize, usize)>,
    trial_input: Vec<u8>,
    /// Size of the units in `trial_input`.
    trial_unit: usize,
    scratch: Vec<u8>,
    lz4: Lz4,
    zstd: Zstd,
}

impl Auto {
    pub(crate) fn new() -> Self {
        let c = |name, mask| Candidate {
            name,
            mask,
            ratio: None,
            speed: None,
            speed_in_use: false,
            batches: 0,
        };
        Self {
            candidates: [c("raw", RAW), c("lz4", LZ4), c("zstd", ZSTD)],
            current: 0,
            link: None,
            parallel: 1.0,
            window: (0, Duration::ZERO, Duration::ZERO),
            unwaited: 0,
            windows: 0,
            wall_ns: 0.0,
            trial_ns: 0.0,
            next_trial: 1,
            trial: None,
            trial_input: Vec::new(),
            trial_unit: 0,
            scratch: Vec::new(),
            lz4: Lz4,
            zstd: Zstd::new(crate::spec::ZSTD_LEVEL),
        }
    }

    /// The stages to use for the next batch.
    pub(crate) fn mask(&self) -> u8 {
        self.candidates[self.current].mask
    }

    /// Effective bytes per second of input a candidate would move.
    fn score(&self, i: usize) -> f64 {
        self.promise(i, 1.0)
    }

    /// Effective bytes per second of input a candidate would move, its encoding speed
    /// divided by `cpu_discount` (what the receiver's decoding costs, unseen here).
    fn promise(&self, i: usize, cpu_discount: f64) -> f64 {
        let c = &self.candidates[i];
        let link = self.link.unwrap_or(f64::INFINITY);
        if c.mask == RAW {
            return link;
        }
        match (c.ratio, c.speed) {
            (Some(r), Some(s)) => (s * self.parallel / cpu_discount).min(r * link),
            _ => 0.0,
        }
    }

    fn choose(&mut self) {
        // Leaving raw, a compressor's speed counts at 1/LEAVE_RAW: where the cores rather
        // than the link bound it, the receiver's decoding decides as much as our encoding.
        let discount = if self.candidates[self.current].mask == RAW {
            LEAVE_RAW
        } else {
            1.0
        };
        let best = (0..self.candidates.len())
            .max_by(|a, b| {
                self.promise(*a, discount)
                    .total_cmp(&self.promise(*b, discount))
            })
            .unwrap_or(0);
        if best != self.current
            && self.promise(best, discount) > HYSTERESIS * self.score(self.current)
        {
            self.current = best;
        }
    }

    /// Learns from a batch encoded with the current candidate, then feeds a trial.
    pub(crate) fn after_batch(
        &mut self,
        items: &[EncodeItem<'_>],
        deltas: &crate::pipeline::Deltas,
        wall: Duration,
    ) {
        let input: u64 = items.iter().map(|it| it.data.len() as u64).sum();
        let output: u64 = items
            .iter()
            .map(|it| {
                if it.tag == 0 {
                    it.data.len() as u64
                } else {
                    it.out.len() as u64
                }
            })
            .sum();
        let cpu_ns = (deltas.iter().map(|d| d.encode_s).sum::<f64>() * 1e9) as u64;
        let wall_ns = wall.as_nanos() as f64;
        let c = &mut self.candidates[self.current];
        if c.mask != RAW && input > 0 && output > 0 && cpu_ns > 0 {
            c.ratio = ewma(c.ratio, input as f64 / output as f64);
            c.speed = ewma(c.speed, input as f64 / (cpu_ns as f64 / 1e9));
            c.speed_in_use = true;
            if wall_ns > 0.0 {
                let p = (cpu_ns as f64 / wall_ns).clamp(1.0, rayon::current_num_threads() as f64);
                self.parallel = ewma(Some(self.parallel), p).unwrap_or(1.0);
            }
        }
        self.start_trial_if_due();
        for it in items.iter().filter(|it| it.tag != TAG_REFERENCE) {
            if self.trial.is_none() {
                break;
            }
            self.trial_unit(it.unit, it.data);
        }
        self.choose();
    }

    /// Starts a trial of a candidate not in use when one has never been measured or the
    /// CPU budget for trials allows.
    fn start_trial_if_due(&mut self) {
        if self.trial.is_some() {
            return;
        }
        let unmeasured = self
            .candidates
            .iter()
            .any(|c| c.mask != RAW && c.speed.is_none());
        if !unmeasured && self.trial_ns >= TRIAL_BUDGET * self.wall_ns {
            return;
        }
        let n = self.candidates.len();
        for k in 0..n {
            let pick = (self.next_trial + k) % n;
            if pick != self.current && self.candidates[pick].mask != RAW {
                self.next_trial = pick + 1;
                self.trial = Some((pick, 0));
                return;
            }
        }
    }

    /// Whether a trial wants units (while the encoder sends raw, the engine offers them).
    pub(crate) fn wants_sample(&self) -> bool {
        self.trial.is_some()
    }

    /// Adds one unit to the trial under way; once it holds [`TRIAL_UNITS`], compresses
    /// them as one group (as the pipeline's last compressor does), without touching
    /// history or the wire.
    pub(crate) fn trial_unit(&mut self, unit: Unit, data: &[u8]) {
        let Some((pick, mut units)) = self.trial else {
            return;
        };
        if units == 0 {
            self.trial_input.clear();
            self.trial_unit = data.len();
        }
        self.trial_input.extend_from_slice(data);
        units += 1;
        if units < TRIAL_UNITS {
            self.trial = Some((pick, units));
            return;
        }
        self.trial = None;
        let stage: &dyn Stage = if self.candidates[pick].mask == LZ4 {
            &self.lz4
        } else {
            &self.zstd
        };
        let input = self.trial_input.len();
        // The ratio of the units as one group, as the pipeline sends them; the speed of
        // compressing them one by one, which errs on the slow side: a trial's few units
        // are hot in the cache and compress several times faster than a batch does in use
        // (by a factor that varies with the content), and a speed promised but not
        // delivered makes a compressor look better than raw on a fast link.
        let started = Instant::now();
        let output = if stage.encode(unit, &self.trial_input, &mut self.scratch) {
            self.scratch.len()
        } else {
            input
        };
        let group_ns = started.elapsed().as_nanos() as u64;
        let started = Instant::now();
        for one in self.trial_input.chunks(self.trial_unit.max(1)) {
            stage.encode(unit, one, &mut self.scratch);
        }
        let ns = started.elapsed().as_nanos() as u64;
        self.trial_ns += (group_ns + ns) as f64;
        if input > 0 && ns > 0 {
            let c = &mut self.candidates[pick];
            c.ratio = ewma(c.ratio, input as f64 / output.max(1) as f64);
            if !c.speed_in_use {
                c.speed = ewma(c.speed, input as f64 / (ns as f64 / 1e9));
            }
        }
        self.choose();
    }

    /// Sender feedback for one batch.
    pub(crate) fn note_link(&mut self, wire_bytes: u64, send: Duration, wall: Duration) {
        // One call per frame sent, with the candidate that encoded it.
        self.candidates[self.current].batches += 1;
        self.wall_ns += wall.as_nanos() as f64;
        self.start_trial_if_due();
        self.window.0 += wire_bytes;
        self.window.1 += send;
        self.window.2 += wall;
        let (bytes, send, wall) = self.window;
        if wall < WINDOW {
            return;
        }
        self.window = (0, Duration::ZERO, Duration::ZERO);
        self.windows += 1;
        if self.windows <= WARMUP_WINDOWS {
            // The receiver is still starting (a fresh process faulting its memory in): a
            // link judged now looks slower than it is.
            return;
        }
        let carried = bytes as f64 / wall.as_secs_f64();
        if send.as_secs_f64() >= LINK_BOUND * wall.as_secs_f64() {
            self.link = ewma(self.link, carried);
            self.unwaited = 0;
        } else {
            self.unwaited += 1;
            if self.unwaited >= FORGET_LINK_AFTER && self.candidates[self.current].mask != RAW {
                // A compressor that never waits for the link has not seen it for a while:
                // the estimate may date from a moment something else held the cores (the
                // receiver starting, on one host). Raw gets to measure it again.
                self.link = None;
                self.unwaited = 0;
            } else if let Some(l) = self.link {
                // Not waiting: the link carries at least this much, maybe more.
                if carried * 1.5 > l {
                    self.link = Some(carried * 1.5);
                }
            }
        }
        self.choose();
    }

    /// Batches encoded with each candidate.
    pub(crate) fn choices(&self) -> Vec<(String, u64)> {
        self.candidates
            .iter()
            .map(|c| (c.name.to_string(), c.batches))
            .collect()
    }
}
