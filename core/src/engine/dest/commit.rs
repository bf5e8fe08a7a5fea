//! After `commit`: the guest is this side's. Resume, confirm, wait for owed blocks, flush,
//! and report the guest's own check; what cannot complete holds the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::events::{Receive, Receivers};
use super::storage::wait_postcopy;
use super::{send_shared, DestConfig, DestOutcome, DestReport};
use crate::engine::{micros, ms};
use crate::fault::Point;
use crate::machine::{DestAction, DestEvent, DestSession};
use crate::wire::{Message, Verdict};

/// After `commit`: the guest is this side's and is never discarded. Resume it, confirm,
/// wait for owed blocks, flush, and send the self-check. What cannot complete holds the
/// guest (paused) for an operator.
pub(super) fn after_commit(
    r: &mut Receive<'_>,
    rx: &Receivers,
    channels: usize,
    cfg: &DestConfig,
    on_resumed: &dyn Fn(),
) -> DestOutcome {
    let mut report = std::mem::take(&mut r.report);
    let t_commit = r.t_commit.unwrap_or_else(Instant::now);
    let decode_s = &r.fin_decode_seconds();
    let (faults, guest, tx0) = (r.faults, &r.guest, &r.tx0);
    let session = &mut r.session;
    let held = |session: &DestSession, report: DestReport, error: String| DestOutcome::Held {
        guest: Arc::clone(guest),
        error,
        session: session.clone(),
        report,
    };
    let resumed = guest.resume();
    let ok = resumed.is_ok();
    if session.on(DestEvent::ResumeDone(ok)) != Ok(DestAction::ConfirmResumed) {
        let why = resumed.err().map_or_else(String::new, |e| e.to_string());
        return held(
            session,
            report,
            format!("committed, but resuming the guest failed: {why}"),
        );
    }
    report.resume_ms = ms(t_commit.elapsed());
    on_resumed();
    faults.hit(Point::Resumed);
    let _ = send_shared(
        tx0,
        &Message::Resumed {
            resume_us: micros(t_commit.elapsed()),
        },
    );
    // The guest's own check runs beside the post-copy wait: it reads owed blocks, which
    // it pulls ahead of the background push; if the push fails the reads fail at once.
    let mut held_error = None;
    let done = AtomicBool::new(false);
    let check = std::thread::scope(|scope| {
        let checker = scope.spawn(|| {
            let c = guest.self_check();
            done.store(true, Ordering::Release);
            c
        });
        // The source waits for the verdict no longer than its timeout after the last
        // sign of life: say every second that the check is still running.
        scope.spawn(|| {
            let mut last = Instant::now();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= Duration::from_secs(1) {
                    let _ = send_shared(tx0, &Message::Progress(0));
                    last = Instant::now();
                }
            }
        });
        if session.owes_blocks() {
            faults.hit(Point::Postcopy);
            let tp = Instant::now();
            let r = wait_postcopy(&rx.events, &rx.pages, &rx.disks, channels, cfg);
            report.postcopy_ms = ms(tp.elapsed());
            match r {
                Ok(()) => {
                    let _ = session.on(DestEvent::PostcopyDone);
                }
                // The link went after the last owed unit arrived (each was checked
                // against its digest as it came): the guest has everything and runs on.
                Err(e) if guest.owed_pages() == 0 && guest.owed_blocks() == 0 => {
                    tracing::warn!(
                        "post-copy ended early ({e}), but every owed unit had arrived and was checked"
                    );
                    let _ = session.on(DestEvent::PostcopyDone);
                }
                Err(e) => {
                    // The units can only come from the source: hold the guest paused
                    // rather than let it read holes (a vCPU touching an owed page
                    // waits for it anyway).
                    if session.fail() == DestAction::Hold {
                        guest.abandon_owed();
                        if let Err(p) = guest.hold() {
                            tracing::warn!("pausing the held guest: {p}");
                        }
                    }
                    held_error = Some(format!(
                        "committed, but post-copy did not finish ({e}); the guest is held paused with {} pages and {} blocks owed by the source",
                        guest.owed_pages(),
                        guest.owed_blocks()
                    ));
                }
            }
        }
        let c = checker.join().ok().flatten();
        done.store(true, Ordering::Release);
        c
    });
    let tf = Instant::now();
    let flushed = guest.flush();
    report.flush_ms = ms(tf.elapsed());
    let mut verdict = match check {
        Some(o) => {
            report.oracle_ok = Some(o.ok);
            report.oracle_detail = if o.ok {
                format!(
                    "{} pages and {} blocks hold their last written version",
                    o.pages_checked, o.blocks_checked
                )
            } else {
                o.problems.join("; ")
            };
            Verdict {
                ok: o.ok,
                pages_checked: o.pages_checked,
                blocks_checked: o.blocks_checked,
                detail: report.oracle_detail.clone(),
                decode_ns: Vec::new(),
                faults: 0,
                fault_latency_us: [0; 3],
            }
        }
        None => Verdict {
            ok: report.manifest_ok,
            pages_checked: 0,
            blocks_checked: 0,
            detail: "no guest oracle; manifest matched".into(),
            decode_ns: Vec::new(),
            faults: 0,
            fault_latency_us: [0; 3],
        },
    };
    verdict.decode_ns = decode_s.iter().map(|s| (s * 1e9) as u64).collect();
    if let Some(f) = guest.fault_figures() {
        verdict.faults = f.faults;
        verdict.fault_latency_us = f.latency_us.map(|x| x as u64);
        report.postcopy_faults = f.faults;
        report.fault_latency_us = f.latency_us;
    }
    let mut fail = |detail: String| {
        verdict.ok = false;
        verdict.detail.clone_from(&detail);
        report.oracle_ok = Some(false);
        report.oracle_detail = detail;
    };
    if let Some(e) = &held_error {
        fail(e.clone());
    }
    if let Err(e) = flushed {
        fail(format!("flushing the disk images failed: {e}"));
    }
    faults.hit(Point::Verdict);
    let _ = send_shared(tx0, &Message::Verdict(verdict));
    match held_error {
        Some(e) => held(session, report, e),
        None => DestOutcome::Resumed {
            guest: Arc::clone(guest),
            report,
        },
    }
}
