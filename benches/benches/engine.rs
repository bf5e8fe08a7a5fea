//! A whole migration over the in-memory transport: the engine's own cost without a network.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::engine::{self, DestConfig, DestOutcome, SourceConfig};
use ferry_core::transport::Transport;
use ferry_core::{DestGuest, GuestLayout};
use ferry_sim::{Fill, Pattern, SimConfig, SimGuest, WorkloadConfig};
use ferry_transports::MemTransport;

const MEMORY: u64 = 64 << 20;
static NEXT: AtomicU64 = AtomicU64::new(0);

fn source(fill: &Fill) -> Arc<SimGuest> {
    let src = SimGuest::create(&SimConfig {
        memory: MEMORY,
        fill: fill.clone(),
        workload: WorkloadConfig {
            pattern: Pattern::Idle,
            ..Default::default()
        },
        ..SimConfig::default()
    })
    .unwrap();
    src.start();
    Arc::new(src)
}

/// One migration of `src` (the destination's creation is part of it, as in real life).
fn migrate_once(src: Arc<SimGuest>, codec: &str, channels: usize) {
    let t = MemTransport::new();
    let name = format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut l = t.listen(&name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dpath = dir.path().to_path_buf();
    let dest = std::thread::spawn(move || {
        let chans = l.accept().unwrap();
        engine::receive(
            chans,
            &|lay: &GuestLayout| {
                SimGuest::incoming(lay, &dpath).map(|g| Arc::new(g) as Arc<dyn DestGuest>)
            },
            &ferry_codecs::resolve,
            &DestConfig::default(),
            &|| {},
        )
    });
    let cfg = SourceConfig {
        addr: name,
        channels,
        io_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let r = engine::migrate(
        src,
        &t,
        ferry_codecs::resolve(codec).unwrap(),
        &cfg,
        &|_| {},
    );
    assert!(r.ok && r.verified, "{:?}", r.error);
    assert!(matches!(dest.join().unwrap(), DestOutcome::Resumed { .. }));
}

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine-mem-transport");
    g.throughput(Throughput::Bytes(MEMORY));
    g.sample_size(10);
    for (codec, channels, fill) in [
        ("raw", 1, Fill::Random),
        ("raw", 2, Fill::Random),
        ("lz4", 2, Fill::Random),
        ("raw", 1, Fill::Zero),
    ] {
        let label = match fill {
            Fill::Zero => "zero",
            _ => "random",
        };
        g.bench_function(
            BenchmarkId::new(format!("{codec}x{channels}"), label),
            |b| {
                b.iter_batched(
                    || source(&fill),
                    |src| migrate_once(src, codec, channels),
                    criterion::BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
