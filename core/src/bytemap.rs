//! [`DirtyBytes`]: a live dirty log with one byte per page, for writers that dirty guest
//! memory at memory speed (the sim guest's vCPU threads).
//!
//! Marking is one plain store (`mov`), never a locked read-modify-write: a locked
//! instruction waits for every store still in flight, so on a guest writing pages that
//! miss the cache it stalled the writer on each page's first write of a round (16% of the
//! sim workload's speed, `ferry bench overhead`). A bit per page cannot be set without a
//! read-modify-write; a byte can. The store is also unconditional: skipping it when the
//! byte already reads as set would let a write slip past a harvest that is under way (the
//! data still in the store buffer, the mark already taken), so the page would be read
//! stale and never marked again.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::bitmap::Bitmap;

/// A live dirty log, one byte per unit.
#[derive(Debug)]
pub struct DirtyBytes {
    bytes: Box<[AtomicU8]>,
}

impl DirtyBytes {
    /// An all-clear log of `units` units.
    pub fn new(units: u64) -> Self {
        Self {
            bytes: (0..units).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Number of units tracked.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// True when the log tracks nothing.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Marks unit `i` dirty (out of range: ignored). Release: the write that dirtied the
    /// unit happens-before a harvest that takes this mark, so whoever takes it and then
    /// reads the unit sees that write, or finds the mark again at the next harvest.
    #[inline]
    pub fn set(&self, i: u64) {
        if let Some(b) = self.bytes.get(i as usize) {
            b.store(1, Ordering::Release);
        }
    }

    /// Takes every mark: a snapshot of the dirty units, the log left clear of them.
    pub fn take(&self) -> Bitmap {
        let mut out = Bitmap::new(self.len());
        for (i, b) in self.bytes.iter().enumerate() {
            // A clean byte is skipped with a plain load; a mark that lands after it stays
            // for the next harvest.
            if b.load(Ordering::Relaxed) != 0 && b.swap(0, Ordering::AcqRel) != 0 {
                out.set(i as u64);
            }
        }
        out
    }

    /// Clears every mark.
    pub fn clear(&self) {
        for b in self.bytes.iter() {
            b.store(0, Ordering::Release);
        }
    }

    /// Merges a snapshot back (after a failed send), over the common range.
    pub fn merge(&self, other: &Bitmap) {
        for i in other.iter_ones() {
            self.set(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_once_and_merged_back() {
        let log = DirtyBytes::new(200);
        for i in [0, 63, 64, 199, 500] {
            log.set(i);
        }
        let got = log.take();
        assert_eq!(got.iter_ones().collect::<Vec<_>>(), vec![0, 63, 64, 199]);
        assert_eq!(log.take().count(), 0, "taken marks are gone");
        log.merge(&got);
        log.set(7);
        assert_eq!(
            log.take().iter_ones().collect::<Vec<_>>(),
            vec![0, 7, 63, 64, 199]
        );
        log.set(5);
        log.clear();
        assert_eq!(log.take().count(), 0);
    }

    #[test]
    fn concurrent_writers_lose_no_mark() {
        let log = std::sync::Arc::new(DirtyBytes::new(4096));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let log = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in (t..4096).step_by(4) {
                        log.set(i);
                    }
                })
            })
            .collect();
        let mut seen = Bitmap::new(4096);
        while writers.iter().any(|w| !w.is_finished()) {
            seen.merge(&log.take());
        }
        for w in writers {
            w.join().unwrap();
        }
        seen.merge(&log.take());
        assert_eq!(seen.count(), 4096);
    }
}
