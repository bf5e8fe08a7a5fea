//! The convergence policy: when to stop pre-copying. A pure function of measured figures,
//! so it is tested without a guest or a clock.

use std::time::Duration;

/// Knobs of the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergencePolicy {
    /// Pause once the remaining data is estimated to move within this time.
    pub downtime_target: Duration,
    /// Stop pre-copying after this many memory rounds whatever the estimate.
    pub max_rounds: u32,
    /// A round counts as progress when it leaves at most this fraction of the smallest
    /// dirty set seen so far (0.9 = must shrink by 10%).
    pub progress_ratio: f64,
    /// Stop after this many memory rounds in a row without progress.
    pub stall_rounds: u32,
    /// Storage pre-copy rounds (after the first full pass) at most.
    pub max_storage_rounds: u32,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(10),
            max_rounds: 30,
            progress_ratio: 0.9,
            stall_rounds: 3,
            max_storage_rounds: 8,
        }
    }
}

/// What one finished memory round left behind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundFigures {
    /// Bytes dirtied while the round ran (what the next round, or the pause, must send).
    pub pending_bytes: u64,
    /// Measured throughput of the round in bytes per second.
    pub bandwidth: f64,
}

/// Why pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The estimated downtime fits the target.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The dirty set stopped shrinking.
    NoProgress,
    /// Memory post-copy from the start: no memory round before the pause.
    Postcopy,
    /// Hybrid: the guest dirtied memory behind the pass as fast as the link carried it,
    /// so no round could ever catch up; the rest moved after the hand-over.
    Diverging,
    /// The operator switched a hybrid migration to post-copy.
    Requested,
}

/// The policy's verdict after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another pre-copy round.
    Continue,
    /// Pause and copy the rest; `estimate` is the predicted transfer time of what is left.
    StopAndCopy {
        /// Why.
        reason: StopReason,
        /// Predicted time to send what is pending.
        estimate: Duration,
    },
}

impl ConvergencePolicy {
    /// Estimated time to send `bytes` at `bandwidth` bytes/s.
    pub fn estimate(bytes: u64, bandwidth: f64) -> Duration {
        if bytes == 0 {
            return Duration::ZERO;
        }
        if !(bandwidth.is_finite() && bandwidth > 0.0) {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(bytes as f64 / bandwidth).unwrap_or(Duration::MAX)
    }

    /// Decides after memory round `history.len() - 1` (history holds every memory round so
    /// far, oldest first). The bandwidth used is the best of the last three rounds: a short
    /// round of a few pages under-measures the link.
    pub fn decide(&self, history: &[RoundFigures]) -> Decision {
        let Some(last) = history.last() else {
            return Decision::Continue;
        };
        let bw = history
            .iter()
            .rev()
            .take(3)
            .map(|r| r.bandwidth)
            .filter(|b| b.is_finite())
            .fold(0.0f64, f64::max);
        let estimate = Self::estimate(last.pending_bytes, bw);
        if estimate <= self.downtime_target {
            return Decision::StopAndCopy {
                reason: StopReason::Converged,
                estimate,
            };
        }
        if history.len() as u32 >= self.max_rounds {
            return Decision::StopAndCopy {
                reason: StopReason::MaxRounds,
                estimate,
            };
        }
        // No-progress rule: count trailing rounds that did not shrink below the best seen.
        let mut best = u64::MAX;
        let mut stalled = 0u32;
        for r in history {
            if (r.pending_bytes as f64) <= best as f64 * self.progress_ratio || best == u64::MAX {
                best = best.min(r.pending_bytes);
                stalled = 0;
            } else {
                best = best.min(r.pending_bytes);
                stalled += 1;
            }
        }
        if stalled >= self.stall_rounds {
            return Decision::StopAndCopy {
                reason: StopReason::NoProgress,
                estimate,
            };
        }
        Decision::Continue
    }

    /// Storage pre-copy: whether to run another dirty-block round before memory pre-copy
    /// begins. Blocks keep flowing during memory rounds, so this only stops the disk from
    /// dominating: continue while the dirty set shrinks and would take longer than the
    /// downtime target, up to the round limit.
    pub fn continue_storage(&self, dirty_bytes_per_round: &[u64], bandwidth: f64) -> bool {
        let Some(&last) = dirty_bytes_per_round.last() else {
            return true;
        };
        if dirty_bytes_per_round.len() as u32 > self.max_storage_rounds {
            return false;
        }
        if Self::estimate(last, bandwidth) <= self.downtime_target {
            return false;
        }
        match dirty_bytes_per_round.iter().rev().nth(1) {
            Some(&prev) => (last as f64) <= prev as f64 * self.progress_ratio,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn r(pending: u64, bw: f64) -> RoundFigures {
        RoundFigures {
            pending_bytes: pending,
            bandwidth: bw,
        }
    }

    #[test]
    fn converges_when_the_estimate_fits() {
        let p = ConvergencePolicy {
            downtime_target: Duration::from_millis(50),
            ..Default::default()
        };
        // 100 MB/s, 10 MB pending = 100 ms > 50 ms: continue.
        assert_eq!(p.decide(&[r(10_000_000, 100.0 * MB)]), Decision::Continue);
        // 4 MB pending = 40 ms: stop.
        assert!(matches!(
            p.decide(&[r(10_000_000, 100.0 * MB), r(4_000_000, 100.0 * MB)]),
            Decision::StopAndCopy {
                reason: StopReason::Converged,
                ..
            }
        ));
    }

    #[test]
    fn stops_without_progress() {
        let p = ConvergencePolicy::default();
        let h = [
            r(50e6 as u64, MB),
            r(40e6 as u64, MB),
            r(41e6 as u64, MB),
            r(40e6 as u64, MB),
        ];
        assert_eq!(p.decide(&h[..3]), Decision::Continue);
        assert_eq!(p.decide(&h), Decision::Continue);
        let mut h = h.to_vec();
        h.push(r(39e6 as u64, MB));
        assert!(matches!(
            p.decide(&h),
            Decision::StopAndCopy {
                reason: StopReason::NoProgress,
                ..
            }
        ));
    }

    #[test]
    fn round_limit_and_unknown_bandwidth() {
        let p = ConvergencePolicy {
            max_rounds: 2,
            ..Default::default()
        };
        let h = [r(100e6 as u64, MB), r(50e6 as u64, 0.0)];
        assert!(matches!(
            p.decide(&h),
            Decision::StopAndCopy {
                reason: StopReason::MaxRounds,
                ..
            }
        ));
        assert_eq!(ConvergencePolicy::estimate(1, 0.0), Duration::MAX);
        assert_eq!(ConvergencePolicy::estimate(0, 0.0), Duration::ZERO);
    }

    #[test]
    fn storage_rounds_stop_when_small_or_stuck() {
        let p = ConvergencePolicy::default();
        assert!(p.continue_storage(&[], MB));
        assert!(p.continue_storage(&[100e6 as u64], 100.0 * MB));
        assert!(!p.continue_storage(&[100e6 as u64, 1e6 as u64], 100.0 * MB));
        assert!(!p.continue_storage(&[100e6 as u64, 99e6 as u64], 100.0 * MB));
    }
}
