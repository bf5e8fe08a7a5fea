//! The KVM backend's own costs on this machine: fetching the dirty log (KVM's bitmap vs
//! its dirty ring) per GiB, pausing and resuming the vCPUs, saving and restoring the
//! state blob. Skipped, with the reason printed, where /dev/kvm cannot be used.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferry_core::guest::{DestGuest, SourceGuest};
use ferry_disk::Fill;
use ferry_kvm::{DirtyMode, KvmConfig, KvmGuest, Pattern, Workload};

fn guest(memory: u64, pattern: Pattern, mode: DirtyMode) -> KvmGuest {
    KvmGuest::create(&KvmConfig {
        memory,
        vcpus: 1,
        workload: Workload {
            pattern,
            dirty_rate: 0,
            disk_rate: 0,
        },
        disk: None,
        fill: Fill::Zero,
        seed: 1,
        dirty_mode: mode,
    })
    .unwrap()
}

fn dirty_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("kvm_dirty_log_1GiB");
    for mode in [DirtyMode::Bitmap, DirtyMode::Ring] {
        // Nothing dirty: the pure cost of asking (per GiB of guest).
        let idle = guest(1 << 30, Pattern::Idle, mode);
        idle.start();
        idle.start_dirty_log().unwrap();
        g.bench_function(format!("{}/clean", mode.name()), |b| {
            b.iter(|| idle.fetch_dirty_pages().unwrap())
        });
        idle.stop();
        drop(idle);
        // After 20 ms of the guest writing (under logging every first write of a page
        // faults: a few thousand pages): the fetch alone is timed.
        let busy = guest(1 << 30, Pattern::Sequential, mode);
        busy.start_dirty_log().unwrap();
        busy.start();
        busy.pause().unwrap();
        g.bench_function(format!("{}/after_20ms_of_writes", mode.name()), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    SourceGuest::resume(&busy).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    busy.pause().unwrap();
                    let t = Instant::now();
                    let log = busy.fetch_dirty_pages().unwrap();
                    spent += t.elapsed();
                    assert!(log.count() > 0);
                }
                spent
            })
        });
        busy.stop();
    }
    g.finish();
}

fn pause_and_state(c: &mut Criterion) {
    let mut g = c.benchmark_group("kvm_vcpu");
    for vcpus in [1usize, 2] {
        let mut cfg = KvmConfig {
            memory: 16 << 20,
            vcpus,
            workload: Workload::default(),
            disk: None,
            fill: Fill::Zero,
            seed: 1,
            dirty_mode: DirtyMode::Bitmap,
        };
        cfg.workload.pattern = Pattern::Sequential;
        let src = KvmGuest::create(&cfg).unwrap();
        src.start();
        std::thread::sleep(Duration::from_millis(50));
        g.bench_function(format!("pause_resume/{vcpus}vcpu"), |b| {
            b.iter(|| {
                src.pause().unwrap();
                SourceGuest::resume(&src).unwrap();
            })
        });
        src.pause().unwrap();
        g.bench_function(format!("save_state/{vcpus}vcpu"), |b| {
            b.iter(|| src.save_state().unwrap())
        });
        let blob = src.save_state().unwrap();
        let layout = SourceGuest::layout(&src);
        let dir = tempfile::tempdir().unwrap();
        g.bench_function(format!("restore_state/{vcpus}vcpu"), |b| {
            b.iter_batched(
                || KvmGuest::incoming(&layout, dir.path(), DirtyMode::Bitmap).unwrap(),
                |dst| {
                    dst.restore_state(&blob).unwrap();
                    dst
                },
                BatchSize::PerIteration,
            )
        });
        src.stop();
    }
    g.finish();
}

fn kvm(c: &mut Criterion) {
    if let Err(e) = ferry_kvm::available() {
        eprintln!("kvm benches skipped: {e}");
        return;
    }
    dirty_log(c);
    pause_and_state(c);
}

criterion_group!(benches, kvm);
criterion_main!(benches);
