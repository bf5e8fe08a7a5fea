//! The protocol state machines, free of I/O.
//!
//! [`SourcePlan`] decides the source's next step from measured figures; [`DestSession`]
//! and [`ChannelOrder`] check that what arrives is valid in the destination's current state
//! and say what to do next. The drivers in [`crate::engine`] do the I/O around them.
//!
//! ```text
//! source:  Handshake → Storage(full) → Storage(dirty)* → Memory(full) → Memory(dirty)*
//!          → StopAndCopy → AwaitVerified → Commit → AwaitResumed
//! dest:    AwaitHello → Receiving → Verifying → AwaitCommit → Committed
//!                 \__________\___________\_______→ Discarded (error, timeout, abort)
//!                                          AwaitCommit --(timeout, lost peer)--→ InDoubt
//! ```

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

fn violation(s: impl Into<String>) -> ProtocolError {
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

/// The destination's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestState {
    /// Waiting for the handshake.
    AwaitHello,
    /// Receiving rounds.
    Receiving,
    /// Final state complete: verify it now.
    Verifying,
    /// Verified and acknowledged: waiting for the source to hand over.
    AwaitCommit,
    /// The destination owns the guest.
    Committed,
    /// Thrown away; the source stays the owner.
    Discarded,
    /// Acknowledged but the hand-over never came: keep the guest paused for an operator.
    InDoubt,
}

/// Events the destination driver feeds in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestEvent {
    /// Handshake accepted.
    Hello,
    /// Channel `n` passed its final barrier.
    FinalBarrier(usize),
    /// The state blob arrived.
    State,
    /// The manifest arrived.
    Manifest,
    /// The driver finished verification with this result.
    VerifyDone(bool),
    /// The source handed over.
    Commit,
    /// The source abandoned the migration.
    Abort,
    /// A channel failed, closed early, or went silent past the timeout.
    Lost,
}

/// What the driver must do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestAction {
    /// Keep receiving.
    Continue,
    /// Verify the manifest, restore state, flush, then report [`DestEvent::VerifyDone`].
    Verify,
    /// Send `verified` and wait for the commit.
    AckVerified,
    /// Resume the guest and confirm.
    Resume,
    /// Discard the guest.
    Discard,
    /// Keep the guest paused: the hand-over is in doubt.
    HoldInDoubt,
}

/// The destination's session state machine.
#[derive(Debug, Clone)]
pub struct DestSession {
    state: DestState,
    finals: Vec<bool>,
    have_state: bool,
    have_manifest: bool,
}

impl DestSession {
    /// A session for `channels` channels.
    pub fn new(channels: usize) -> Self {
        Self {
            state: DestState::AwaitHello,
            finals: vec![false; channels],
            have_state: false,
            have_manifest: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> DestState {
        self.state
    }

    /// Feeds one event.
    pub fn on(&mut self, ev: DestEvent) -> Result<DestAction, ProtocolError> {
        use DestEvent as E;
        use DestState as S;
        let action = match (self.state, ev) {
            (S::AwaitHello, E::Hello) => {
                self.state = S::Receiving;
                DestAction::Continue
            }
            (S::AwaitHello, E::Abort | E::Lost) => {
                self.state = S::Discarded;
                DestAction::Discard
            }
            (S::Receiving, E::FinalBarrier(ch)) => {
                let slot = self
                    .finals
                    .get_mut(ch)
                    .ok_or_else(|| violation(format!("barrier on unknown channel {ch}")))?;
                *slot = true;
                self.ready()
            }
            (S::Receiving, E::State) => {
                if !self.finals.first().copied().unwrap_or(false) {
                    return Err(violation("state before the final barrier"));
                }
                if self.have_state {
                    return Err(violation("state sent twice"));
                }
                self.have_state = true;
                self.ready()
            }
            (S::Receiving, E::Manifest) => {
                if !self.have_state {
                    return Err(violation("manifest before state"));
                }
                if self.have_manifest {
                    return Err(violation("manifest sent twice"));
                }
                self.have_manifest = true;
                self.ready()
            }
            (S::Verifying, E::VerifyDone(true)) => {
                self.state = S::AwaitCommit;
                DestAction::AckVerified
            }
            (S::Receiving | S::Verifying, E::Abort | E::Lost | E::VerifyDone(false)) => {
                self.state = S::Discarded;
                DestAction::Discard
            }
            (S::AwaitCommit, E::Lost) => {
                self.state = S::InDoubt;
                DestAction::HoldInDoubt
            }
            (S::AwaitCommit, E::Commit) => {
                self.state = S::Committed;
                DestAction::Resume
            }
            (S::AwaitCommit, E::Abort) => {
                self.state = S::Discarded;
                DestAction::Discard
            }
            (state, ev) => {
                return Err(violation(format!("{ev:?} is not valid in state {state:?}")));
            }
        };
        Ok(action)
    }

    fn ready(&mut self) -> DestAction {
        if self.have_manifest && self.finals.iter().all(|f| *f) {
            self.state = DestState::Verifying;
            DestAction::Verify
        } else {
            DestAction::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn happy_path_two_channels() {
        let mut s = DestSession::new(2);
        assert_eq!(s.on(DestEvent::Hello).unwrap(), DestAction::Continue);
        assert_eq!(
            s.on(DestEvent::FinalBarrier(0)).unwrap(),
            DestAction::Continue
        );
        assert_eq!(s.on(DestEvent::State).unwrap(), DestAction::Continue);
        assert_eq!(s.on(DestEvent::Manifest).unwrap(), DestAction::Continue);
        assert_eq!(
            s.on(DestEvent::FinalBarrier(1)).unwrap(),
            DestAction::Verify
        );
        assert_eq!(
            s.on(DestEvent::VerifyDone(true)).unwrap(),
            DestAction::AckVerified
        );
        assert_eq!(s.on(DestEvent::Commit).unwrap(), DestAction::Resume);
        assert_eq!(s.state(), DestState::Committed);
    }

    #[test]
    fn out_of_order_events_are_violations() {
        let mut s = DestSession::new(1);
        assert!(s.on(DestEvent::Commit).is_err());
        s.on(DestEvent::Hello).unwrap();
        assert!(s.on(DestEvent::State).is_err(), "state before barrier");
        s.on(DestEvent::FinalBarrier(0)).unwrap();
        assert!(s.on(DestEvent::Manifest).is_err(), "manifest before state");
        assert!(s.on(DestEvent::Commit).is_err(), "commit before verify");
        assert!(s.on(DestEvent::FinalBarrier(3)).is_err());
    }

    #[test]
    fn failures_discard_before_ack_and_hold_after() {
        let mut s = DestSession::new(1);
        s.on(DestEvent::Hello).unwrap();
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::Discard);

        let mut s = DestSession::new(1);
        for e in [
            DestEvent::Hello,
            DestEvent::FinalBarrier(0),
            DestEvent::State,
            DestEvent::Manifest,
        ] {
            s.on(e).unwrap();
        }
        assert_eq!(
            s.on(DestEvent::VerifyDone(false)).unwrap(),
            DestAction::Discard
        );

        let mut s = DestSession::new(1);
        for e in [
            DestEvent::Hello,
            DestEvent::FinalBarrier(0),
            DestEvent::State,
            DestEvent::Manifest,
            DestEvent::VerifyDone(true),
        ] {
            s.on(e).unwrap();
        }
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::HoldInDoubt);
        assert_eq!(s.state(), DestState::InDoubt);
    }

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
