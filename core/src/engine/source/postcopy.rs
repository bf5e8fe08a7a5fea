//! After the hand-over: the push of owed pages and blocks (post-copy), and the vCPU
//! throttle that helps pre-copy converge (auto-converge).

use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::unbounded;

use super::{block_channel, ms, page_channel, Control};
use crate::bitmap::Bitmap;
use crate::digest::DigestDelta;
use crate::report::{Progress, RoundReport};
use crate::wire::{BatchKind, Message, Phase, RoundEnd, MEMORY_SPACE};

use super::sender::*;
use super::session::*;
use super::*;

/// Units per slice of the push: pulls are looked at between slices.
const SLICE: usize = 256;

/// Pre-paging: the owed pages in the order they go, starting after the latest fault.
struct PageOrder {
    owed: Bitmap,
    sent: Bitmap,
    /// Where the background push continues.
    cursor: u64,
    left: u64,
}

impl PageOrder {
    fn new(owed: Bitmap) -> Self {
        let left = owed.count();
        Self {
            sent: Bitmap::new(owed.len()),
            owed,
            cursor: 0,
            left,
        }
    }

    /// A page the guest waits for: whether it still has to go (then it is taken). The
    /// background push continues right after it: the guest touches neighbours next.
    fn demand(&mut self, page: u64) -> bool {
        if page >= self.owed.len() || !self.owed.get(page) || self.sent.get(page) {
            return false;
        }
        self.sent.set(page);
        self.left -= 1;
        self.cursor = page + 1;
        true
    }

    /// Up to `n` more pages from the cursor on (wrapping), never one twice.
    fn next(&mut self, n: usize, out: &mut Vec<u64>) {
        let len = self.owed.len();
        let words = self.owed.words();
        let mut scanned = 0u64;
        let mut i = self.cursor % len.max(1);
        while out.len() < n && self.left > 0 && scanned < len + 64 {
            let w = (i / 64) as usize;
            let free = words[w] & !self.sent.words()[w] & (!0u64 << (i % 64));
            if free == 0 {
                let next = (w as u64 + 1) * 64;
                scanned += next - i;
                i = if next >= len { 0 } else { next };
                continue;
            }
            let p = w as u64 * 64 + u64::from(free.trailing_zeros());
            if p >= len {
                scanned += len - i;
                i = 0;
                continue;
            }
            self.sent.set(p);
            self.left -= 1;
            out.push(p);
            scanned += p + 1 - i;
            i = if p + 1 >= len { 0 } else { p + 1 };
        }
        self.cursor = i;
    }
}

impl Session<'_> {
    /// A hybrid migration switches to post-copy: what is pending now moves after the
    /// hand-over.
    pub(super) fn switch_to_postcopy(&mut self) {
        self.memory_postcopy = true;
        self.report.switch_round = self.report.rounds.last().map(|r| r.index);
    }

    /// Memory auto-converge after a dirty round that sent `sent` units and left `dirty`
    /// pages dirty. Twice in a row more than half of what a round moves dirtied again:
    /// the vCPUs are throttled 20%, then 10 points more each such round, up to 99%, as
    /// QEMU's cpu-throttle steps. Returns whether the throttle can still rise (a stall is
    /// then not a reason to stop yet).
    pub(super) fn auto_converge(&mut self, dirty: u64, sent: u64, streak: &mut u32) -> bool {
        let current = self.vcpu_throttle.map_or(0, |(_, p)| p);
        if dirty * 2 <= sent {
            *streak = 0;
            return current > 0 && current < 99;
        }
        *streak += 1;
        if *streak < 2 {
            return current > 0 && current < 99;
        }
        let next = if current == 0 {
            20
        } else {
            (current + 10).min(99)
        };
        if next == current || !self.shared.guest.throttle_vcpus(next) {
            return false;
        }
        let since = self.vcpu_throttle.map_or_else(Instant::now, |(t, _)| t);
        self.vcpu_throttle = Some((since, next));
        self.report.vcpu_throttle_pct = next;
        (self.progress)(Progress::Note {
            text: format!("auto-converge: the guest's vCPUs are throttled {next}%"),
        });
        next < 99
    }
}

/// Post-copy after the hand-over: pushes every owed page and block, the ones the
/// destination's guest is waiting for first, pages near its latest fault next, then a
/// barrier and the final digest sums.
pub(super) fn postcopy_push(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    round: u32,
    owed_pages: Option<Bitmap>,
    owed: Vec<Bitmap>,
) -> Result<(), Failure> {
    let n = s.work.len();
    let start = Instant::now();
    let page_size = s.shared.layout.page_size as usize;
    let mut pages = PageOrder::new(owed_pages.unwrap_or_else(|| Bitmap::new(0)));
    let page_units = pages.left;
    let mut sent: Vec<Bitmap> = owed.iter().map(|b| Bitmap::new(b.len())).collect();
    let order: Vec<(usize, u64)> = owed
        .iter()
        .enumerate()
        .flat_map(|(d, b)| b.iter_ones().map(move |i| (d, i)))
        .collect();
    let total = page_units + order.len() as u64;
    (s.progress)(Progress::RoundStart {
        phase: Phase::PostCopy.name().into(),
        index: round,
        units: total,
    });
    let bytes0 = s.shared.wire_bytes.load(Ordering::Relaxed);
    let mut next = 0usize;
    let mut page_batch: Vec<u64> = Vec::new();
    loop {
        // Pulls first: the guest is blocked on them.
        let mut batch: Vec<(usize, u64)> = Vec::new();
        page_batch.clear();
        for p in s.page_pulls.borrow_mut().drain(..) {
            if pages.demand(p) {
                page_batch.push(p);
                s.report.pages_demanded += 1;
            }
        }
        while let Ok(m) = s.ctl.try_recv() {
            match m {
                Ok(Control::PullBlocks { disk, blocks }) if disk == MEMORY_SPACE => {
                    for p in blocks {
                        if pages.demand(p) {
                            page_batch.push(p);
                            s.report.pages_demanded += 1;
                        }
                    }
                }
                Ok(Control::PullBlocks { disk, blocks }) => {
                    let d = usize::from(disk);
                    for b in blocks {
                        if owed.get(d).is_some_and(|o| o.get(b)) && !sent[d].get(b) {
                            batch.push((d, b));
                            s.report.blocks_pulled += 1;
                        }
                    }
                }
                Ok(Control::Abort(r)) => return Err(Failure(format!("destination aborted: {r}"))),
                Ok(Control::Progress(_)) => {}
                Ok(other) => {
                    return Err(Failure(format!(
                        "unexpected {} during post-copy",
                        other.name()
                    )))
                }
                Err(e) => return Err(Failure(e)),
            }
        }
        // Demanded pages go alone, so nothing queues ahead of them on their channels.
        if page_batch.is_empty() {
            let before = page_batch.len();
            pages.next(SLICE, &mut page_batch);
            s.report.pages_pushed += (page_batch.len() - before) as u64;
        }
        if page_batch.is_empty() {
            while batch.len() < SLICE && next < order.len() {
                batch.push(order[next]);
                next += 1;
            }
        }
        batch.retain(|(d, b)| {
            let fresh = !sent[*d].get(*b);
            sent[*d].set(*b);
            fresh
        });
        if batch.is_empty() && page_batch.is_empty() && next >= order.len() && pages.left == 0 {
            break;
        }
        if !page_batch.is_empty() {
            let mut set = Bitmap::new(pages.owed.len());
            for p in &page_batch {
                set.set(*p);
            }
            s.dispatch(&set, BatchKind::OwedPages, page_size, round, false, |i| {
                page_channel(i, n)
            })?;
        }
        for (d, disk_owed) in owed.iter().enumerate() {
            let mut set = Bitmap::new(disk_owed.len());
            for (_, b) in batch.iter().filter(|(x, _)| *x == d) {
                set.set(*b);
            }
            if !set.none() {
                let bs = s.shared.layout.disks[d].block_size as usize;
                let disk = d as u16;
                s.dispatch(&set, BatchKind::OwedBlocks(disk), bs, round, false, |i| {
                    block_channel(disk, i, n)
                })?;
            }
        }
        if let Some(e) = s.shared.error() {
            return Err(Failure(e));
        }
    }
    // Barrier on every channel, then the sums of everything the destination now has.
    let (reply_tx, reply_rx) = unbounded();
    for ch in 0..n {
        s.send_work(
            ch,
            Work::Barrier {
                end: RoundEnd {
                    phase: Phase::PostCopy,
                    round,
                },
                reply: reply_tx.clone(),
            },
        )?;
    }
    let mut page_delta = DigestDelta::default();
    let mut disk_deltas = vec![DigestDelta::default(); s.shared.disks.len()];
    for _ in 0..n {
        let done = reply_rx
            .recv_timeout(cfg.io_timeout * 6)
            .map_err(|_| Failure("post-copy barrier timed out".into()))?;
        if !done.ok {
            return Err(Failure(
                s.shared
                    .error()
                    .unwrap_or_else(|| "a channel failed".into()),
            ));
        }
        page_delta.add(done.pages);
        for (a, b) in disk_deltas.iter_mut().zip(done.disks) {
            a.add(b);
        }
    }
    let mut sums: Vec<u64> = s
        .shared
        .disks
        .iter()
        .zip(&disk_deltas)
        .map(|(t, d)| t.sum_with([*d]))
        .collect();
    sums.push(s.shared.pages.sum_with([page_delta]));
    s.control(&Message::PostcopyDone(sums))?;
    s.report.postcopy_ms = ms(start.elapsed());
    let rr = RoundReport {
        phase: Phase::PostCopy.name().into(),
        index: round,
        dirty: total,
        sent: total,
        blocks: order.len() as u64,
        bytes: s.shared.wire_bytes.load(Ordering::Relaxed) - bytes0,
        ms: ms(start.elapsed()),
    };
    (s.progress)(Progress::RoundDone(rr.clone()));
    s.report.rounds.push(rr);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PageOrder;
    use crate::bitmap::Bitmap;

    #[test]
    fn pre_paging_follows_the_latest_fault_and_never_sends_a_page_twice() {
        let mut owed = Bitmap::new(200);
        for i in (0..200).step_by(3) {
            owed.set(i);
        }
        let want = owed.count();
        let mut o = PageOrder::new(owed);
        let mut out = Vec::new();
        o.next(2, &mut out);
        assert_eq!(out, [0, 3]);
        // A fault on 150: it goes at once, its neighbours next.
        assert!(o.demand(150));
        assert!(!o.demand(150), "demanded twice");
        assert!(!o.demand(151), "not owed");
        assert!(!o.demand(999), "out of range");
        out.clear();
        o.next(3, &mut out);
        assert_eq!(out, [153, 156, 159]);
        // The rest, wrapping around, each page once.
        let mut all = vec![0, 3, 150, 153, 156, 159];
        loop {
            let mut more = Vec::new();
            o.next(7, &mut more);
            if more.is_empty() {
                break;
            }
            all.extend(more);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, want);
        assert_eq!(o.left, 0);
    }
}
