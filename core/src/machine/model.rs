//! An exhaustive model check of the commit protocol: the real [`SourceSession`] and
//! [`DestSession`] run together with no threads, over a network that loses, duplicates,
//! delays and reorders messages, with either process crashing at any step, timers firing
//! at any moment (early or late) and an operator resolving held guests. Every reachable
//! state is visited breadth first and checked against the safety properties; a violation
//! comes with the shortest trace that reaches it.
//!
//! The drivers are modelled by what they do with each action (pause, send, resume,
//! discard); the decisions are the machines' own, unchanged.

use std::collections::{HashMap, VecDeque};

use super::{
    DestAction, DestEvent, DestSession, DestState, SourceAction, SourceEvent, SourceSession,
    SourceState,
};

/// A commit-protocol message, as the model abstracts the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// Source → destination: the handshake.
    Hello,
    /// Destination → source: the handshake accepted.
    Welcome,
    /// Source → destination: storage post-copy announces owed blocks.
    Owed,
    /// Source → destination: last data, state and manifest.
    Final,
    /// Destination → source: verified and durable.
    Verified,
    /// Source → destination: hand-over.
    Commit,
    /// Destination → source: the guest runs there.
    Resumed,
    /// Source → destination: the owed blocks.
    Push,
    /// Destination → source: the self-check (with post-copy: after every owed block
    /// arrived, so it confirms the push too).
    Verdict,
    /// Either way: give up.
    Abort,
}

/// What a guest copy is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Copy {
    /// No copy (a destination before the handshake).
    None,
    /// Running.
    Running,
    /// Paused, but resumable: it still counts as a copy.
    Paused,
    /// Stopped for good after the hand-over.
    Stopped,
    /// Thrown away.
    Discarded,
}

/// A deliberately broken transition, to show the check catches it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The source resumes after a failure once it decided to commit.
    SourceResumesAfterCommit,
    /// The destination discards when the hand-over does not come.
    DestDiscardsWhenInDoubt,
    /// An in-doubt destination takes a commit that arrives late.
    DestTakesLateCommit,
    /// The destination discards a guest it was handed when the link fails.
    DestDiscardsCommitted,
}

/// A safety property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// Never two running copies.
    NeverTwoRunning,
    /// While both processes live, some copy runs or is held (paused, resumable).
    NeverNoCopy,
    /// A guest the destination was handed is never discarded.
    CommittedNeverDiscarded,
    /// An in-doubt guest leaves that state only by an operator's decision.
    InDoubtOnlyByOperator,
}

/// What the model explores.
#[derive(Debug, Clone, Copy)]
pub struct ModelConfig {
    /// Post-copy (owed blocks or pages after the hand-over) from the start.
    pub postcopy: bool,
    /// Hybrid: the source may switch to post-copy at any point of pre-copy.
    pub hybrid: bool,
    /// How many messages the network may lose or duplicate in one run.
    pub network_faults: u8,
    /// Whether processes may crash.
    pub crashes: bool,
}

/// One state of the two processes and the network between them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct World {
    src: SourceSession,
    src_alive: bool,
    src_copy: Copy,
    dst: DestSession,
    dst_alive: bool,
    dst_copy: Copy,
    /// In flight to the destination, kept sorted: a multiset, so any order of delivery.
    to_dst: Vec<Msg>,
    to_src: Vec<Msg>,
    faults_left: u8,
    crashes_left: u8,
    /// The destination was handed the guest at some point.
    dst_committed: bool,
    /// Hybrid: the source may still switch to post-copy.
    may_switch: bool,
}

/// A step of the model, for traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The source's driver made progress on its own (a round, a send).
    SourceProgress,
    /// A message reached the destination (with verification passing or failing).
    DeliverToDest(Msg, bool),
    /// A message reached the source.
    DeliverToSource(Msg),
    /// The network lost a message.
    Lose(Msg),
    /// The network duplicated a message.
    Duplicate(Msg),
    /// The source gave up waiting (timeout, cancel, error).
    SourceTimer,
    /// The destination gave up waiting.
    DestTimer,
    /// The destination failed to resume the guest.
    DestResumeFails,
    /// A process died.
    Crash(&'static str),
    /// An operator resolved a held guest.
    Operator(&'static str),
    /// A handed-over source pushed the blocks a held destination still owed (post-copy
    /// recovery over a new connection).
    Recover,
    /// A hybrid source switched to post-copy (its policy, or an operator).
    SwitchToPostcopy,
}

/// What the check found.
#[derive(Debug)]
pub struct CheckReport {
    /// Distinct states reached.
    pub states: usize,
    /// Transitions explored.
    pub transitions: usize,
    /// Terminal states (nothing more can happen).
    pub terminal: usize,
    /// The first violation of each property found, with its shortest trace.
    pub violations: Vec<(Property, Vec<Step>)>,
}

impl World {
    fn new(cfg: &ModelConfig) -> Self {
        let mut w = World {
            src: SourceSession::new(cfg.postcopy),
            src_alive: true,
            src_copy: Copy::Running,
            dst: DestSession::new(1),
            dst_alive: true,
            dst_copy: Copy::None,
            to_dst: Vec::new(),
            to_src: Vec::new(),
            faults_left: cfg.network_faults,
            crashes_left: u8::from(cfg.crashes) * 2,
            dst_committed: false,
            may_switch: cfg.hybrid,
        };
        w.send_to_dst(Msg::Hello);
        w
    }

    fn send_to_dst(&mut self, m: Msg) {
        if self.dst_alive {
            self.to_dst.push(m);
            self.to_dst.sort();
        }
    }

    fn send_to_src(&mut self, m: Msg) {
        if self.src_alive {
            self.to_src.push(m);
            self.to_src.sort();
        }
    }

    /// The source driver: what it does for each of the machine's actions.
    fn src_do(&mut self, a: SourceAction) {
        match a {
            SourceAction::Pause => self.src_copy = Copy::Paused,
            SourceAction::Commit => self.src_copy = Copy::Stopped,
            SourceAction::PushOwed => self.send_to_dst(Msg::Push),
            SourceAction::ResumeHere => {
                self.send_to_dst(Msg::Abort);
                self.src_copy = Copy::Running;
            }
            SourceAction::Continue
            | SourceAction::AwaitVerdict
            | SourceAction::Finish
            | SourceAction::ReportHandedOver => {}
        }
    }

    fn src_on(&mut self, ev: SourceEvent) {
        let a = self.src.on(ev).unwrap_or_else(|_| self.src.fail());
        self.src_do(a);
    }

    /// The destination driver: what it does for each of the machine's actions.
    fn dst_do(&mut self, a: DestAction, verify_ok: bool, resume_ok: bool) {
        match a {
            DestAction::Continue => {}
            DestAction::Verify => self.dst_on(DestEvent::VerifyDone(verify_ok), true, true),
            DestAction::AckVerified => self.send_to_src(Msg::Verified),
            DestAction::Resume => {
                self.dst_committed = true;
                if resume_ok {
                    self.dst_copy = Copy::Running;
                }
                self.dst_on(DestEvent::ResumeDone(resume_ok), true, true);
            }
            DestAction::ConfirmResumed => {
                self.send_to_src(Msg::Resumed);
                if !self.dst.owes_blocks() {
                    self.send_to_src(Msg::Verdict);
                }
            }
            DestAction::Discard => {
                self.send_to_src(Msg::Abort);
                self.dst_copy = Copy::Discarded;
            }
            DestAction::HoldInDoubt | DestAction::Hold => {
                if self.dst_copy != Copy::Discarded {
                    self.dst_copy = Copy::Paused;
                }
            }
        }
    }

    fn dst_on(&mut self, ev: DestEvent, verify_ok: bool, resume_ok: bool) {
        let a = self.dst.on(ev).unwrap_or_else(|_| self.dst.fail());
        self.dst_do(a, verify_ok, resume_ok);
    }

    fn deliver_to_dst(&mut self, m: Msg, verify_ok: bool) {
        match m {
            Msg::Hello => {
                if self.dst.state() == DestState::AwaitHello {
                    self.dst_copy = Copy::Paused;
                    self.send_to_src(Msg::Welcome);
                }
                self.dst_on(DestEvent::Hello, true, true);
            }
            Msg::Owed => self.dst_on(DestEvent::Owed, true, true),
            Msg::Final => {
                for ev in [DestEvent::FinalBarrier(0), DestEvent::State] {
                    if let Err(_) | Ok(DestAction::Discard) = self.dst.on(ev).map(|a| {
                        if a == DestAction::Continue {
                            a
                        } else {
                            DestAction::Discard
                        }
                    }) {
                        let a = self.dst.fail();
                        self.dst_do(a, true, true);
                        return;
                    }
                }
                self.dst_on(DestEvent::Manifest, verify_ok, true);
            }
            Msg::Commit => self.dst_on(DestEvent::Commit, true, true),
            Msg::Push => {
                if self.dst.state() == DestState::PostCopy {
                    self.dst_on(DestEvent::PostcopyDone, true, true);
                    self.send_to_src(Msg::Verdict);
                }
                // A push to a held guest or a repeat: the blocks are ignored.
            }
            Msg::Abort => self.dst_on(DestEvent::Abort, true, true),
            Msg::Welcome | Msg::Verified | Msg::Resumed | Msg::Verdict => {
                self.dst_on(DestEvent::Lost, true, true)
            }
        }
    }

    fn deliver_to_src(&mut self, m: Msg) {
        let ev = match m {
            Msg::Welcome => SourceEvent::Welcome,
            Msg::Verified => SourceEvent::Verified,
            Msg::Resumed => SourceEvent::Resumed,
            Msg::Verdict => SourceEvent::Verdict,
            _ => SourceEvent::Failed,
        };
        // With post-copy the verdict confirms every owed block arrived.
        if m == Msg::Verdict && self.src.state() == SourceState::PostCopy {
            self.src_on(SourceEvent::PostcopyDone);
        }
        self.src_on(ev);
    }

    /// The source's own progress: rounds converge, the final state goes out, commit goes
    /// out. Each is a separate step, so failures can fall between them.
    fn src_progress(&mut self) -> bool {
        match self.src.state() {
            SourceState::Copying => self.src_on(SourceEvent::Converged),
            SourceState::Paused => {
                if self.src.is_postcopy() {
                    self.send_to_dst(Msg::Owed);
                }
                self.send_to_dst(Msg::Final);
                self.src_on(SourceEvent::FinalSent);
            }
            SourceState::Committed => {
                self.send_to_dst(Msg::Commit);
                self.src_on(SourceEvent::CommitSent);
            }
            _ => return false,
        }
        true
    }

    fn src_waiting(&self) -> bool {
        !matches!(
            self.src.state(),
            SourceState::Done | SourceState::Kept | SourceState::HandedOver
        )
    }

    fn dst_waiting(&self) -> bool {
        matches!(
            self.dst.state(),
            DestState::AwaitHello
                | DestState::Receiving
                | DestState::Verifying
                | DestState::AwaitCommit
                | DestState::PostCopy
        )
    }

    /// Post-copy recovery: a live, handed-over source and a live destination that holds the
    /// guest and still owes blocks.
    fn recoverable(&self) -> bool {
        self.src_alive
            && self.dst_alive
            && self.src.state() == SourceState::HandedOver
            && self.src.is_postcopy()
            && self.dst.owes_blocks()
            && matches!(self.dst.state(), DestState::InDoubt | DestState::Held)
    }

    /// An operator resolving a held guest asks the source what it did.
    fn operator(&self) -> Option<DestEvent> {
        if !matches!(self.dst.state(), DestState::InDoubt | DestState::Held) {
            return None;
        }
        if !self.src_alive {
            // The source's copy died with it.
            return Some(DestEvent::OperatorResume);
        }
        match self.src.state().name() {
            "running" => Some(DestEvent::OperatorDiscard),
            "handed-over" | "migrated-away" => Some(DestEvent::OperatorResume),
            _ => None,
        }
    }

    fn successors(&self) -> Vec<(Step, World)> {
        let mut out = Vec::new();
        if self.src_alive && self.src_waiting() {
            let mut w = self.clone();
            if w.src_progress() {
                out.push((Step::SourceProgress, w));
            }
            let mut w = self.clone();
            w.src_on(SourceEvent::Failed);
            out.push((Step::SourceTimer, w));
        }
        if self.dst_alive && self.dst_waiting() {
            let mut w = self.clone();
            w.dst_on(DestEvent::Lost, true, true);
            out.push((Step::DestTimer, w));
        }
        let mut seen = Vec::new();
        for (i, m) in self.to_dst.iter().enumerate() {
            if seen.contains(m) {
                continue;
            }
            seen.push(*m);
            for ok in [true, false] {
                if !ok && *m != Msg::Final {
                    continue;
                }
                let mut w = self.clone();
                w.to_dst.remove(i);
                w.deliver_to_dst(*m, ok);
                out.push((Step::DeliverToDest(*m, ok), w));
            }
            if *m == Msg::Commit {
                // The destination cannot resume the guest it was handed.
                let mut w = self.clone();
                w.to_dst.remove(i);
                if let Ok(a) = w.dst.on(DestEvent::Commit) {
                    w.dst_do(a, true, false);
                }
                out.push((Step::DestResumeFails, w));
            }
            self.network_faults(&mut out, *m, |w| &mut w.to_dst, i);
        }
        seen.clear();
        for (i, m) in self.to_src.iter().enumerate() {
            if seen.contains(m) {
                continue;
            }
            seen.push(*m);
            let mut w = self.clone();
            w.to_src.remove(i);
            w.deliver_to_src(*m);
            out.push((Step::DeliverToSource(*m), w));
            self.network_faults(&mut out, *m, |w| &mut w.to_src, i);
        }
        if self.crashes_left > 0 {
            if self.src_alive {
                let mut w = self.clone();
                w.crashes_left -= 1;
                w.src_alive = false;
                w.to_src.clear();
                out.push((Step::Crash("source"), w));
            }
            if self.dst_alive {
                let mut w = self.clone();
                w.crashes_left -= 1;
                w.dst_alive = false;
                w.to_dst.clear();
                out.push((Step::Crash("destination"), w));
            }
        }
        if self.may_switch && self.src_alive && !self.src.is_postcopy() {
            let mut w = self.clone();
            w.may_switch = false;
            if w.src.switch_to_postcopy().is_ok() {
                out.push((Step::SwitchToPostcopy, w));
            }
        }
        if self.recoverable() {
            let mut w = self.clone();
            if w.dst.on(DestEvent::OwedArrived).is_ok() {
                let mut src = SourceSession::recovering();
                #[cfg(test)]
                {
                    src.mutation = w.src.mutation;
                }
                let _ = src.on(SourceEvent::PostcopyDone);
                let _ = src.on(SourceEvent::Verdict);
                w.src = src;
                out.push((Step::Recover, w));
            }
        }
        if self.dst_alive {
            if let Some(ev) = self.operator() {
                let mut w = self.clone();
                if let Ok(a) = w.dst.on(ev) {
                    w.dst_do(a, true, true);
                    let who = if ev == DestEvent::OperatorResume {
                        "resume"
                    } else {
                        "discard"
                    };
                    out.push((Step::Operator(who), w));
                }
            }
        }
        out
    }

    fn network_faults(
        &self,
        out: &mut Vec<(Step, World)>,
        m: Msg,
        queue: impl Fn(&mut World) -> &mut Vec<Msg>,
        i: usize,
    ) {
        if self.faults_left == 0 {
            return;
        }
        let mut w = self.clone();
        w.faults_left -= 1;
        queue(&mut w).remove(i);
        out.push((Step::Lose(m), w));
        let mut w = self.clone();
        w.faults_left -= 1;
        let q = queue(&mut w);
        q.push(m);
        q.sort();
        out.push((Step::Duplicate(m), w));
    }

    fn violations(&self) -> Vec<Property> {
        let mut v = Vec::new();
        let src_runs = self.src_alive && self.src_copy == Copy::Running;
        let dst_runs = self.dst_alive && self.dst_copy == Copy::Running;
        if src_runs && dst_runs {
            v.push(Property::NeverTwoRunning);
        }
        let held = |c: Copy| matches!(c, Copy::Running | Copy::Paused);
        if self.src_alive && self.dst_alive && !held(self.src_copy) && !held(self.dst_copy) {
            v.push(Property::NeverNoCopy);
        }
        if self.dst_committed && self.dst_copy == Copy::Discarded {
            v.push(Property::CommittedNeverDiscarded);
        }
        v
    }
}

/// Explores every reachable state of the pair under `cfg` and checks the properties.
pub fn check(cfg: &ModelConfig) -> CheckReport {
    check_from(World::new(cfg))
}

fn check_from(init: World) -> CheckReport {
    let mut states: Vec<World> = vec![init.clone()];
    let mut parent: Vec<Option<(usize, Step)>> = vec![None];
    let mut index: HashMap<World, usize> = HashMap::from([(init, 0)]);
    let mut queue = VecDeque::from([0usize]);
    let mut report = CheckReport {
        states: 0,
        transitions: 0,
        terminal: 0,
        violations: Vec::new(),
    };
    let trace = |parent: &[Option<(usize, Step)>], mut at: usize, last: Option<Step>| {
        let mut t: Vec<Step> = last.into_iter().collect();
        while let Some((p, s)) = &parent[at] {
            t.push(s.clone());
            at = *p;
        }
        t.reverse();
        t
    };
    while let Some(at) = queue.pop_front() {
        let w = states[at].clone();
        for p in w.violations() {
            if !report.violations.iter().any(|(q, _)| *q == p) {
                report.violations.push((p, trace(&parent, at, None)));
            }
        }
        let next = w.successors();
        if next.is_empty() {
            report.terminal += 1;
        }
        for (step, n) in next {
            report.transitions += 1;
            let by_operator = matches!(step, Step::Operator(_));
            if w.dst.state() == DestState::InDoubt
                && n.dst.state() != DestState::InDoubt
                && n.dst_alive
                && !by_operator
                && !report
                    .violations
                    .iter()
                    .any(|(q, _)| *q == Property::InDoubtOnlyByOperator)
            {
                report.violations.push((
                    Property::InDoubtOnlyByOperator,
                    trace(&parent, at, Some(step.clone())),
                ));
            }
            if !index.contains_key(&n) {
                let i = states.len();
                index.insert(n.clone(), i);
                states.push(n);
                parent.push(Some((at, step)));
                queue.push_back(i);
            }
        }
    }
    report.states = states.len();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> Vec<ModelConfig> {
        let mut v = Vec::new();
        for (postcopy, hybrid) in [(false, false), (true, false), (false, true)] {
            v.push(ModelConfig {
                postcopy,
                hybrid,
                network_faults: 4,
                crashes: true,
            });
        }
        v
    }

    #[test]
    fn every_interleaving_of_faults_keeps_the_safety_properties() {
        for cfg in configs() {
            let r = check(&cfg);
            println!(
                "model check {cfg:?}: {} states, {} transitions, {} terminal",
                r.states, r.transitions, r.terminal
            );
            assert!(r.violations.is_empty(), "{cfg:?}: {:#?}", r.violations);
            assert!(
                r.states > 1000,
                "the model explores too little: {}",
                r.states
            );
        }
    }

    #[test]
    fn the_happy_path_is_reachable_and_ends_with_one_running_copy() {
        let r = check(&ModelConfig {
            postcopy: true,
            hybrid: false,
            network_faults: 0,
            crashes: false,
        });
        assert!(r.violations.is_empty());
        assert!(r.terminal > 0);
    }

    fn broken(m: Mutation) -> CheckReport {
        let mut w = World::new(&configs()[1]);
        w.src.mutation = Some(m);
        w.dst.mutation = Some(m);
        check_from(w)
    }

    #[test]
    fn a_source_that_resumes_after_deciding_to_commit_is_caught() {
        let r = broken(Mutation::SourceResumesAfterCommit);
        let found: Vec<_> = r.violations.iter().map(|(p, _)| *p).collect();
        assert!(found.contains(&Property::NeverTwoRunning), "{found:?}");
        let (_, trace) = &r.violations[0];
        println!("counterexample: {trace:?}");
    }

    #[test]
    fn a_destination_that_discards_an_in_doubt_guest_is_caught() {
        let r = broken(Mutation::DestDiscardsWhenInDoubt);
        let found: Vec<_> = r.violations.iter().map(|(p, _)| *p).collect();
        assert!(found.contains(&Property::NeverNoCopy), "{found:?}");
    }

    #[test]
    fn a_destination_that_discards_a_committed_guest_is_caught() {
        let r = broken(Mutation::DestDiscardsCommitted);
        let found: Vec<_> = r.violations.iter().map(|(p, _)| *p).collect();
        assert!(
            found.contains(&Property::CommittedNeverDiscarded),
            "{found:?}"
        );
    }

    #[test]
    fn an_in_doubt_destination_that_resolves_itself_is_caught() {
        let r = broken(Mutation::DestTakesLateCommit);
        let found: Vec<_> = r.violations.iter().map(|(p, _)| *p).collect();
        assert!(
            found.contains(&Property::InDoubtOnlyByOperator),
            "{found:?}"
        );
    }
}
