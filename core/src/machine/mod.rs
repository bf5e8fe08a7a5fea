//! The protocol state machines, free of I/O.
//!
//! [`SourcePlan`] decides the source's next data step from measured figures.
//! [`SourceSession`] and [`DestSession`] hold the commit protocol: every decision to
//! resume, hand over, discard or hold a guest is made by them, never by the threaded
//! drivers in [`crate::engine`], which only do the I/O and feed events in. [`ChannelOrder`]
//! checks each channel's rounds. [`model`] explores every interleaving of the two sessions
//! with a faulty network, crashes and timers, and checks the safety properties
//! (`docs/safety.md`).

mod dest;
pub mod model;
mod source;

pub use dest::{DestAction, DestEvent, DestSession, DestState};
pub use source::{SourceAction, SourceEvent, SourceSession, SourceState};

use crate::policy::{ConvergencePolicy, Decision, RoundFigures, StopReason};
use crate::wire::{Phase, RoundEnd};

/// The source's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStep {
    /// First storage pass: every allocated, non-zero block.
    StorageFullPass,
    /// A storage round of dirty blocks.
    StorageDirtyRound,
    /// First memory pass: every page (dirty blocks alongside).
    MemoryFullPass,
    /// A memory round of dirty pages (dirty blocks alongside).
    MemoryDirtyRound,
    /// Pause and send the rest.
    StopAndCopy(StopReason),
}

/// The source's phase sequencing, driven by measured figures.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    policy: ConvergencePolicy,
    has_disks: bool,
    storage: Vec<u64>,
    memory: Vec<RoundFigures>,
    round: u32,
}

impl SourcePlan {
    /// A plan for a guest with or without disks.
    pub fn new(policy: ConvergencePolicy, has_disks: bool) -> Self {
        Self {
            policy,
            has_disks,
            storage: Vec::new(),
            memory: Vec::new(),
            round: 0,
        }
    }

    /// The first step.
    pub fn first(&self) -> SourceStep {
        if self.has_disks {
            SourceStep::StorageFullPass
        } else {
            SourceStep::MemoryFullPass
        }
    }

    /// The round number the next round gets (monotonic over the whole migration).
    pub fn next_round(&mut self) -> u32 {
        let r = self.round;
        self.round += 1;
        r
    }

    /// After a storage round that left `pending_block_bytes` dirty at `bandwidth` B/s.
    pub fn after_storage(&mut self, pending_block_bytes: u64, bandwidth: f64) -> SourceStep {
        self.storage.push(pending_block_bytes);
        if self.policy.continue_storage(&self.storage, bandwidth) {
            SourceStep::StorageDirtyRound
        } else {
            SourceStep::MemoryFullPass
        }
    }

    /// An operator changed the downtime target while the migration runs.
    pub fn set_downtime_target(&mut self, target: std::time::Duration) {
        self.policy.downtime_target = target;
    }

    /// After a memory round.
    pub fn after_memory(&mut self, figures: RoundFigures) -> SourceStep {
        self.memory.push(figures);
        match self.policy.decide(&self.memory) {
            Decision::Continue => SourceStep::MemoryDirtyRound,
            Decision::StopAndCopy { reason, .. } => SourceStep::StopAndCopy(reason),
        }
    }
}

/// A protocol violation by the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("protocol violation: {0}")]
pub struct ProtocolError(pub String);

pub(crate) fn violation(s: impl Into<String>) -> ProtocolError {
    ProtocolError(s.into())
}

/// Per-channel ordering on the destination: rounds never go back, data never follows the
/// final barrier, and the final barrier comes once.
#[derive(Debug, Clone, Default)]
pub struct ChannelOrder {
    last_round: Option<u32>,
    finished: bool,
    postcopy_done: bool,
}

impl ChannelOrder {
    /// A channel of a post-copy recovery: the pre-copy rounds and the final barrier
    /// happened on the connection that broke; only post-copy data may come.
    pub fn after_final_barrier() -> Self {
        Self {
            last_round: None,
            finished: true,
            postcopy_done: false,
        }
    }

    /// Checks a data batch for `round`.
    pub fn on_data(&mut self, round: u32) -> Result<(), ProtocolError> {
        if self.finished {
            return Err(violation("data after the final barrier"));
        }
        if let Some(last) = self.last_round {
            if round <= last {
                return Err(violation(format!(
                    "data for round {round} after round {last} ended"
                )));
            }
        }
        Ok(())
    }

    /// Checks post-copy data: only after the final barrier, before the post-copy one.
    pub fn on_postcopy_data(&self) -> Result<(), ProtocolError> {
        if !self.finished || self.postcopy_done {
            return Err(violation("post-copy data outside post-copy"));
        }
        Ok(())
    }

    /// Checks a barrier; returns true when it is the final one.
    pub fn on_round_end(&mut self, end: RoundEnd) -> Result<bool, ProtocolError> {
        if end.phase == Phase::PostCopy {
            if !self.finished || self.postcopy_done {
                return Err(violation("post-copy barrier out of place"));
            }
            self.postcopy_done = true;
            return Ok(false);
        }
        if self.finished {
            return Err(violation("barrier after the final barrier"));
        }
        if let Some(last) = self.last_round {
            if end.round <= last {
                return Err(violation(format!(
                    "round {} ended twice or out of order",
                    end.round
                )));
            }
        }
        self.last_round = Some(end.round);
        self.finished = end.phase == Phase::Final;
        Ok(self.finished)
    }

    /// Whether the final barrier was seen.
    pub fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn channel_order() {
        let mut c = ChannelOrder::default();
        c.on_data(0).unwrap();
        assert!(!c
            .on_round_end(RoundEnd {
                phase: Phase::Memory,
                round: 0
            })
            .unwrap());
        assert!(c.on_data(0).is_err(), "data for an ended round");
        c.on_data(1).unwrap();
        assert!(c
            .on_round_end(RoundEnd {
                phase: Phase::Memory,
                round: 0
            })
            .is_err());
        assert!(c
            .on_round_end(RoundEnd {
                phase: Phase::Final,
                round: 1
            })
            .unwrap());
        assert!(c.on_data(2).is_err(), "data after final");
    }

    #[test]
    fn plan_walks_the_phases() {
        let policy = ConvergencePolicy {
            downtime_target: Duration::from_millis(10),
            ..Default::default()
        };
        let mut p = SourcePlan::new(policy, true);
        assert_eq!(p.first(), SourceStep::StorageFullPass);
        assert_eq!(
            p.after_storage(100_000_000, 1e9),
            SourceStep::StorageDirtyRound
        );
        assert_eq!(p.after_storage(1_000, 1e9), SourceStep::MemoryFullPass);
        assert_eq!(
            p.after_memory(RoundFigures {
                pending_bytes: 100_000_000,
                bandwidth: 1e9
            }),
            SourceStep::MemoryDirtyRound
        );
        assert_eq!(
            p.after_memory(RoundFigures {
                pending_bytes: 1_000,
                bandwidth: 1e9
            }),
            SourceStep::StopAndCopy(StopReason::Converged)
        );
        assert_eq!(
            SourcePlan::new(ConvergencePolicy::default(), false).first(),
            SourceStep::MemoryFullPass
        );
    }
}
