//! The source's side of the commit protocol.
//!
//! ```text
//! Handshake → Copying → Paused → AwaitVerified → Committed → AwaitResumed → [PostCopy] → AwaitVerdict → Done
//!     \__________\_________\___________\              \____________\______________\
//!        (error, timeout, cancel, abort, violation)       (error, timeout, lost)
//!                         ↓                                          ↓
//!                 Kept (resumed here)                       HandedOver (never resumes)
//! ```
//!
//! The source owns the guest until the destination acknowledged a verified, durable final
//! state. The decision to hand over is taken when `verified` arrives, *before* `commit` is
//! sent: from then on nothing makes the source resume, because the destination may hold
//! the commit and run the guest.

use super::{violation, ProtocolError};

/// The source's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceState {
    /// Hello sent, waiting for the welcome.
    Handshake,
    /// Pre-copy rounds (storage, then memory) while the guest runs here.
    Copying,
    /// Stop-and-copy: the guest is paused; the rest, the state and the manifest go out.
    Paused,
    /// Waiting for the destination's verification.
    AwaitVerified,
    /// Handed over: `commit` is being sent. The guest never runs here again.
    Committed,
    /// Waiting for the destination to confirm the guest runs there.
    AwaitResumed,
    /// Storage post-copy: pushing the blocks the destination still owes its guest.
    PostCopy,
    /// Waiting for the destination's self-check.
    AwaitVerdict,
    /// The guest runs on the destination, confirmed.
    Done,
    /// The migration failed before the hand-over: the guest runs here.
    Kept,
    /// The migration failed after the hand-over: the guest is the destination's, held or
    /// running there; it never runs here again.
    HandedOver,
}

impl SourceState {
    /// The name an operator sees (`ferry status`): resolving an in-doubt destination
    /// depends on it, so after a hand-over it is never `running`.
    pub fn name(self) -> &'static str {
        match self {
            SourceState::Handshake
            | SourceState::Copying
            | SourceState::Paused
            | SourceState::AwaitVerified => "migrating",
            SourceState::Committed
            | SourceState::AwaitResumed
            | SourceState::PostCopy
            | SourceState::AwaitVerdict
            | SourceState::HandedOver => "handed-over",
            SourceState::Done => "migrated-away",
            SourceState::Kept => "running",
        }
    }

    /// Whether the guest was handed over (the source must never resume it).
    pub fn handed_over(self) -> bool {
        matches!(
            self,
            SourceState::Committed
                | SourceState::AwaitResumed
                | SourceState::PostCopy
                | SourceState::AwaitVerdict
                | SourceState::Done
                | SourceState::HandedOver
        )
    }
}

/// Events the source driver feeds in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceEvent {
    /// The destination accepted the handshake.
    Welcome,
    /// The convergence policy chose to stop and copy.
    Converged,
    /// The last data, the state and the manifest are sent.
    FinalSent,
    /// The destination verified the final state and made it durable.
    Verified,
    /// `commit` is written.
    CommitSent,
    /// The destination runs the guest.
    Resumed,
    /// The destination has every owed block.
    PostcopyDone,
    /// The destination's self-check arrived.
    Verdict,
    /// Anything that stops the migration: an error, a timeout, a cancel, a refusal or
    /// abort from the destination, a lost link, a protocol violation.
    Failed,
}

/// What the driver must do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceAction {
    /// Go on with what the state says (copy rounds, wait for the next message).
    Continue,
    /// Pause the guest and send the rest.
    Pause,
    /// Hand over: send `commit`; the guest's vCPUs stop for good.
    Commit,
    /// Push the owed blocks (storage post-copy).
    PushOwed,
    /// Wait for the destination's self-check.
    AwaitVerdict,
    /// Report success.
    Finish,
    /// Tell the destination to discard (best effort), give the fetched dirty bits back
    /// and resume the guest here.
    ResumeHere,
    /// Report the failure; the guest is the destination's.
    ReportHandedOver,
}

/// The source's session state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceSession {
    state: SourceState,
    postcopy: bool,
    #[cfg(test)]
    pub(crate) mutation: Option<super::model::Mutation>,
}

impl SourceSession {
    /// A session; `postcopy` when owed blocks move after the hand-over.
    pub fn new(postcopy: bool) -> Self {
        Self {
            state: SourceState::Handshake,
            postcopy,
            #[cfg(test)]
            mutation: None,
        }
    }

    /// A session that recovers an interrupted storage post-copy: the guest was handed over
    /// long ago, and only the owed blocks remain to push.
    pub fn recovering() -> Self {
        Self {
            state: SourceState::PostCopy,
            postcopy: true,
            #[cfg(test)]
            mutation: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// Whether owed blocks move after the hand-over.
    pub fn is_postcopy(&self) -> bool {
        self.postcopy
    }

    /// A hybrid migration switched to post-copy: owed units move after the hand-over.
    /// Only before the decision to hand over; later it is a violation.
    pub fn switch_to_postcopy(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            SourceState::Handshake | SourceState::Copying | SourceState::Paused => {
                self.postcopy = true;
                Ok(())
            }
            s => Err(violation(format!("switch to post-copy in state {s:?}"))),
        }
    }

    /// Feeds one event. An event that is not valid in the current state is a protocol
    /// violation: the caller reports it and feeds [`SourceEvent::Failed`].
    pub fn on(&mut self, ev: SourceEvent) -> Result<SourceAction, ProtocolError> {
        use SourceEvent as E;
        use SourceState as S;
        let (next, action) = match (self.state, ev) {
            (S::Handshake, E::Welcome) => (S::Copying, SourceAction::Continue),
            (S::Copying, E::Converged) => (S::Paused, SourceAction::Pause),
            (S::Paused, E::FinalSent) => (S::AwaitVerified, SourceAction::Continue),
            // The decision: from here on the source never resumes.
            (S::AwaitVerified, E::Verified) => (S::Committed, SourceAction::Commit),
            (S::Committed, E::CommitSent) => (S::AwaitResumed, SourceAction::Continue),
            (S::AwaitResumed, E::Resumed) if self.postcopy => (S::PostCopy, SourceAction::PushOwed),
            (S::AwaitResumed, E::Resumed) => (S::AwaitVerdict, SourceAction::AwaitVerdict),
            (S::PostCopy, E::PostcopyDone) => (S::AwaitVerdict, SourceAction::AwaitVerdict),
            (S::AwaitVerdict, E::Verdict) => (S::Done, SourceAction::Finish),
            (_, E::Failed) => return Ok(self.fail()),
            (state, ev) => {
                return Err(violation(format!("{ev:?} is not valid in state {state:?}")));
            }
        };
        self.state = next;
        Ok(action)
    }

    /// A failure of any kind: resume here before the hand-over, never after it.
    pub fn fail(&mut self) -> SourceAction {
        use SourceState as S;
        match self.state {
            S::Handshake | S::Copying | S::Paused | S::AwaitVerified => {
                self.state = S::Kept;
                SourceAction::ResumeHere
            }
            #[cfg(test)]
            S::Committed | S::AwaitResumed
                if self.mutation == Some(super::model::Mutation::SourceResumesAfterCommit) =>
            {
                self.state = S::Kept;
                SourceAction::ResumeHere
            }
            S::Committed | S::AwaitResumed | S::PostCopy => {
                self.state = S::HandedOver;
                SourceAction::ReportHandedOver
            }
            // Confirmed running there; only the self-check is missing.
            S::AwaitVerdict => {
                self.state = S::Done;
                SourceAction::Finish
            }
            S::Done | S::Kept | S::HandedOver => SourceAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(s: &mut SourceSession, events: &[SourceEvent]) {
        for e in events {
            s.on(*e).unwrap();
        }
    }

    #[test]
    fn happy_path_with_and_without_postcopy() {
        use SourceEvent as E;
        let mut s = SourceSession::new(false);
        walk(&mut s, &[E::Welcome, E::Converged, E::FinalSent]);
        assert_eq!(s.on(E::Verified).unwrap(), SourceAction::Commit);
        assert_eq!(s.state().name(), "handed-over");
        walk(&mut s, &[E::CommitSent]);
        assert_eq!(s.on(E::Resumed).unwrap(), SourceAction::AwaitVerdict);
        assert_eq!(s.on(E::Verdict).unwrap(), SourceAction::Finish);
        assert_eq!(s.state().name(), "migrated-away");

        let mut s = SourceSession::new(true);
        walk(
            &mut s,
            &[E::Welcome, E::Converged, E::FinalSent, E::Verified],
        );
        walk(&mut s, &[E::CommitSent]);
        assert_eq!(s.on(E::Resumed).unwrap(), SourceAction::PushOwed);
        assert_eq!(s.on(E::PostcopyDone).unwrap(), SourceAction::AwaitVerdict);
    }

    #[test]
    fn failures_resume_before_the_commit_and_never_after() {
        use SourceEvent as E;
        let prefixes: [&[E]; 4] = [
            &[],
            &[E::Welcome],
            &[E::Welcome, E::Converged],
            &[E::Welcome, E::Converged, E::FinalSent],
        ];
        for p in prefixes {
            let mut s = SourceSession::new(false);
            walk(&mut s, p);
            assert_eq!(s.on(E::Failed).unwrap(), SourceAction::ResumeHere, "{p:?}");
            assert_eq!(s.state().name(), "running");
        }
        let after: [&[E]; 3] = [
            &[E::Welcome, E::Converged, E::FinalSent, E::Verified],
            &[
                E::Welcome,
                E::Converged,
                E::FinalSent,
                E::Verified,
                E::CommitSent,
            ],
            &[
                E::Welcome,
                E::Converged,
                E::FinalSent,
                E::Verified,
                E::CommitSent,
                E::Resumed,
            ],
        ];
        for p in after {
            let mut s = SourceSession::new(true);
            walk(&mut s, p);
            assert_eq!(s.on(E::Failed).unwrap(), SourceAction::ReportHandedOver);
            assert_eq!(s.state().name(), "handed-over", "{p:?}");
            assert!(s.state().handed_over());
        }
    }

    #[test]
    fn out_of_order_events_are_violations() {
        use SourceEvent as E;
        let mut s = SourceSession::new(false);
        assert!(s.on(E::Verified).is_err());
        assert!(s.on(E::Resumed).is_err());
        walk(&mut s, &[E::Welcome]);
        assert!(s.on(E::Welcome).is_err());
        assert!(s.on(E::CommitSent).is_err());
    }
}
