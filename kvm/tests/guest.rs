//! The KVM guest against real `/dev/kvm`: running, checking itself, dirty logging in both
//! modes, and a save/restore round trip into a second VM. Skipped (with the reason
//! printed) where KVM is not available.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry_core::guest::{DestGuest, GuestError, SourceGuest, StateBlob};
use ferry_disk::{DiskSpec, Fill};
use ferry_kvm::{DirtyMode, KvmConfig, KvmGuest, Pattern, Workload};

fn kvm_here() -> bool {
    match ferry_kvm::available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn config(dir: &std::path::Path, vcpus: usize, pattern: Pattern, mode: DirtyMode) -> KvmConfig {
    KvmConfig {
        memory: 16 << 20,
        vcpus,
        workload: Workload {
            pattern,
            dirty_rate: 0,
            disk_rate: 2000,
        },
        disk: Some(DiskSpec {
            path: dir.join("disk0.img"),
            block_size: 4096,
            size: 4 << 20,
            used: 0.5,
            seed: 7,
        }),
        fill: Fill::Random,
        seed: 1,
        dirty_mode: mode,
    }
}

#[test]
fn the_guest_runs_writes_its_disk_and_passes_its_own_check() {
    if !kvm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = KvmGuest::create(&config(dir.path(), 2, Pattern::Scatter, DirtyMode::Bitmap)).unwrap();
    g.start();
    std::thread::sleep(Duration::from_millis(400));
    let s = g.stats();
    assert!(s.running, "{:?}", g.fault());
    assert!(s.passes >= 1, "{s:?}");
    assert!(s.block_writes > 0, "{s:?}");
    let r = g.check_now().unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!(
        r.pages_checked,
        ((16 << 20) - ferry_kvm::layout::WORK) / 4096
    );
    assert!(r.blocks_checked > 0);
    // Pausing stops progress; resuming continues it.
    SourceGuest::pause(&g).unwrap();
    let a = g.stats();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.stats().page_writes, a.page_writes);
    SourceGuest::resume(&g).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(g.stats().page_writes > a.page_writes);
    assert!(g.check_now().unwrap().ok);
    g.stop();
}

/// Every page whose content changed between two pauses is in the dirty log of that
/// interval — for KVM's bitmap and for its dirty ring — including the page the VMM wrote
/// (the block device's buffer).
fn dirty_log_is_complete(mode: DirtyMode, memory: u64, vcpus: usize) {
    let dir = tempfile::tempdir().unwrap();
    let g = KvmGuest::create(&KvmConfig {
        memory,
        ..config(dir.path(), vcpus, Pattern::Sequential, mode)
    })
    .unwrap();
    let pages = SourceGuest::layout(&g).pages;
    let snapshot = |g: &KvmGuest| {
        let mut all = vec![0u8; (pages * 4096) as usize];
        assert!(g.peek(0, &mut all));
        all
    };
    g.start_dirty_log().unwrap();
    g.start();
    std::thread::sleep(Duration::from_millis(200));
    g.pause().unwrap();
    let _ = g.fetch_dirty_pages().unwrap();
    let before = snapshot(&g);
    SourceGuest::resume(&g).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    g.pause().unwrap();
    let log = g.fetch_dirty_pages().unwrap();
    let after = snapshot(&g);
    let mut changed = 0;
    for p in 0..pages {
        let r = (p * 4096) as usize..((p + 1) * 4096) as usize;
        if before[r.clone()] != after[r] {
            changed += 1;
            assert!(
                log.get(p),
                "{mode:?}: page {p} changed but is not in the dirty log"
            );
        }
    }
    assert!(changed > 100, "{mode:?}: only {changed} pages changed");
    for v in 0..vcpus {
        let io_page = ferry_kvm::layout::io_page(v) / 4096;
        assert!(
            log.get(io_page),
            "{mode:?}: the VMM's write into vCPU {v}'s I/O page was not logged"
        );
    }
    eprintln!("{mode:?}: {changed} pages changed, {} logged", log.count());
    g.stop_dirty_log();
    g.stop();
}

#[test]
fn the_dirty_bitmap_sees_every_write() {
    if kvm_here() {
        dirty_log_is_complete(DirtyMode::Bitmap, 16 << 20, 1);
    }
}

#[test]
fn the_dirty_ring_sees_every_write() {
    if kvm_here() {
        dirty_log_is_complete(DirtyMode::Ring, 16 << 20, 1);
    }
}

/// 1.5 GiB is two memory slots; the third vCPU's pages lie in the second one.
#[test]
fn the_dirty_log_spans_memory_slots() {
    if kvm_here() {
        assert_eq!(ferry_kvm::layout::slots(3 << 29).len(), 2);
        dirty_log_is_complete(DirtyMode::Bitmap, 3 << 29, 3);
        dirty_log_is_complete(DirtyMode::Ring, 3 << 29, 3);
    }
}

/// A running source with `vcpus`, paused after 300 ms, and its state.
fn paused_source(dir: &std::path::Path, vcpus: usize) -> (KvmGuest, StateBlob) {
    let src =
        KvmGuest::create(&config(dir, vcpus, Pattern::Sequential, DirtyMode::Bitmap)).unwrap();
    src.start();
    std::thread::sleep(Duration::from_millis(300));
    src.pause().unwrap();
    let blob = src.save_state().unwrap();
    (src, blob)
}

/// A new VM in `dir` holding `src`'s memory (but page `skip`) and disk, not restored yet.
fn copy_of(src: &KvmGuest, dir: &std::path::Path, skip: Option<u64>) -> KvmGuest {
    let layout = SourceGuest::layout(src);
    let dst = KvmGuest::incoming(&layout, dir, DirtyMode::Bitmap).unwrap();
    let mut page = vec![0u8; 4096];
    for p in (0..layout.pages).filter(|p| Some(*p) != skip) {
        SourceGuest::read_page(src, p, &mut page).unwrap();
        dst.write_page(p, &page).unwrap();
    }
    for b in 0..layout.disks[0].blocks {
        SourceGuest::read_block(src, 0, b, &mut page).unwrap();
        dst.write_block(0, b, &page).unwrap();
    }
    dst
}

#[test]
fn state_saved_in_one_vm_resumes_in_another() {
    if !kvm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, blob) = paused_source(dir.path(), 2);
    let passes = src.stats().passes;
    // The blob decodes and re-encodes to the same bytes.
    let again = ferry_kvm::state::encode(&ferry_kvm::state::decode(&blob.bytes).unwrap());
    assert_eq!(again, blob.bytes);

    let dest_dir = tempfile::tempdir().unwrap();
    let dst = copy_of(&src, dest_dir.path(), None);
    // A damaged blob is refused before anything is created.
    let mut bad = blob.bytes.clone();
    bad.truncate(bad.len() - 3);
    assert!(matches!(
        dst.restore_state(&StateBlob {
            version: blob.version,
            bytes: bad
        }),
        Err(GuestError::BadState(_))
    ));
    dst.restore_state(&blob).unwrap();
    DestGuest::resume(&dst).unwrap();
    let r = dst.self_check().unwrap();
    assert!(r.ok, "{:?}", r.problems);
    std::thread::sleep(Duration::from_millis(300));
    let s = dst.stats();
    assert!(
        s.passes > passes,
        "the restored guest did not continue: {s:?}"
    );
    assert!(dst.check_now().unwrap().ok);
    src.stop();
    dst.stop();
}

/// The check is not a formality: a page left behind, or SSE state lost on the way, is
/// found.
#[test]
fn the_check_finds_a_lost_page_and_lost_sse_state() {
    if !kvm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, blob) = paused_source(dir.path(), 1);
    let lost = ferry_kvm::layout::WORK / 4096 + 100;
    let receive = |skip: Option<u64>, blob: &StateBlob| {
        let d = tempfile::tempdir().unwrap();
        let dst = copy_of(&src, d.path(), skip);
        dst.restore_state(blob).unwrap();
        DestGuest::resume(&dst).unwrap();
        let r = dst.self_check().unwrap();
        dst.stop();
        r
    };
    let r = receive(Some(lost), &blob);
    assert!(!r.ok);
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains(&format!("page {lost} "))),
        "{:?}",
        r.problems
    );

    let mut s = ferry_kvm::state::decode(&blob.bytes).unwrap();
    s.vcpus[0].fpu.xmm[0] = [0; 16];
    // XSAVE (restored after the FPU) carries xmm0 too, at byte 160 of its legacy area.
    s.vcpus[0].xsave.region[40..44].fill(0);
    let r = receive(
        None,
        &StateBlob {
            version: blob.version,
            bytes: ferry_kvm::state::encode(&s),
        },
    );
    assert!(!r.ok);
    assert!(
        r.problems.iter().any(|p| p.contains("SSE state lost")),
        "{:?}",
        r.problems
    );
    src.stop();
}
