//! After the hand-over: the push of owed pages and blocks (post-copy), and the vCPU
//! throttle that helps pre-copy converge (auto-converge).

use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::unbounded;

use super::{block_channel, ms, page_channel, Control};
use crate::bitmap::Bitmap;
use crate::digest::DigestDelta;
use crate::guest::VcpuThrottle;
use crate::report::{Progress, RoundReport};
use crate::wire::{BatchKind, Message, Phase, RoundEnd, MEMORY_SPACE};

use super::sender::*;
use super::session::*;
use super::*;
use crate::machine::SourcePlan;

/// Units per slice of the push: pulls are looked at between slices.
const SLICE: usize = 256;

/// Pre-paging: the owed pages in the order they go. Each recent fault starts a stream
/// of the pages after it (a vCPU that faulted on a page touches its neighbours next);
/// the background push serves the streams in turn, then the rest in order.
struct PageOrder {
    owed: Bitmap,
    sent: Bitmap,
    /// Where the streams of the latest faults continue, newest first.
    streams: std::collections::VecDeque<u64>,
    /// Where the push in order continues.
    cursor: u64,
    left: u64,
}

/// Fault streams followed at once (several vCPUs fault in different places).
const STREAMS: usize = 4;
/// Pages a stream sends before the next stream's turn.
const STREAM_RUN: usize = 32;

impl PageOrder {
    fn new(owed: Bitmap) -> Self {
        let left = owed.count();
        Self {
            sent: Bitmap::new(owed.len()),
            owed,
            streams: Default::default(),
            cursor: 0,
            left,
        }
    }

    /// A page the guest waits for: whether it still has to go (then it is taken). The
    /// pages after it go next.
    fn demand(&mut self, page: u64) -> bool {
        if page >= self.owed.len() || !self.owed.get(page) || self.sent.get(page) {
            return false;
        }
        self.sent.set(page);
        self.left -= 1;
        // A fault just behind a stream's head continues that stream.
        self.streams
            .retain(|&s| !(s <= page + 1 && page < s + STREAM_RUN as u64 * 4));
        self.streams.push_front(page + 1);
        self.streams.truncate(STREAMS);
        true
    }

    /// The next owed, unsent page at or after `from` and before `to`, taken.
    fn take_from(&mut self, from: u64, to: u64) -> Option<u64> {
        let words = self.owed.words();
        let mut i = from;
        while i < to {
            let w = (i / 64) as usize;
            let free = words[w] & !self.sent.words()[w] & (!0u64 << (i % 64));
            if free == 0 {
                i = (w as u64 + 1) * 64;
                continue;
            }
            let p = w as u64 * 64 + u64::from(free.trailing_zeros());
            if p >= to {
                return None;
            }
            self.sent.set(p);
            self.left -= 1;
            return Some(p);
        }
        None
    }

    /// Up to `n` more pages: the fault streams in turn, then in order (wrapping), never
    /// one twice.
    fn next(&mut self, n: usize, out: &mut Vec<u64>) {
        let len = self.owed.len();
        let mut k = 0;
        while out.len() < n && self.left > 0 && k < self.streams.len() {
            let mut at = self.streams[k];
            let mut run = 0;
            while run < STREAM_RUN && out.len() < n {
                // A stream ends where the owed pages after it end (within a window).
                match self.take_from(at, (at + 256).min(len)) {
                    Some(p) => {
                        out.push(p);
                        at = p + 1;
                        run += 1;
                    }
                    None => {
                        at = len;
                        break;
                    }
                }
            }
            if at >= len {
                self.streams.remove(k);
            } else {
                self.streams[k] = at;
                k += 1;
            }
        }
        let mut wrapped = false;
        while out.len() < n && self.left > 0 {
            match self.take_from(self.cursor, len) {
                Some(p) => {
                    out.push(p);
                    self.cursor = p + 1;
                }
                None if !wrapped => {
                    wrapped = true;
                    self.cursor = 0;
                }
                None => break,
            }
        }
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
    /// pages dirty, over a link that carries `link_pages` pages per second. Twice in a
    /// row more than half of what a round moves dirtied again: the guest is throttled
    /// 20%, then 10 points more each such round, up to 99%, as QEMU's cpu-throttle steps
    /// (a backend that paces its own writes holds them to the rest of the link's page
    /// rate instead, as QEMU's dirty-limit does). Returns whether the throttle can still
    /// rise (a stall is then not a reason to stop yet).
    pub(super) fn auto_converge(
        &mut self,
        dirty: u64,
        sent: u64,
        link_pages: u64,
        streak: &mut u32,
    ) -> bool {
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
        let throttle = VcpuThrottle {
            percent: next,
            dirty_pages_per_second: (link_pages * u64::from(100 - next) / 100).max(1),
        };
        if next == current || !self.shared.guest.throttle_vcpus(throttle) {
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

/// Slices of a hybrid migration's first memory pass.
const FIRST_PASS_SLICES: u64 = 16;

/// What a hybrid migration's first pass did.
pub(super) struct FirstPass {
    /// Pages sent.
    pub(super) pages: u64,
    /// Bytes on the wire.
    pub(super) bytes: u64,
    /// How long it took.
    pub(super) elapsed: std::time::Duration,
    /// Why the pass switched to post-copy before it ended (`None`: it did not); what is
    /// pending then (the dirty pages and the pages not sent yet) moves after the
    /// hand-over. `Diverging`: the guest dirtied what the pass had sent as fast as the
    /// pass sent it, so no round could catch up. `Requested`: an operator asked.
    pub(super) switched: Option<crate::policy::StopReason>,
}

/// A hybrid migration's first memory pass, in slices: after each the dirty log is read,
/// and once nine tenths of what the pass has sent are dirty again the guest outruns the
/// link — pre-copy could never converge, so the switch to post-copy comes now rather
/// than after rounds that each resend all of memory.
pub(super) fn hybrid_first_pass(
    s: &mut Session<'_>,
    plan: &mut SourcePlan,
    blocks: Vec<Bitmap>,
) -> Result<FirstPass, Failure> {
    let guest = Arc::clone(&s.shared.guest);
    let pages = s.shared.layout.pages;
    guest.start_dirty_log()?;
    let start = Instant::now();
    let mut blocks = Some(blocks);
    let mut dirty = Bitmap::new(pages);
    let mut out = FirstPass {
        pages: 0,
        bytes: 0,
        elapsed: Default::default(),
        switched: None,
    };
    let per = pages.div_ceil(FIRST_PASS_SLICES).max(1);
    let mut from = 0;
    while from < pages {
        let to = (from + per).min(pages);
        let mut slice = Bitmap::new(pages);
        for i in from..to {
            slice.set(i);
        }
        let r = plan.next_round();
        let rr = s.guarded_round(
            Phase::Memory,
            r,
            Some(slice),
            blocks.take().unwrap_or_default(),
            &[],
            false,
        )?;
        out.pages += to - from;
        out.bytes += rr.bytes;
        dirty.merge(&guest.fetch_dirty_pages()?);
        from = to;
        // Dirty pages behind the pass (those ahead of it go out with it anyway).
        let behind = dirty.iter_ones().take_while(|&p| p < to).count() as u64;
        let requested = s.cfg.control.postcopy_requested();
        if from < pages && (requested || behind as f64 >= 0.9 * out.pages as f64) {
            for i in from..pages {
                dirty.set(i);
            }
            out.switched = Some(if requested {
                crate::policy::StopReason::Requested
            } else {
                crate::policy::StopReason::Diverging
            });
            break;
        }
        s.check_abort()?;
    }
    out.elapsed = start.elapsed();
    s.pending.pages = Some(dirty);
    Ok(out)
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
    // Demanded pages take channel 0 alone (with the control messages), so they never
    // queue behind the background push, which takes the others; and the push keeps
    // only ~3 ms of the link queued, so a fault on a page already queued waits little.
    let urgent = 0usize;
    s.shared.urgent_channel0.store(n > 1, Ordering::Relaxed);
    let background = move |i: u64| if n > 1 { 1 + page_channel(i, n - 1) } else { 0 };
    // ~3 ms of the link (a guest faulting on a page already queued waits that long).
    let in_flight_limit = cfg
        .max_bandwidth
        .map_or(2048, |r| (r / 300 / page_size as u64).clamp(16, 2048));
    let done0 = s.shared.counters.units_done.load(Ordering::Relaxed);
    let mut dispatched = 0u64;
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
        let in_flight =
            dispatched.saturating_sub(s.shared.counters.units_done.load(Ordering::Relaxed) - done0);
        let urgent_pages = !page_batch.is_empty();
        let demanded = urgent_pages || !batch.is_empty();
        let pushed_all = next >= order.len() && pages.left == 0;
        if !demanded && !pushed_all && in_flight > in_flight_limit {
            std::thread::sleep(std::time::Duration::from_micros(200));
            continue;
        }
        // Demanded pages go alone, so nothing queues ahead of them on their channels.
        if page_batch.is_empty() {
            let before = page_batch.len();
            pages.next(SLICE.min(in_flight_limit as usize), &mut page_batch);
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
            dispatched += page_batch.len() as u64;
            if urgent_pages {
                s.dispatch(&set, BatchKind::OwedPages, page_size, round, false, |_| {
                    urgent
                })?;
            } else {
                s.dispatch(
                    &set,
                    BatchKind::OwedPages,
                    page_size,
                    round,
                    false,
                    background,
                )?;
            }
        }
        dispatched += batch.len() as u64;
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
    use super::{PageOrder, STREAM_RUN};
    use crate::bitmap::Bitmap;

    #[test]
    fn pre_paging_follows_recent_faults_and_never_sends_a_page_twice() {
        let mut owed = Bitmap::new(2000);
        for i in (0..2000).step_by(3) {
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
        assert!(!o.demand(9999), "out of range");
        out.clear();
        o.next(3, &mut out);
        assert_eq!(out, [153, 156, 159]);
        // Two vCPUs faulting in two places: both streams advance.
        assert!(o.demand(900));
        out.clear();
        o.next(2 * STREAM_RUN, &mut out);
        assert!(out.contains(&903) && out.contains(&162), "{out:?}");
        // The rest, wrapping around, each page once.
        let mut all = vec![0, 3, 150, 153, 156, 159, 900];
        all.extend(&out);
        loop {
            let mut more = Vec::new();
            o.next(7, &mut more);
            if more.is_empty() {
                break;
            }
            all.extend(more);
        }
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a page went twice");
        assert_eq!(all.len() as u64, want);
        assert_eq!(o.left, 0);
    }
}
