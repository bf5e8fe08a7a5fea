//! Local storage: image identity and generations, incremental migration back, and the
//! fall-back to a full copy when the metadata cannot be trusted.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{migrate_tuned, migrate_with, Spec};
use ferry_core::engine::DestOutcome;
use ferry_core::engine::{StorageMode, Throttle};
use ferry_core::image::{sidecar_path, Sidecar, SidecarState, SidecarStatus};
use ferry_core::wire::VerifyMode;
use ferry_sim::Pattern;
use ferry_transports::MemTransport;

const DISK: u64 = 64 << 20;
const BLOCKS: u64 = DISK / 4096;

/// A guest with a 64 MiB disk (half filled) written at ~150 blocks/s, uniformly.
fn busy_disk_guest(dir: &std::path::Path) -> std::sync::Arc<ferry_sim::SimGuest> {
    Spec {
        disk_size: DISK,
        disk_rate: 150,
        pattern: Pattern::Uniform,
        dirty_rate: 5_000,
        ..Spec::default()
    }
    .start(dir)
}

#[test]
fn a_to_b_to_a_sends_only_what_b_wrote() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // 64 MiB disk, half filled; the workload writes ~150 blocks/s (uniform).
    let a = busy_disk_guest(dir_a.path());
    std::thread::sleep(Duration::from_millis(200));

    // A -> B: B holds nothing, so a full copy.
    let out = migrate_with(
        a.clone(),
        MemTransport::new(),
        "lz4",
        2,
        VerifyMode::Full,
        dir_b.path(),
    );
    assert!(
        out.report.ok && out.report.verified,
        "{:?}",
        out.report.error
    );
    assert_eq!(out.report.disk_plans, vec!["full"]);
    // A's copy is now the base of the next generation.
    let img_a = dir_a.path().join("disk0.img");
    let SidecarStatus::Valid(base) = Sidecar::load(&img_a, 4096, BLOCKS) else {
        panic!("no base sidecar on A")
    };
    assert_eq!(base.state, SidecarState::Base);
    let b = out.dest.unwrap();
    assert!(matches!(out.outcome, DestOutcome::Resumed { .. }));
    assert_eq!(
        b.disks()[0].identity(),
        base.identity,
        "B continues A's image"
    );

    // B runs for a while, writing about 2% of the blocks.
    std::thread::sleep(Duration::from_millis(1200));
    let written_on_b = b.disks()[0]
        .written_since(base.identity.generation)
        .unwrap()
        .count();
    assert!(written_on_b > 50, "B wrote only {written_on_b} blocks");

    // B -> A: A holds the base, so only B's writes move; full verification proves A's
    // image ends up equal to B's.
    let back = migrate_with(
        b.clone(),
        MemTransport::new(),
        "lz4",
        2,
        VerifyMode::Full,
        dir_a.path(),
    );
    let r = &back.report;
    assert!(r.ok && r.verified, "{:?}", r.error);
    assert_eq!(r.disk_plans, vec!["incremental"]);
    let first = &r.rounds[0];
    assert_eq!(first.phase, "storage");
    assert!(
        first.sent as f64 <= written_on_b as f64 * 1.05 + 20.0,
        "first pass sent {} blocks for {written_on_b} written on B",
        first.sent
    );
    assert!(r.blocks_skipped_base >= BLOCKS - first.sent - 1);
    eprintln!(
        "return leg: {} blocks sent in all ({} in the first pass) for {written_on_b} written on B; {} bytes on the wire",
        r.blocks_sent, first.sent, r.bytes_on_wire
    );
    let a2 = back.dest.unwrap();
    assert_eq!(
        a2.disks()[0].identity().generation,
        base.identity.generation + 1
    );
}

#[test]
fn a_corrupt_or_truncated_sidecar_falls_back_to_a_hash_compared_copy() {
    for damage in ["truncate", "flip"] {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let a = busy_disk_guest(dir_a.path());
        std::thread::sleep(Duration::from_millis(100));
        let out = migrate_with(
            a,
            MemTransport::new(),
            "raw",
            1,
            VerifyMode::Digest,
            dir_b.path(),
        );
        assert!(out.report.ok && out.report.verified);
        let b = out.dest.unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Damage A's base metadata.
        let sc = sidecar_path(&dir_a.path().join("disk0.img"));
        let mut bytes = std::fs::read(&sc).unwrap();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 2),
            _ => bytes[40] ^= 0x55,
        }
        std::fs::write(&sc, &bytes).unwrap();
        let back = migrate_with(
            b,
            MemTransport::new(),
            "raw",
            1,
            VerifyMode::Full,
            dir_a.path(),
        );
        let r = back.report;
        assert!(r.ok && r.verified, "{damage}: {:?}", r.error);
        assert_eq!(
            r.disk_plans,
            vec!["hash-compared"],
            "{damage}: trusted a damaged sidecar"
        );
    }
}

#[test]
fn an_unclean_stop_is_never_trusted_for_incremental_migration() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = busy_disk_guest(dir_a.path());
    std::thread::sleep(Duration::from_millis(100));
    // While A runs, its sidecar says "open": a crash now leaves an untrusted history.
    let img = dir_a.path().join("disk0.img");
    let SidecarStatus::Valid(sc) = Sidecar::load(&img, 4096, BLOCKS) else {
        panic!("no sidecar while running")
    };
    assert_eq!(sc.state, SidecarState::Open);
    // A copy of that crashed state in B's directory is not a base.
    std::fs::copy(&img, dir_b.path().join("disk0.img")).unwrap();
    std::fs::copy(
        sidecar_path(&img),
        sidecar_path(&dir_b.path().join("disk0.img")),
    )
    .unwrap();
    let out = migrate_with(
        a,
        MemTransport::new(),
        "raw",
        1,
        VerifyMode::Full,
        dir_b.path(),
    );
    assert!(
        out.report.ok && out.report.verified,
        "{:?}",
        out.report.error
    );
    assert_eq!(out.report.disk_plans, vec!["hash-compared"]);
}

#[test]
fn hash_compared_copy_sends_only_the_blocks_that_differ() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // No disk writes during the migration, so the first pass is exactly the difference.
    let a = Spec {
        disk_size: DISK,
        disk_rate: 0,
        pattern: Pattern::Idle,
        dirty_rate: 0,
        ..Spec::default()
    }
    .start(dir_a.path());
    // B holds an unmanaged copy of A's image in which 5% of the blocks differ.
    let img_a = dir_a.path().join("disk0.img");
    let img_b = dir_b.path().join("disk0.img");
    std::fs::copy(&img_a, &img_b).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img_b)
        .unwrap();
    let mut changed = 0u64;
    for b in (0..BLOCKS).filter(|b| b % 20 == 7) {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xa5; 4096], b * 4096).unwrap();
        changed += 1;
    }
    drop(f);
    let out = migrate_with(
        a,
        MemTransport::new(),
        "raw",
        1,
        VerifyMode::Full,
        dir_b.path(),
    );
    let r = out.report;
    assert!(r.ok && r.verified, "{:?}", r.error);
    assert_eq!(r.disk_plans, vec!["hash-compared"]);
    let first = &r.rounds[0];
    assert_eq!(first.phase, "storage");
    assert_eq!(
        first.sent, changed,
        "sent {} blocks for {changed} that differ",
        first.sent
    );
    assert_eq!(r.blocks_skipped_base, BLOCKS - changed);
    eprintln!(
        "hash-compared: {} of {BLOCKS} blocks sent ({:.1}%), {} storage bytes on the wire",
        first.sent,
        100.0 * first.sent as f64 / BLOCKS as f64,
        first.bytes
    );
}

#[test]
fn throttling_lets_storage_converge_over_a_slow_link() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // The guest writes 16 MB/s of blocks (and few pages); the link carries 6 MiB/s.
    let a = Spec {
        memory: 8 << 20,
        disk_rate: 4000,
        pattern: Pattern::Uniform,
        dirty_rate: 20,
        ..Spec::default()
    }
    .start(dir_a.path());
    std::thread::sleep(Duration::from_millis(100));
    let out = migrate_tuned(
        a,
        MemTransport::new(),
        "raw",
        1,
        VerifyMode::Digest,
        dir_b.path(),
        |c| {
            c.max_bandwidth = Some(6 << 20);
            c.throttle = Throttle::Auto;
        },
    );
    let r = out.report;
    for x in &r.rounds {
        eprintln!(
            "{} {} dirty {} sent {} blocks {} bytes {} ms {:.0}",
            x.phase, x.index, x.dirty, x.sent, x.blocks, x.bytes, x.ms
        );
    }
    assert!(r.ok && r.verified, "{:?}", r.error);
    assert!(r.throttle_blocks_per_s.is_some(), "never throttled");
    assert!(r.throttled_ms > 0.0);
    let last = r.rounds.last().unwrap();
    assert_eq!(last.phase, "stop-and-copy");
    assert!(
        last.blocks < 1000,
        "{} blocks left for the pause",
        last.blocks
    );
    assert_eq!(
        r.stop_reason,
        Some(ferry_core::policy::StopReason::Converged)
    );
    eprintln!(
        "throttled {:.0} ms at {:?} blocks/s; {} blocks in the pause; downtime {:.1} ms; stop {:?}",
        r.throttled_ms, r.throttle_blocks_per_s, last.blocks, r.downtime_ms, r.stop_reason
    );
}

/// A guest whose disk is written faster than a 16 MiB/s link carries it (many blocks are
/// still dirty at the pause), migrated from `dir_a` to `dir_b` with storage post-copy.
fn postcopy_migration(
    dir_a: &std::path::Path,
    dir_b: &std::path::Path,
    codec: &str,
    verify: VerifyMode,
) -> common::Run {
    let a = Spec {
        memory: 8 << 20,
        disk_rate: 8000,
        pattern: Pattern::Uniform,
        dirty_rate: 20,
        ..Spec::default()
    }
    .start(dir_a);
    std::thread::sleep(Duration::from_millis(100));
    migrate_tuned(a, MemTransport::new(), codec, 2, verify, dir_b, |c| {
        c.max_bandwidth = Some(16 << 20);
        c.throttle = Throttle::Off;
        c.storage_mode = StorageMode::PostCopy;
    })
}

#[test]
fn storage_postcopy_resumes_at_once_and_ends_with_the_sources_disk() {
    use std::os::unix::fs::FileExt;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let out = postcopy_migration(dir_a.path(), dir_b.path(), "raw", VerifyMode::Digest);
    let r = out.report;
    assert!(r.ok && r.verified, "{:?} {:?}", r.error, r.oracle);
    assert_eq!(r.storage_mode, "postcopy");
    let pause = r
        .rounds
        .iter()
        .find(|x| x.phase == "stop-and-copy")
        .unwrap();
    assert_eq!(pause.blocks, 0, "blocks moved during the pause");
    assert!(
        r.blocks_postcopy > 200,
        "only {} blocks owed",
        r.blocks_postcopy
    );
    assert!(r.rounds.iter().any(|x| x.phase == "post-copy"));
    eprintln!(
        "post-copy: {} blocks owed, {} pulled; downtime {:.1} ms",
        r.blocks_postcopy, r.blocks_pulled, r.downtime_ms
    );
    // The destination's disk equals the source's at the pause, but for the blocks its
    // own guest wrote since (those win over the late copies).
    let b = out.dest.unwrap();
    b.stop();
    let mine = b.disks()[0]
        .written_since(b.disks()[0].identity().generation)
        .unwrap();
    let src = std::fs::File::open(dir_a.path().join("disk0.img")).unwrap();
    let dst = std::fs::File::open(dir_b.path().join("disk0.img")).unwrap();
    let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut compared = 0;
    for blk in 0..(16u64 << 20) / 4096 {
        if mine.get(blk) {
            continue;
        }
        src.read_exact_at(&mut x, blk * 4096).unwrap();
        dst.read_exact_at(&mut y, blk * 4096).unwrap();
        assert!(x == y, "block {blk} differs from the source's");
        compared += 1;
    }
    assert!(compared > 3000);
}

/// `--verify full` hashes the whole guest in the pause: with storage post-copy the owed
/// blocks are not at the destination yet, so both sides leave them out and the push checks
/// them. A codec that decodes against the destination's copy (xor-delta) must not wait for
/// an owed block to decode that very block.
#[test]
fn storage_postcopy_with_full_verification_and_a_delta_codec() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let out = postcopy_migration(
        dir_a.path(),
        dir_b.path(),
        "xor-delta,lz4",
        VerifyMode::Full,
    );
    let r = out.report;
    assert!(r.ok && r.verified, "{:?} {:?}", r.error, r.oracle);
    assert!(r.blocks_postcopy > 0, "nothing was owed");
    assert!(r.downtime_breakdown.full_verify_ms > 0.0);
}
