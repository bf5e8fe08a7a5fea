//! The source's phases: negotiation, pre-copy, stop-and-copy, hand-over; each step is
//! fed to the [`SourceSession`], which alone decides what a failure means.

use crate::wire::{owed_parts, BitmapAssembler};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::postcopy::{hybrid_first_pass, postcopy_push};
use super::session::{Failure, Session};
use super::storage::hash_compare;
use super::{rate, MemoryMode, SourceConfig, StorageMode, Throttle};
use crate::bitmap::Bitmap;
use crate::digest::guest_sums;
use crate::engine::{ms, Control};
use crate::fault::Point;
use crate::guest::{Base, DiskPlan};
use crate::machine::{SourceAction, SourceEvent, SourcePlan, SourceSession, SourceStep};
use crate::policy::{RoundFigures, StopReason};
use crate::report::{hex, OracleSummary, Progress};
use crate::wire::{
    Manifest, Message, Phase, VerifyMode, CAP_RECOVER, MEMORY_SPACE, REQUIRED_CAPABILITIES,
};

/// Feeds `ev` to the machine; an event it does not expect is a failure.
fn feed(machine: &mut SourceSession, ev: SourceEvent) -> Result<SourceAction, Failure> {
    machine.on(ev).map_err(|e| Failure(e.to_string()))
}

/// The whole migration, phase by phase; every error is a [`Failure`] that [`migrate`]
/// hands to the machine.
pub(super) fn run(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    paused_at: &mut Option<Instant>,
    machine: &mut SourceSession,
    t0: Instant,
) -> Result<(), Failure> {
    let (first_pass, full_disks) = negotiate(s, cfg, machine)?;
    let mut plan = SourcePlan::new(cfg.policy.clone(), !s.shared.layout.disks.is_empty());
    precopy(s, cfg, &mut plan, first_pass, &full_disks)?;
    if s.memory_postcopy {
        machine
            .switch_to_postcopy()
            .map_err(|e| Failure(e.to_string()))?;
    }
    if feed(machine, SourceEvent::Converged)? != SourceAction::Pause {
        return Err(Failure("the session did not pause".into()));
    }
    let t_pause = stop_and_copy(s, cfg, &mut plan, paused_at, machine)?;

    // Hand-over: the machine decides before `commit` is written, so from here on the
    // source never resumes, whatever happens to the message. A cancel that came first
    // wins; one that comes after is refused as too late.
    if !cfg.control.commit() {
        return Err(Failure("cancelled".into()));
    }
    if feed(machine, SourceEvent::Verified)? != SourceAction::Commit {
        return Err(Failure("the session did not commit".into()));
    }
    let t_commit = Instant::now();
    s.shared.faults.hit(Point::Commit);
    let sent = s
        .control(&Message::Commit)
        .map_err(|Failure(e)| Failure(format!("commit sent but not confirmed: {e}")))
        .and_then(|()| feed(machine, SourceEvent::CommitSent).map(drop));
    // The backend's hand-over work (stopping the vCPUs for good, marking images as bases)
    // runs beside the wait for `resumed`: the guest is paused and the machine committed.
    let handing = {
        let g = Arc::clone(&s.shared.guest);
        std::thread::spawn(move || g.handed_over())
    };
    let result = finish_after_commit(
        s,
        machine,
        cfg,
        plan.next_round(),
        t0,
        t_pause,
        t_commit,
        sent,
    );
    let _ = handing.join();
    result
}

/// Per disk, what the first storage pass sends (`None`: every allocated block), and
/// whether the disk is copied in full.
type FirstPass = (Vec<Option<Bitmap>>, Vec<bool>);

/// The welcome, then the storage plan per disk: incremental when the destination holds
/// this image at a generation our history covers, hash-compared when it holds another
/// copy, else a full copy.
fn negotiate(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    machine: &mut SourceSession,
) -> Result<FirstPass, Failure> {
    let guest = Arc::clone(&s.shared.guest);
    let layout = s.shared.layout.clone();
    let bases = match s.expect("welcome", cfg.io_timeout)? {
        Control::Welcome(w) => {
            if w.capabilities & REQUIRED_CAPABILITIES != REQUIRED_CAPABILITIES {
                return Err(Failure("destination lacks required capabilities".into()));
            }
            if hex(&w.migration_id) != s.report.migration_id {
                return Err(Failure("destination answered for another migration".into()));
            }
            if w.bases.len() != layout.disks.len() {
                return Err(Failure(format!(
                    "destination described {} disks, the guest has {}",
                    w.bases.len(),
                    layout.disks.len()
                )));
            }
            w.bases
        }
        Control::Refuse(r) => return Err(Failure(format!("destination refused: {r}"))),
        other => return Err(Failure(format!("expected welcome, got {}", other.name()))),
    };
    feed(machine, SourceEvent::Welcome)?;
    if !layout.disks.is_empty() {
        guest.start_block_log()?;
    }
    let mut first_pass: Vec<Option<Bitmap>> = Vec::with_capacity(layout.disks.len());
    let mut plans = Vec::with_capacity(layout.disks.len());
    for (d, (disk, base)) in layout.disks.iter().zip(&bases).enumerate() {
        let (plan, since) = match (disk.identity, base) {
            (Some(mine), Base::Identity(theirs)) if mine.id == theirs.id => {
                match guest.written_since(d, theirs.generation) {
                    Some(w) => (DiskPlan::Incremental, Some(w)),
                    None => (DiskPlan::HashCompared, None),
                }
            }
            (_, Base::Identity(_) | Base::Raw) => (DiskPlan::HashCompared, None),
            (_, Base::None) => (DiskPlan::Full, None),
        };
        plans.push(plan);
        first_pass.push(since);
    }
    s.control(&Message::StoragePlan(plans.clone()))?;
    s.report.disk_plans = plans
        .iter()
        .map(|p| {
            match p {
                DiskPlan::Full => "full",
                DiskPlan::Incremental => "incremental",
                DiskPlan::HashCompared => "hash-compared",
            }
            .to_string()
        })
        .collect();
    for (d, plan) in plans.iter().enumerate() {
        if *plan == DiskPlan::HashCompared {
            (s.progress)(Progress::Note {
                text: format!("comparing disk {d} with the destination's copy"),
            });
            first_pass[d] = Some(hash_compare(s, cfg, d)?);
        }
    }
    let full_disks: Vec<bool> = plans.iter().map(|p| *p == DiskPlan::Full).collect();
    Ok((first_pass, full_disks))
}

/// Storage and memory pre-copy rounds until the policy says stop and copy.
fn precopy(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    plan: &mut SourcePlan,
    mut first_pass: Vec<Option<Bitmap>>,
    full_disks: &[bool],
) -> Result<(), Failure> {
    let guest = Arc::clone(&s.shared.guest);
    let layout = s.shared.layout.clone();
    if let (Throttle::Cap(bytes), Some(d)) = (cfg.throttle, layout.disks.first()) {
        s.throttle_to(bytes / u64::from(d.block_size));
    }
    let mut step = plan.first();
    let mut bandwidth = 0.0f64;
    let mut not_converging = 0u32;
    // The dirty sets fetched after a round are what the policy decides on, and what the
    // next round (or the stop-and-copy) sends: the logs are read once per round.
    loop {
        s.check_abort()?;
        if let Some(d) = s.new_downtime.take() {
            plan.set_downtime_target(d);
        }
        match step {
            SourceStep::StorageFullPass => {
                // Full disks: every allocated block (holes and zero blocks skipped, the
                // destination starts from a zero image). Incremental disks: the blocks
                // written since the destination's generation, zero ones included.
                let mut sets = Vec::with_capacity(layout.disks.len());
                for (d, since) in first_pass.iter_mut().enumerate() {
                    let total = layout.disks[d].blocks;
                    let set = match since.take() {
                        Some(w) => {
                            s.report.blocks_skipped_base += total - w.count();
                            w
                        }
                        None => {
                            let a = guest.allocated_blocks(d)?;
                            s.shared
                                .counters
                                .skipped_blocks
                                .fetch_add(total - a.count(), Ordering::Relaxed);
                            a
                        }
                    };
                    sets.push(set);
                }
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Storage, r, None, sets, full_disks, false)?;
                bandwidth = rate(rr.bytes, rr.elapsed).max(bandwidth);
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                step = plan.after_storage(s.pending_block_bytes(), bandwidth);
            }
            SourceStep::StorageDirtyRound => {
                let blocks = s.take_pending_blocks()?;
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Storage, r, None, blocks, &[], true)?;
                if rr.sent > 64 {
                    bandwidth = rate(rr.bytes, rr.elapsed).max(bandwidth);
                }
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                step = plan.after_storage(s.pending_block_bytes(), bandwidth);
            }
            SourceStep::MemoryFullPass | SourceStep::MemoryDirtyRound => {
                let full = step == SourceStep::MemoryFullPass;
                if full && cfg.memory_mode == MemoryMode::PostCopy {
                    // All of memory moves after the hand-over; nothing is tracked.
                    s.pending.pages = Some(Bitmap::full(layout.pages));
                    s.memory_postcopy = true;
                    s.report.stop_reason = Some(StopReason::Postcopy);
                    return Ok(());
                }
                if !full
                    && cfg.memory_mode == MemoryMode::Hybrid
                    && cfg.control.postcopy_requested()
                {
                    (s.progress)(Progress::Note {
                        text: "switching to post-copy as asked".into(),
                    });
                    s.switch_to_postcopy();
                    s.report.stop_reason = Some(StopReason::Requested);
                    return Ok(());
                }
                if full && cfg.memory_mode == MemoryMode::Hybrid {
                    let blocks = s.take_pending_blocks()?;
                    let first = hybrid_first_pass(s, plan, blocks)?;
                    s.report.first_pass_mbps =
                        rate(first.pages * u64::from(layout.page_size), first.elapsed) / 1e6;
                    bandwidth = rate(first.bytes, first.elapsed);
                    s.pending.blocks = Some(s.fetch_blocks()?);
                    if let Some(reason) = first.switched {
                        (s.progress)(Progress::Note {
                            text: match reason {
                                StopReason::Requested => "switching to post-copy as asked".into(),
                                _ => "the guest dirties memory as fast as the link carries it: switching to post-copy".into(),
                            },
                        });
                        s.switch_to_postcopy();
                        s.report.stop_reason = Some(reason);
                        return Ok(());
                    }
                    let pending = s.pending.pages.as_ref().map_or(0, Bitmap::count)
                        * u64::from(layout.page_size)
                        + s.pending_block_bytes();
                    step = plan.after_memory(RoundFigures {
                        pending_bytes: pending,
                        bandwidth,
                    });
                    continue;
                }
                let pages = if full {
                    guest.start_dirty_log()?;
                    Bitmap::full(layout.pages)
                } else {
                    s.take_pending_pages()?
                };
                let blocks = s.take_pending_blocks()?;
                let r = plan.next_round();
                let rr = s.guarded_round(Phase::Memory, r, Some(pages), blocks, &[], !full)?;
                let bw = rate(rr.bytes, rr.elapsed);
                if full {
                    // Guest memory moved per second (wire bytes differ with a codec).
                    s.report.first_pass_mbps = rate(layout.memory_bytes(), rr.elapsed) / 1e6;
                }
                // A short round of a few pages under-measures the link: keep the best.
                if rr.sent > 256 || bandwidth == 0.0 {
                    bandwidth = if full { bw } else { bw.max(bandwidth * 0.5) };
                }
                s.pending.pages = Some(guest.fetch_dirty_pages()?);
                s.pending.blocks = Some(s.fetch_blocks()?);
                s.auto_throttle(cfg, s.pending_block_bytes(), rr.elapsed, bandwidth);
                let pending = s.pending.pages.as_ref().map_or(0, Bitmap::count)
                    * u64::from(layout.page_size)
                    + s.pending_block_bytes();
                step = plan.after_memory(RoundFigures {
                    pending_bytes: pending,
                    bandwidth,
                });
                let dirty = s.pending.pages.as_ref().map_or(0, Bitmap::count);
                (s.progress)(Progress::Figures {
                    pending_bytes: pending,
                    bandwidth,
                    dirty_pages_per_s: dirty as f64 / rr.elapsed.as_secs_f64().max(1e-6),
                    expected_downtime_ms: if bandwidth > 0.0 {
                        pending as f64 / bandwidth * 1e3
                    } else {
                        0.0
                    },
                });
                if cfg.memory_mode == MemoryMode::Hybrid
                    && matches!(step, SourceStep::MemoryDirtyRound)
                    && dirty as f64 >= cfg.policy.progress_ratio * rr.sent.max(1) as f64
                {
                    // The round did not shrink what is left: pre-copy cannot reach the
                    // downtime target, and every further round only costs link.
                    (s.progress)(Progress::Note {
                        text: format!("pre-copy is not converging ({dirty} pages dirty after sending {}): switching to post-copy", rr.sent),
                    });
                    s.switch_to_postcopy();
                    s.report.stop_reason = Some(StopReason::Diverging);
                    return Ok(());
                }
                if !full && cfg.auto_converge && cfg.memory_mode == MemoryMode::PreCopy {
                    let link_pages = (bandwidth / f64::from(layout.page_size)) as u64;
                    let stepped = s.auto_converge(dirty, rr.sent, link_pages, &mut not_converging);
                    // While the throttle can still rise, a stalled pre-copy is given
                    // more rounds (the round limit still holds).
                    if stepped && step == SourceStep::StopAndCopy(StopReason::NoProgress) {
                        step = SourceStep::MemoryDirtyRound;
                    }
                }
            }
            SourceStep::StopAndCopy(reason) => {
                s.report.stop_reason = Some(reason);
                if cfg.memory_mode == MemoryMode::Hybrid && reason != StopReason::Converged {
                    // Pre-copy would not reach the downtime target: the rest moves after
                    // the hand-over instead of in the pause.
                    (s.progress)(Progress::Note {
                        text: format!(
                            "pre-copy is not converging ({reason:?}): switching to post-copy"
                        ),
                    });
                    s.switch_to_postcopy();
                }
                return Ok(());
            }
        }
    }
}

/// Stop-and-copy: pause, send what was pending plus what was dirtied until the pause, the
/// state and the manifest, and wait for the destination's `verified`. Returns when the
/// guest was paused.
fn stop_and_copy(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    plan: &mut SourcePlan,
    paused_at: &mut Option<Instant>,
    machine: &mut SourceSession,
) -> Result<Instant, Failure> {
    let guest = Arc::clone(&s.shared.guest);
    let layout = s.shared.layout.clone();
    (s.progress)(Progress::Note {
        text: "pausing the guest".into(),
    });
    let t_pause = Instant::now();
    if let Some((since, _)) = s.throttled {
        s.report.throttled_ms = ms(t_pause - since);
    }
    guest.pause()?;
    *paused_at = Some(t_pause);
    s.shared.faults.hit(Point::Pause);
    s.report.downtime_breakdown.pause_ms = ms(t_pause.elapsed());
    let t_copy = Instant::now();
    let pages = if s.memory_postcopy {
        // Memory post-copy: the pages stay pending (merged back if we fail before the
        // hand-over); the pause sends only their bitmap.
        let owed = match cfg.memory_mode {
            MemoryMode::PostCopy => s
                .pending
                .pages
                .take()
                .unwrap_or_else(|| Bitmap::full(layout.pages)),
            _ => s.take_pending_pages()?,
        };
        s.report.pages_postcopy = owed.count();
        s.pending.pages = Some(owed);
        Bitmap::new(layout.pages)
    } else {
        s.take_pending_pages()?
    };
    let mut blocks = s.take_pending_blocks()?;
    if cfg.storage_mode == StorageMode::PostCopy {
        // The blocks stay pending (merged back if we fail before the hand-over); the
        // pause sends only their bitmap.
        s.report.blocks_postcopy = blocks.iter().map(Bitmap::count).sum();
        let none = blocks.iter().map(|b| Bitmap::new(b.len())).collect();
        s.pending.blocks = Some(std::mem::replace(&mut blocks, none));
    }
    let r = plan.next_round();
    s.guarded_round(Phase::Final, r, Some(pages), blocks, &[], true)?;
    s.report.downtime_breakdown.final_copy_ms = ms(t_copy.elapsed());
    let t_state = Instant::now();
    let state = guest.save_state()?;
    s.shared.faults.hit(Point::State);
    s.control(&Message::State {
        version: state.version,
        bytes: std::borrow::Cow::Borrowed(&state.bytes),
    })?;
    if s.memory_postcopy {
        let owed = s
            .pending
            .pages
            .clone()
            .unwrap_or_else(|| Bitmap::new(layout.pages));
        for part in owed_parts(MEMORY_SPACE, &owed) {
            s.control(&part)?;
        }
    }
    if cfg.storage_mode == StorageMode::PostCopy {
        for (d, owed) in s
            .pending
            .blocks
            .clone()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            for part in owed_parts(d as u16, &owed) {
                s.control(&part)?;
            }
        }
    }
    s.report.downtime_breakdown.state_ms = ms(t_state.elapsed());
    let full = if cfg.verify == VerifyMode::Full {
        let t = Instant::now();
        // Owed blocks (storage post-copy) are hashed as absent on both sides; the push
        // checks them against their digests as they arrive.
        let owed = s
            .pending
            .blocks
            .clone()
            .filter(|_| cfg.storage_mode == StorageMode::PostCopy);
        let owed_pages = s.pending.pages.clone().filter(|_| s.memory_postcopy);
        let sums = guest_sums(
            &layout,
            s.shared.pages.key(),
            |i, b| !owed_pages.as_ref().is_some_and(|o| o.get(i)) && guest.read_page(i, b).is_ok(),
            |d, i, b| {
                let is_owed = owed
                    .as_ref()
                    .and_then(|o| o.get(d))
                    .is_some_and(|o| o.get(i));
                !is_owed && guest.read_block(d, i, b).is_ok()
            },
        );
        s.report.downtime_breakdown.full_verify_ms = ms(t.elapsed());
        Some(sums)
    } else {
        None
    };
    let (pd, dd) = s.last_deltas.clone();
    let manifest = Manifest {
        pages: s.shared.pages.sum_with([pd]),
        disks: s
            .shared
            .disks
            .iter()
            .enumerate()
            .map(|(i, t)| t.sum_with([dd.get(i).copied().unwrap_or_default()]))
            .collect(),
        full,
    };
    let t_verify = Instant::now();
    s.control(&Message::Manifest(manifest))?;
    feed(machine, SourceEvent::FinalSent)?;
    // The destination answers after checking the manifest and flushing; with `--verify
    // full` it also hashes the whole guest (allow ~200 MB/s for that on a slow disk).
    let verify_wait = match cfg.verify {
        VerifyMode::Digest => cfg.io_timeout,
        VerifyMode::Full => {
            cfg.io_timeout
                + Duration::from_secs((layout.memory_bytes() + layout.disk_bytes()) / 200_000_000)
        }
    };
    match s.expect("verified", verify_wait)? {
        Control::Verified { .. } => {}
        other => return Err(Failure(format!("expected verified, got {}", other.name()))),
    }
    s.shared.faults.hit(Point::Verified);
    s.report.downtime_breakdown.verify_ms = ms(t_verify.elapsed());
    Ok(t_pause)
}

/// After `commit`: wait for `resumed`, run the post-copy push if any, wait for the verdict.
#[allow(clippy::too_many_arguments)]
fn finish_after_commit(
    s: &mut Session<'_>,
    machine: &mut SourceSession,
    cfg: &SourceConfig,
    postcopy_round: u32,
    t0: Instant,
    t_pause: Instant,
    t_commit: Instant,
    sent: Result<(), Failure>,
) -> Result<(), Failure> {
    sent?;
    match s.expect("resumed", cfg.io_timeout) {
        Ok(Control::Resumed { .. }) => {}
        Ok(other) => {
            return Err(Failure(format!(
                "committed; expected resumed, got {}",
                other.name()
            )))
        }
        Err(Failure(e)) => return Err(Failure(format!("committed, but {e}"))),
    }
    let now = Instant::now();
    s.report.downtime_breakdown.commit_resume_ms = ms(now - t_commit);
    s.report.downtime_ms = ms(now - t_pause);
    s.report.total_ms = ms(now - t0);
    s.shared.faults.hit(Point::Resumed);
    let postcopy = feed(machine, SourceEvent::Resumed)? == SourceAction::PushOwed;
    if postcopy {
        s.shared.faults.hit(Point::Postcopy);
        let owed = s.pending.blocks.take().unwrap_or_default();
        let owed_pages = if s.memory_postcopy {
            s.pending.pages.take()
        } else {
            None
        };
        let memory = owed_pages.as_ref().is_some_and(|p| !p.none());
        postcopy_push(s, cfg, postcopy_round, owed_pages, owed).map_err(|Failure(e)| {
            Failure(if memory {
                format!(
                    "committed, but memory post-copy failed: {e}. The destination's guest waits for pages only this source holds: \
                     it keeps them, paused and never resumed here, for `ferry migrate --vm SOCKET --to ADDR --resume`; \
                     if the destination is gone, the guest was lost with it"
                )
            } else {
                format!("committed, but post-copy failed: {e}")
            })
        })?;
        // Done means the destination has everything, not only that the guest runs.
        s.report.total_ms = ms(t0.elapsed());
    } else {
        // The guest runs on the destination with everything it needs.
        s.report.ok = true;
    }
    (s.progress)(Progress::Note {
        text: "guest resumed on the destination; waiting for its self-check".into(),
    });
    // The destination says every second that its check still runs. With post-copy, its
    // verdict is also the confirmation that every owed block arrived: until then the
    // migration is not done, whatever the push wrote into the socket.
    let v = match s.expect("verdict", cfg.io_timeout) {
        Ok(Control::Verdict(v)) => v,
        Ok(other) => {
            return Err(Failure(format!(
                "committed; expected verdict, got {}",
                other.name()
            )))
        }
        Err(Failure(e)) => {
            return Err(Failure(format!(
                "committed; no verdict from the destination: {e}"
            )))
        }
    };
    s.shared.faults.hit(Point::Verdict);
    if postcopy {
        if !v.ok {
            return Err(Failure(format!(
                "committed, but the destination could not complete post-copy: {}",
                v.detail
            )));
        }
        feed(machine, SourceEvent::PostcopyDone)?;
        s.report.ok = true;
    }
    feed(machine, SourceEvent::Verdict)?;
    s.report.verified = v.ok;
    s.report.postcopy_faults = v.faults;
    s.report.fault_latency_us = v.fault_latency_us;
    // The channels' encoder figures are added to these when the senders finish.
    s.report.codec_stats = v
        .decode_ns
        .iter()
        .map(|ns| crate::codec::StageStats {
            decode_s: *ns as f64 / 1e9,
            ..Default::default()
        })
        .collect();
    s.report.oracle = Some(OracleSummary {
        ok: v.ok,
        pages_checked: v.pages_checked,
        blocks_checked: v.blocks_checked,
        detail: v.detail,
    });
    if !v.ok {
        s.report.error = Some("destination's self-check failed".into());
    }
    Ok(())
}

/// Post-copy recovery: the destination says what it still owes, disk by disk; push
/// exactly that, then wait for its verdict, which says whether it has everything now.
pub(super) fn recover_owed(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    machine: &mut SourceSession,
) -> Result<(), Failure> {
    let layout = s.shared.layout.clone();
    match s.expect("welcome", cfg.io_timeout)? {
        Control::Welcome(w) => {
            if w.capabilities & CAP_RECOVER == 0 || w.migration_id != s.migration_id {
                return Err(Failure(
                    "the destination does not hold this migration's guest".into(),
                ));
            }
        }
        Control::Refuse(r) => return Err(Failure(format!("destination refused: {r}"))),
        other => return Err(Failure(format!("expected welcome, got {}", other.name()))),
    }
    let mut owed = Vec::with_capacity(layout.disks.len());
    for (d, dl) in layout.disks.iter().enumerate() {
        let mut parts = BitmapAssembler::new(dl.blocks);
        let bits = loop {
            match s.expect("owed blocks", cfg.io_timeout)? {
                Control::OwedBlocks { disk, part } if usize::from(disk) == d => {
                    match parts.add(part) {
                        Ok(Some(bits)) => break bits,
                        Ok(None) => {}
                        Err(e) => return Err(Failure(format!("the owed blocks of disk {d}: {e}"))),
                    }
                }
                other => {
                    return Err(Failure(format!(
                        "expected the owed blocks of disk {d}, got {}",
                        other.name()
                    )))
                }
            }
        };
        owed.push(bits);
    }
    // Memory's owed pages: none (a bitmap of no bits) or a bitmap of this guest's pages.
    let mut parts: Option<BitmapAssembler> = None;
    let owed_pages = loop {
        match s.expect("owed pages", cfg.io_timeout)? {
            Control::OwedBlocks { disk, part } if disk == MEMORY_SPACE => match parts
                .get_or_insert_with(|| {
                    BitmapAssembler::new(if part.bits == 0 { 0 } else { layout.pages })
                })
                .add(part)
            {
                Ok(Some(bits)) => break bits,
                Ok(None) => {}
                Err(e) => return Err(Failure(format!("the owed pages: {e}"))),
            },
            other => {
                return Err(Failure(format!(
                    "expected the owed pages, got {}",
                    other.name()
                )))
            }
        }
    };
    s.report.blocks_postcopy = owed.iter().map(Bitmap::count).sum();
    s.report.pages_postcopy = owed_pages.count();
    (s.progress)(Progress::Note {
        text: format!(
            "recovering post-copy: {} pages and {} blocks still owed",
            s.report.pages_postcopy, s.report.blocks_postcopy
        ),
    });
    postcopy_push(s, cfg, 0, Some(owed_pages), owed)?;
    let v = match s.expect("verdict", cfg.io_timeout)? {
        Control::Verdict(v) => v,
        other => return Err(Failure(format!("expected verdict, got {}", other.name()))),
    };
    if !v.ok {
        return Err(Failure(format!(
            "the destination still lacks blocks: {}",
            v.detail
        )));
    }
    feed(machine, SourceEvent::PostcopyDone)?;
    feed(machine, SourceEvent::Verdict)?;
    s.report.ok = true;
    s.report.verified = true;
    s.report.oracle = Some(OracleSummary {
        ok: v.ok,
        pages_checked: v.pages_checked,
        blocks_checked: v.blocks_checked,
        detail: v.detail,
    });
    Ok(())
}
