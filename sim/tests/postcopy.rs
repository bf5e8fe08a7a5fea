//! Memory post-copy and auto-converge end to end with real sim guests: guest memory
//! registered with userfaultfd on the destination, faults served from the source.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry_core::engine::{DestOutcome, MemoryMode};
use ferry_core::policy::StopReason;
use ferry_core::wire::VerifyMode;
use ferry_sim::{Fill, Pattern};
use ferry_transports::MemTransport;

mod common;
use common::{migrate_tuned, Spec};

/// Whether this machine lets us use userfaultfd (root, or the sysctl allows it).
fn uffd_available() -> bool {
    let ok = userfaultfd::UffdBuilder::new()
        .user_mode_only(false)
        .create()
        .is_ok();
    if !ok {
        eprintln!("skipping: userfaultfd is not available here");
    }
    ok
}

#[test]
fn postcopy_moves_memory_after_the_hand_over_and_the_guest_verifies() {
    if !uffd_available() {
        return;
    }
    for (codec, verify) in [
        ("raw", VerifyMode::Full),
        ("lz4", VerifyMode::Digest),
        ("dedup,zstd", VerifyMode::Full),
        ("xor-delta,lz4", VerifyMode::Digest),
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
        let run = migrate_tuned(
            g,
            MemTransport::new(),
            codec,
            2,
            verify,
            dst_dir.path(),
            |c| {
                c.memory_mode = MemoryMode::PostCopy;
            },
        );
        let r = &run.report;
        assert!(r.ok && r.verified, "{codec}: {:?} {:?}", r.error, r.oracle);
        assert_eq!(r.memory_mode, "postcopy");
        assert_eq!(r.stop_reason, Some(StopReason::Postcopy));
        // No memory round before the pause; every page after the hand-over, once.
        assert!(
            r.rounds.iter().all(|x| x.phase != "memory"),
            "{:?}",
            r.rounds
        );
        let pages = (48u64 << 20) / 4096;
        assert_eq!(r.pages_postcopy, pages);
        assert_eq!(r.pages_pushed + r.pages_demanded, pages, "{r:?}");
        assert!(r.postcopy_faults > 0, "the resumed guest never faulted?");
        assert!(r.fault_latency_us[0] > 0 && r.fault_latency_us[2] >= r.fault_latency_us[1]);
        let DestOutcome::Resumed { report, .. } = run.outcome else {
            panic!("destination did not resume")
        };
        assert_eq!(report.postcopy_faults, r.postcopy_faults);
        let dest = run.dest.unwrap();
        assert_eq!(ferry_core::DestGuest::owed_pages(&*dest), 0);
    }
}

#[test]
fn hybrid_switches_to_postcopy_when_precopy_cannot_converge() {
    if !uffd_available() {
        return;
    }
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    // Flat-out uniform writes over a 40 MB/s link: pre-copy never reaches 20 ms.
    let g = Spec {
        pattern: Pattern::Uniform,
        dirty_rate: 0,
        ..Spec::default()
    }
    .start(src_dir.path());
    std::thread::sleep(Duration::from_millis(50));
    let run = migrate_tuned(
        g,
        MemTransport::new(),
        "raw",
        2,
        VerifyMode::Digest,
        dst_dir.path(),
        |c| {
            c.memory_mode = MemoryMode::Hybrid;
            c.max_bandwidth = Some(40_000_000);
            c.policy.max_rounds = 6;
        },
    );
    let r = &run.report;
    assert!(r.ok && r.verified, "{:?} {:?}", r.error, r.oracle);
    assert_eq!(r.memory_mode, "hybrid");
    assert!(r.switch_round.is_some(), "{r:?}");
    assert!(r.pages_postcopy > 0);
    assert!(r.rounds.iter().any(|x| x.phase == "memory"));
    assert!(r.rounds.iter().any(|x| x.phase == "post-copy"));
    // The pause sent the state and a bitmap, not the hot pages.
    let fin = r
        .rounds
        .iter()
        .find(|x| x.phase == "stop-and-copy")
        .unwrap();
    assert!(fin.sent - fin.blocks == 0, "{fin:?}");
    // The switch came early in the first pass: memory moved about once, not round after
    // round.
    let pages = (48u64 << 20) / 4096;
    assert!(
        r.pages_sent * 10 <= pages * 11,
        "{} of {pages}",
        r.pages_sent
    );
    assert_eq!(r.stop_reason, Some(StopReason::Diverging));
}

#[test]
fn auto_converge_throttles_the_guest_until_precopy_converges() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let g = Spec {
        pattern: Pattern::Uniform,
        dirty_rate: 0,
        disk_rate: 0,
        ..Spec::default()
    }
    .start(src_dir.path());
    std::thread::sleep(Duration::from_millis(50));
    let run = migrate_tuned(
        g,
        MemTransport::new(),
        "raw",
        2,
        VerifyMode::Digest,
        dst_dir.path(),
        |c| {
            c.max_bandwidth = Some(40_000_000);
            c.policy.max_rounds = 30;
        },
    );
    let r = &run.report;
    assert!(r.ok && r.verified, "{:?} {:?}", r.error, r.oracle);
    assert!(r.vcpu_throttle_pct >= 20, "{r:?}");
    assert!(r.vcpu_throttled_ms > 0.0);
}
