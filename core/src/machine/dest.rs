//! The destination's side of the commit protocol.
//!
//! ```text
//! AwaitHello → Receiving → Verifying → AwaitCommit → Committed → Running
//!      \___________\___________\____________|            \          ↑
//!                  (error, timeout, abort)  | (lost)       \→ PostCopy (owed blocks)
//!                        ↓                  ↓               \      | (lost)
//!                    Discarded           InDoubt             → Held ←┘ (resume failed)
//!                                  (operator: resume | discard)  (operator: resume)
//! ```
//!
//! Before `verified` is sent any failure discards: the source still owns the guest. From
//! `verified` until `commit` the source may or may not have handed over, so a failure holds
//! the guest paused and in doubt until an operator decides. After `commit` the guest is
//! this side's and is never discarded: what cannot complete holds it, paused, for an
//! operator.

use super::{violation, ProtocolError};

/// The destination's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestState {
    /// Waiting for the handshake.
    AwaitHello,
    /// Receiving rounds.
    Receiving,
    /// Final state complete: verify it now.
    Verifying,
    /// Verified, durable and acknowledged: waiting for the source to hand over.
    AwaitCommit,
    /// The source handed over: resuming the guest here.
    Committed,
    /// The guest runs here; blocks still owed by the source arrive in the background.
    PostCopy,
    /// The guest runs here and owes nothing.
    Running,
    /// The guest is this side's but cannot run yet (resuming failed, or owed blocks can no
    /// longer arrive): kept paused and reported, for an operator.
    Held,
    /// Thrown away; the source stays the owner.
    Discarded,
    /// Acknowledged but the hand-over never came: kept paused for an operator.
    InDoubt,
}

impl DestState {
    /// The name an operator sees (`ferry status`).
    pub fn name(self) -> &'static str {
        match self {
            DestState::AwaitHello => "listening",
            DestState::Receiving | DestState::Verifying | DestState::AwaitCommit => "receiving",
            DestState::Committed | DestState::PostCopy | DestState::Running => "running",
            DestState::Held => "held",
            DestState::Discarded => "discarded",
            DestState::InDoubt => "in-doubt",
        }
    }
}

/// Events the destination driver feeds in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestEvent {
    /// Handshake accepted.
    Hello,
    /// Channel `n` passed its final barrier.
    FinalBarrier(usize),
    /// The state blob arrived.
    State,
    /// The manifest arrived.
    Manifest,
    /// The driver finished verification (and made everything durable) with this result.
    VerifyDone(bool),
    /// The source handed over.
    Commit,
    /// The source abandoned the migration.
    Abort,
    /// A channel failed, closed early, broke the protocol, or went silent past the timeout.
    Lost,
    /// Storage post-copy: the source announced blocks it sends after the hand-over.
    Owed,
    /// The driver tried to resume the guest: whether it runs now.
    ResumeDone(bool),
    /// The last owed block arrived.
    PostcopyDone,
    /// A held or in-doubt guest got its owed blocks from a recovering source.
    OwedArrived,
    /// An operator resumes a held or in-doubt guest.
    OperatorResume,
    /// An operator discards an in-doubt guest.
    OperatorDiscard,
}

/// What the driver must do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestAction {
    /// Keep receiving (or keep doing what it does).
    Continue,
    /// Verify the manifest, restore state, make every received block durable, then report
    /// [`DestEvent::VerifyDone`].
    Verify,
    /// Send `verified` and wait for the commit.
    AckVerified,
    /// Resume the guest, then report [`DestEvent::ResumeDone`].
    Resume,
    /// Tell the source the guest runs here (`resumed`).
    ConfirmResumed,
    /// Discard the guest.
    Discard,
    /// Keep the guest paused: the hand-over is in doubt.
    HoldInDoubt,
    /// Keep (or put) the guest paused: it is ours but cannot run yet.
    Hold,
}

/// The destination's session state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestSession {
    state: DestState,
    finals: Vec<bool>,
    have_state: bool,
    have_manifest: bool,
    owed: bool,
    #[cfg(test)]
    pub(crate) mutation: Option<super::model::Mutation>,
}

impl DestSession {
    /// A session for `channels` channels.
    pub fn new(channels: usize) -> Self {
        Self {
            state: DestState::AwaitHello,
            finals: vec![false; channels],
            have_state: false,
            have_manifest: false,
            owed: false,
            #[cfg(test)]
            mutation: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> DestState {
        self.state
    }

    /// Whether the source has handed the guest over to this side.
    pub fn owns_guest(&self) -> bool {
        matches!(
            self.state,
            DestState::Committed | DestState::PostCopy | DestState::Running | DestState::Held
        )
    }

    /// Blocks are still owed by the source.
    pub fn owes_blocks(&self) -> bool {
        self.owed
    }

    /// A failure of any kind (lost peer, timeout, protocol violation): what to do depends
    /// only on how far the hand-over got.
    pub fn fail(&mut self) -> DestAction {
        use DestState as S;
        match self.state {
            S::AwaitHello | S::Receiving | S::Verifying => {
                self.state = S::Discarded;
                DestAction::Discard
            }
            S::AwaitCommit => {
                #[cfg(test)]
                if self.mutation == Some(super::model::Mutation::DestDiscardsWhenInDoubt) {
                    self.state = S::Discarded;
                    return DestAction::Discard;
                }
                self.state = S::InDoubt;
                DestAction::HoldInDoubt
            }
            #[cfg(test)]
            S::Committed | S::PostCopy | S::Running
                if self.mutation == Some(super::model::Mutation::DestDiscardsCommitted) =>
            {
                self.state = S::Discarded;
                DestAction::Discard
            }
            // Ours now: never discarded. Owed blocks that cannot arrive hold it paused.
            S::PostCopy => {
                self.state = S::Held;
                DestAction::Hold
            }
            S::Committed | S::Running | S::Held | S::Discarded | S::InDoubt => DestAction::Continue,
        }
    }

    /// Feeds one event. An event that is not valid in the current state is a protocol
    /// violation: the caller reports it and calls [`DestSession::fail`].
    pub fn on(&mut self, ev: DestEvent) -> Result<DestAction, ProtocolError> {
        use DestEvent as E;
        use DestState as S;
        let action = match (self.state, ev) {
            (S::AwaitHello, E::Hello) => {
                self.state = S::Receiving;
                DestAction::Continue
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
            (S::AwaitCommit, E::Commit) => {
                self.state = S::Committed;
                DestAction::Resume
            }
            (S::Receiving, E::Owed) => {
                self.owed = true;
                DestAction::Continue
            }
            (S::Committed, E::ResumeDone(true)) => {
                self.state = if self.owed { S::PostCopy } else { S::Running };
                DestAction::ConfirmResumed
            }
            (S::Committed, E::ResumeDone(false)) => {
                self.state = S::Held;
                DestAction::Hold
            }
            (S::PostCopy, E::PostcopyDone) => {
                self.owed = false;
                self.state = S::Running;
                DestAction::Continue
            }
            (S::InDoubt | S::Held, E::OwedArrived) => {
                self.owed = false;
                DestAction::Continue
            }
            (S::InDoubt | S::Held, E::OperatorResume) => {
                if self.owed {
                    return Err(violation(
                        "blocks are still owed by the source; resuming would make them unreadable",
                    ));
                }
                self.state = S::Committed;
                DestAction::Resume
            }
            (S::InDoubt, E::OperatorDiscard) => {
                self.state = S::Discarded;
                DestAction::Discard
            }
            (_, E::Abort | E::Lost | E::VerifyDone(false)) => self.fail(),
            #[cfg(test)]
            (S::InDoubt, E::Commit)
                if self.mutation == Some(super::model::Mutation::DestTakesLateCommit) =>
            {
                self.state = S::Committed;
                DestAction::Resume
            }
            // Once the guest is ours, or held for an operator, late or repeated messages
            // change nothing.
            (S::Committed | S::PostCopy | S::Running | S::Held | S::InDoubt, E::Commit) => {
                DestAction::Continue
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

    fn verified(channels: usize, owed: bool) -> DestSession {
        let mut s = DestSession::new(channels);
        s.on(DestEvent::Hello).unwrap();
        if owed {
            s.on(DestEvent::Owed).unwrap();
        }
        for ch in 0..channels {
            s.on(DestEvent::FinalBarrier(ch)).unwrap();
        }
        s.on(DestEvent::State).unwrap();
        assert_eq!(s.on(DestEvent::Manifest).unwrap(), DestAction::Verify);
        assert_eq!(
            s.on(DestEvent::VerifyDone(true)).unwrap(),
            DestAction::AckVerified
        );
        s
    }

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
        assert_eq!(
            s.on(DestEvent::ResumeDone(true)).unwrap(),
            DestAction::ConfirmResumed
        );
        assert_eq!(s.state(), DestState::Running);
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
        assert!(s.on(DestEvent::OperatorResume).is_err());
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

        let mut s = verified(1, false);
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::HoldInDoubt);
        assert_eq!(s.state(), DestState::InDoubt);
        // Only an operator resolves it.
        assert_eq!(s.on(DestEvent::Commit).unwrap(), DestAction::Continue);
        assert!(s.on(DestEvent::OwedArrived).is_ok());
        assert_eq!(s.state(), DestState::InDoubt);
        assert_eq!(s.on(DestEvent::Abort).unwrap(), DestAction::Continue);
        assert_eq!(s.state(), DestState::InDoubt);
        assert_eq!(s.on(DestEvent::OperatorResume).unwrap(), DestAction::Resume);

        // In doubt while owing post-copy blocks: they can only come from the source.
        let mut s = verified(1, true);
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::HoldInDoubt);
        assert!(s.on(DestEvent::OperatorResume).is_err());
        assert_eq!(
            s.on(DestEvent::OperatorDiscard).unwrap(),
            DestAction::Discard
        );
    }

    #[test]
    fn a_committed_guest_is_never_discarded() {
        let mut s = verified(1, true);
        s.on(DestEvent::Commit).unwrap();
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::Continue);
        assert_eq!(s.on(DestEvent::Abort).unwrap(), DestAction::Continue);
        assert_eq!(
            s.on(DestEvent::ResumeDone(true)).unwrap(),
            DestAction::ConfirmResumed
        );
        assert_eq!(s.state(), DestState::PostCopy);
        // The source died during the push: held, and not resumable while blocks are owed.
        assert_eq!(s.on(DestEvent::Lost).unwrap(), DestAction::Hold);
        assert_eq!(s.state(), DestState::Held);
        assert!(s.on(DestEvent::OperatorResume).is_err());
        assert!(s.on(DestEvent::OperatorDiscard).is_err());
        assert_eq!(s.fail(), DestAction::Continue);
        assert_eq!(s.state(), DestState::Held);
        // A recovering source delivered them: resumable now, by the operator.
        assert_eq!(s.on(DestEvent::OwedArrived).unwrap(), DestAction::Continue);
        assert_eq!(s.state(), DestState::Held);
        assert_eq!(s.on(DestEvent::OperatorResume).unwrap(), DestAction::Resume);

        let mut s = verified(1, false);
        s.on(DestEvent::Commit).unwrap();
        assert_eq!(
            s.on(DestEvent::ResumeDone(false)).unwrap(),
            DestAction::Hold
        );
        assert_eq!(s.on(DestEvent::OperatorResume).unwrap(), DestAction::Resume);
    }
}
