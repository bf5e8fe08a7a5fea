//! The engine end to end with real sim guests (memory mapping, disk image files, workload
//! threads) over the in-memory transport: happy paths and the safety rule under injected
//! faults.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::bitmap::Bitmap;
use ferry_core::engine::DestOutcome;
use ferry_core::guest::{GuestError, GuestLayout, SourceGuest, StateBlob};
use ferry_core::wire::VerifyMode;
use ferry_sim::{Fill, Pattern, SimGuest};
use ferry_transports::{MemFault, MemTransport};

mod common;
use common::{migrate_with, Spec};

#[test]
fn migrates_and_verifies_with_each_codec_and_channel_count() {
    for (codec, channels, verify) in [
        ("raw", 1, VerifyMode::Full),
        ("lz4", 2, VerifyMode::Digest),
        ("lz4", 3, VerifyMode::Full),
        ("zstd", 2, VerifyMode::Full),
        ("xor-delta,lz4", 2, VerifyMode::Full),
        ("dedup,xor-delta,zstd:1", 2, VerifyMode::Full),
        ("auto", 2, VerifyMode::Full),
    ] {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let g = Spec {
            pattern: Pattern::Hotspot,
            fill: Fill::Random,
            ..Spec::default()
        }
        .start(src_dir.path());
        std::thread::sleep(Duration::from_millis(100));
        let run = migrate_with(
            g.clone(),
            MemTransport::new(),
            codec,
            channels,
            verify,
            dst_dir.path(),
        );
        let r = &run.report;
        assert!(r.ok && r.verified, "{codec}/{channels}: {:?}", r.error);
        assert!(r.rounds.iter().any(|x| x.phase == "storage"));
        assert!(r.rounds.iter().filter(|x| x.phase == "memory").count() >= 1);
        assert!(r.blocks_sent > 0 && r.pages_sent >= 48 << 8);
        // The time outside the rounds is accounted for: before the first, after the resume.
        let rounds: f64 = r.rounds.iter().map(|x| x.ms).sum();
        assert!(r.setup_ms > 0.0 && r.teardown_ms >= 0.0, "{r:?}");
        assert!(r.setup_ms + rounds <= r.total_ms + 1.0, "{r:?}");
        // Every stage of the pipeline reports what it did.
        let stages = match codec {
            "raw" => 0,
            "auto" => 4,
            _ => codec.split(',').count(),
        };
        assert_eq!(r.codec_stats.len(), stages, "{codec}");
        if codec == "auto" {
            // `auto` starts raw until it has measured the link.
            assert!(
                r.codec_choices.get("raw").copied().unwrap_or(0) > 0,
                "{codec}"
            );
        } else {
            assert!(r
                .codec_stats
                .iter()
                .all(|s| s.units_in > 0 && s.bytes_in > 0));
        }
        // Stages that did work on the source also did work on the destination.
        for s in &r.codec_stats {
            if s.units_applied > 0 {
                assert!(s.decode_s > 0.0, "{codec}: {s:?}");
            }
        }
        let oracle = r.oracle.as_ref().unwrap();
        assert!(
            oracle.pages_checked > 0,
            "workload wrote nothing before the move?"
        );
        let DestOutcome::Resumed { guest, report } = run.outcome else {
            panic!("destination did not resume")
        };
        assert!(report.manifest_ok);
        if verify == VerifyMode::Full {
            assert_eq!(report.full_verify_ok, Some(true));
        }
        // The destination guest keeps running and stays consistent.
        std::thread::sleep(Duration::from_millis(200));
        drop(guest);
        // The source's workload is stopped for good (handed over).
        let before = g.stats().page_writes;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            g.stats().page_writes,
            before,
            "source kept running after hand-over"
        );
    }
}

#[test]
fn a_guest_without_dirty_tracking_refuses_to_migrate() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let g = Spec::default().start(src_dir.path());
    g.without_dirty_tracking();
    let run = migrate_with(
        g.clone(),
        MemTransport::new(),
        "raw",
        2,
        VerifyMode::Digest,
        dst_dir.path(),
    );
    let r = &run.report;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("without dirty tracking"),
        "{:?}",
        r.error
    );
    assert_eq!(r.source_resumed, Some(true), "{r:?}");
    g.stop();
}

#[test]
fn idle_zero_guest_sends_flags_not_pages() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let g = Spec {
        pattern: Pattern::Idle,
        ..Spec::default()
    }
    .start(src_dir.path());
    let run = migrate_with(
        g,
        MemTransport::new(),
        "raw",
        1,
        VerifyMode::Digest,
        dst_dir.path(),
    );
    let r = run.report;
    assert!(r.ok && r.verified, "{:?}", r.error);
    let pages = (48u64 << 20) / 4096;
    // Everything but the header page is zero: flags only.
    assert!(
        r.zero_pages >= pages - 2,
        "{} zero of {pages}",
        r.zero_pages
    );
    let page_data = r.payload_bytes - r.blocks_sent.saturating_sub(r.zero_blocks) * 4096;
    assert!(page_data <= 2 * 4096, "{page_data} bytes of page data");
}

fn check_failure_leaves_source_running(fault: MemFault, what: &str) {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let g = Spec {
        pattern: Pattern::Uniform,
        fill: Fill::Random,
        ..Spec::default()
    }
    .start(src_dir.path());
    std::thread::sleep(Duration::from_millis(50));
    let run = migrate_with(
        g.clone(),
        MemTransport::with_fault(fault),
        "lz4",
        2,
        VerifyMode::Digest,
        dst_dir.path(),
    );
    let r = run.report;
    assert!(
        !r.ok,
        "{what}: migration claimed success ({} bytes on the wire)",
        r.bytes_on_wire
    );
    assert!(r
        .rounds
        .iter()
        .any(|x| x.phase == "memory" || x.phase == "storage"));
    assert_eq!(r.source_resumed, Some(true), "{what}");
    assert!(r.error.is_some());
    assert!(
        matches!(run.outcome, DestOutcome::Discarded { .. }),
        "{what}: destination kept the guest"
    );
    // The destination's disk image is gone.
    assert!(
        !dst_dir.path().join("disk0.img").exists(),
        "{what}: destination left files"
    );
    // The source keeps advancing and its own check still passes.
    let before = g.stats().page_writes;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        g.stats().page_writes > before,
        "{what}: source workload stalled"
    );
    let check = g.check_now().unwrap();
    assert!(check.ok, "{what}: {:?}", check.problems);
}

#[test]
fn peer_dying_mid_precopy_resumes_the_source() {
    // Channel 0 of 2 carries ~4 MiB of disk, then ~24 MiB of the 48 MiB of memory: 10 MiB
    // lands inside memory pre-copy.
    check_failure_leaves_source_running(MemFault::BreakAfter(10 << 20), "peer died");
}

#[test]
fn network_stopping_mid_precopy_resumes_the_source() {
    check_failure_leaves_source_running(MemFault::StallAfter(14 << 20), "network stopped");
}

/// A source guest with faults and a record of its dirty-log traffic: it can fail page
/// reads after a count, hide some data pages from its dirty log (a missed-dirty-page bug),
/// and records every page bit fetched and merged back.
struct Instrumented {
    inner: Arc<SimGuest>,
    fail_reads_after: u64,
    hide_every_7th: bool,
    reads: AtomicU64,
    forgot: AtomicU64,
    fetched_pages: Mutex<Bitmap>,
    merged_pages: Mutex<Bitmap>,
}

impl Instrumented {
    fn new(inner: Arc<SimGuest>, fail_reads_after: u64, hide_every_7th: bool) -> Arc<Self> {
        let pages = SourceGuest::layout(&*inner).pages;
        Arc::new(Self {
            inner,
            fail_reads_after,
            hide_every_7th,
            reads: AtomicU64::new(0),
            forgot: AtomicU64::new(0),
            fetched_pages: Mutex::new(Bitmap::new(pages)),
            merged_pages: Mutex::new(Bitmap::new(pages)),
        })
    }
}

impl SourceGuest for Instrumented {
    fn layout(&self) -> GuestLayout {
        SourceGuest::layout(&*self.inner)
    }
    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&self) {}
    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError> {
        let mut b = self.inner.fetch_dirty_pages()?;
        if self.hide_every_7th {
            // Writes to these pages after the full pass are never reported: lost.
            let data_start = self.inner.map().data_start;
            let hide: Vec<u64> = b
                .iter_ones()
                .filter(|i| *i >= data_start && i % 7 == 3)
                .collect();
            for i in &hide {
                b.clear(*i);
            }
            self.forgot.fetch_add(hide.len() as u64, Ordering::Relaxed);
        }
        self.fetched_pages.lock().unwrap().merge(&b);
        Ok(b)
    }
    fn merge_dirty_pages(&self, pages: &Bitmap) {
        self.merged_pages.lock().unwrap().merge(pages);
        self.inner.merge_dirty_pages(pages);
    }
    fn start_block_log(&self) -> Result<(), GuestError> {
        self.inner.start_block_log()
    }
    fn stop_block_log(&self) {}
    fn fetch_dirty_blocks(&self, d: usize) -> Result<Bitmap, GuestError> {
        self.inner.fetch_dirty_blocks(d)
    }
    fn merge_dirty_blocks(&self, d: usize, b: &Bitmap) {
        self.inner.merge_dirty_blocks(d, b)
    }
    fn allocated_blocks(&self, d: usize) -> Result<Bitmap, GuestError> {
        self.inner.allocated_blocks(d)
    }
    fn read_page(&self, i: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        if self.reads.fetch_add(1, Ordering::Relaxed) >= self.fail_reads_after {
            return Err(GuestError::InvalidState("injected read failure".into()));
        }
        SourceGuest::read_page(&*self.inner, i, buf)
    }
    fn read_block(&self, d: usize, i: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        SourceGuest::read_block(&*self.inner, d, i, buf)
    }
    fn pause(&self) -> Result<(), GuestError> {
        SourceGuest::pause(&*self.inner)
    }
    fn resume(&self) -> Result<(), GuestError> {
        SourceGuest::resume(&*self.inner)
    }
    fn save_state(&self) -> Result<StateBlob, GuestError> {
        self.inner.save_state()
    }
    fn handed_over(&self) {
        self.inner.handed_over()
    }
}

#[test]
fn a_failed_round_merges_its_dirty_bits_back() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let inner = Spec {
        pattern: Pattern::Uniform,
        ..Spec::default()
    }
    .start(src_dir.path());
    let pages = (48u64 << 20) / 4096;
    // Fail inside the second memory round: after round 0's reads of every page.
    let rec = Instrumented::new(inner.clone(), pages + 50, false);
    let run = migrate_with(
        rec.clone(),
        MemTransport::new(),
        "raw",
        1,
        VerifyMode::Digest,
        dst_dir.path(),
    );
    assert!(!run.report.ok);
    assert_eq!(run.report.source_resumed, Some(true));
    let fetched = rec.fetched_pages.lock().unwrap().clone();
    let merged = rec.merged_pages.lock().unwrap().clone();
    assert!(fetched.count() > 0, "the failing round fetched nothing");
    // Every bit fetched for the failed round went back into the guest's log.
    assert_eq!(merged, fetched, "dirty bits lost by the failed round");
    let live = inner.fetch_dirty_pages().unwrap();
    let mut missing = merged.clone();
    missing.subtract(&live);
    assert!(
        missing.none(),
        "{} merged bits are not in the live log",
        missing.count()
    );
}

#[test]
fn a_missed_dirty_page_is_caught_by_the_oracle_and_by_full_verify() {
    for verify in [VerifyMode::Digest, VerifyMode::Full] {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        // Unthrottled, so data pages are dirty at any pause, however short the last round.
        let inner = Spec {
            pattern: Pattern::Hotspot,
            dirty_rate: 0,
            ..Spec::default()
        }
        .start(src_dir.path());
        std::thread::sleep(Duration::from_millis(50));
        let g = Instrumented::new(inner.clone(), u64::MAX, true);
        let run = migrate_with(
            g.clone(),
            MemTransport::new(),
            "raw",
            1,
            verify,
            dst_dir.path(),
        );
        assert!(
            g.forgot.load(Ordering::Relaxed) > 0,
            "nothing was dirty at the pause"
        );
        let r = run.report;
        assert!(!r.verified, "{verify:?}: a missed page went unnoticed");
        match verify {
            // The manifest cannot see a page that was never sent; the guest's oracle does.
            VerifyMode::Digest => {
                let o = r.oracle.unwrap();
                assert!(!o.ok && o.detail.contains("holds version"), "{}", o.detail);
            }
            // Full verification refuses before the hand-over: the source keeps the guest.
            VerifyMode::Full => {
                assert!(!r.ok);
                assert_eq!(r.source_resumed, Some(true));
                let e = r.error.unwrap();
                assert!(e.contains("full verification failed"), "{e}");
                assert!(matches!(run.outcome, DestOutcome::Discarded { .. }));
            }
        }
    }
}
