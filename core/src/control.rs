//! Live control of a running migration, shared between the engine and whoever steers it
//! (`ferry cancel`, `ferry set`, `ferry postcopy`, Ctrl-C): the engine looks at it between
//! frames and while it waits, so a request takes effect within about 100 ms.
//!
//! Cancelling races with the hand-over by design: the engine takes its decision to commit
//! through the same atomic step a cancel does, so either the cancel comes first (the
//! source resumes, the destination discards) or the commit does (the cancel is refused as
//! too late), never both.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const COMMITTED: u8 = 2;

/// What a cancel request achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The migration stops; the source keeps (or takes back) the guest.
    Cancelling,
    /// The source already handed the guest over: nothing to cancel.
    TooLate,
}

/// Live controls of one migration.
#[derive(Debug, Default)]
pub struct MigrationControl {
    state: AtomicU8,
    postcopy: AtomicBool,
    /// A new `--max-bandwidth`, bytes per second (`u64::MAX`: lift the cap), pending.
    max_bandwidth: AtomicU64,
    /// A new downtime target, microseconds, pending.
    downtime_us: AtomicU64,
    changed: AtomicBool,
}

/// Tuning an operator asked for since the engine last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuning {
    /// New bandwidth cap: `Some(None)` lifts it.
    pub max_bandwidth: Option<Option<u64>>,
    /// New downtime target.
    pub downtime: Option<Duration>,
}

impl MigrationControl {
    /// Asks the migration to stop and leave the guest with the source.
    pub fn cancel(&self) -> CancelOutcome {
        match self
            .state
            .compare_exchange(RUNNING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => CancelOutcome::Cancelling,
            Err(CANCELLED) => CancelOutcome::Cancelling,
            Err(_) => CancelOutcome::TooLate,
        }
    }

    /// Whether a cancel was asked for before the hand-over.
    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) == CANCELLED
    }

    /// Whether the source decided to hand over.
    pub fn is_committed(&self) -> bool {
        self.state.load(Ordering::Acquire) == COMMITTED
    }

    /// The engine's decision to hand over; false when a cancel came first.
    pub fn commit(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Asks a hybrid migration to switch to post-copy.
    pub fn request_postcopy(&self) {
        self.postcopy.store(true, Ordering::Release);
    }

    /// Whether a switch to post-copy was asked for.
    pub fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::Acquire)
    }

    /// Sets a new bandwidth cap (`None` lifts it) for the engine to apply.
    pub fn set_max_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.max_bandwidth.store(
            bytes_per_second.unwrap_or(u64::MAX).max(1),
            Ordering::Release,
        );
        self.changed.store(true, Ordering::Release);
    }

    /// Sets a new downtime target for the engine to apply.
    pub fn set_downtime(&self, target: Duration) {
        self.downtime_us.store(
            u64::try_from(target.as_micros()).unwrap_or(u64::MAX).max(1),
            Ordering::Release,
        );
        self.changed.store(true, Ordering::Release);
    }

    /// What was asked for since the last call (each change is handed out once).
    pub fn take_tuning(&self) -> Tuning {
        if !self.changed.swap(false, Ordering::AcqRel) {
            return Tuning::default();
        }
        let bw = self.max_bandwidth.swap(0, Ordering::AcqRel);
        let dt = self.downtime_us.swap(0, Ordering::AcqRel);
        Tuning {
            max_bandwidth: match bw {
                0 => None,
                u64::MAX => Some(None),
                r => Some(Some(r)),
            },
            downtime: (dt != 0).then(|| Duration::from_micros(dt)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_commit_exclude_each_other() {
        let c = MigrationControl::default();
        assert_eq!(c.cancel(), CancelOutcome::Cancelling);
        assert!(!c.commit(), "committed after a cancel");
        assert!(c.is_cancelled());
        let c = MigrationControl::default();
        assert!(c.commit());
        assert_eq!(c.cancel(), CancelOutcome::TooLate);
        assert!(!c.is_cancelled() && c.is_committed());
    }

    #[test]
    fn tuning_is_handed_out_once() {
        let c = MigrationControl::default();
        assert_eq!(c.take_tuning(), Tuning::default());
        c.set_max_bandwidth(Some(1_000_000));
        c.set_downtime(Duration::from_millis(50));
        assert_eq!(
            c.take_tuning(),
            Tuning {
                max_bandwidth: Some(Some(1_000_000)),
                downtime: Some(Duration::from_millis(50)),
            }
        );
        assert_eq!(c.take_tuning(), Tuning::default());
        c.set_max_bandwidth(None);
        assert_eq!(c.take_tuning().max_bandwidth, Some(None));
    }
}
