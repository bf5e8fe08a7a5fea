//! Codec throughput and ratio on real guest memory, next to the library baseline.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_benches::{encode_as_engine, indexed, memory_pages, PAGE};
use ferry_core::codec::{DecodeItem, EncodeItem, Unit, UnitKind, TAG_RAW};
use ferry_core::digest::DigestKey;
use ferry_core::zero::is_zero;

const PAGES: usize = 8192; // 32 MiB

fn unit(index: u64) -> Unit {
    Unit {
        kind: UnitKind::Page,
        index,
    }
}

fn codecs(c: &mut Criterion) {
    let (mem, source) = memory_pages(PAGES);
    let pages = indexed(&mem);
    let bytes = mem.len() as u64;
    // One worker thread: Ferry's lz4 stage against lz4_flex called directly, core for core.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group(format!("codec-encode/{source}"));
    g.throughput(Throughput::Bytes(bytes));
    for spec in ["raw", "lz4", "zstd", "dedup", "dedup,xor-delta,lz4", "auto"] {
        let factory = ferry_codecs::parse(spec).unwrap();
        // Report the ratio once, outside the timing.
        let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
        let wire = encode_as_engine(enc.as_mut(), &pages);
        eprintln!(
            "{spec}: ratio {:.2} on {source} pages (zero pages as flags)",
            bytes as f64 / wire.max(1) as f64
        );
        g.bench_function(BenchmarkId::new("ferry-pool", spec), |b| {
            b.iter_batched(
                || ferry_core::codec::CodecFactory::encoder(&factory),
                |mut enc| encode_as_engine(enc.as_mut(), &pages),
                criterion::BatchSize::LargeInput,
            )
        });
        if spec == "lz4" {
            g.bench_function(BenchmarkId::new("ferry-1-thread", spec), |b| {
                one.install(|| {
                    b.iter_batched(
                        || ferry_core::codec::CodecFactory::encoder(&factory),
                        |mut enc| encode_as_engine(enc.as_mut(), &pages),
                        criterion::BatchSize::LargeInput,
                    )
                })
            });
        }
    }
    // The library itself, page by page on one thread, as the baseline for the lz4 stage.
    g.bench_function(BenchmarkId::new("lz4_flex-block", "lz4"), |b| {
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)];
        b.iter(|| {
            let mut n = 0usize;
            for p in mem.chunks(PAGE).filter(|p| !is_zero(p)) {
                n += lz4_flex::block::compress_into(p, &mut out).unwrap();
            }
            n
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("codec-decode/{source}"));
    g.throughput(Throughput::Bytes(bytes));
    let factory = ferry_codecs::parse("lz4").unwrap();
    let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
    // Kept batch by batch: a batch's groups are decoded with that batch.
    let mut encoded: Vec<Vec<(u64, u8, Vec<u8>)>> = Vec::new();
    for chunk in pages.chunks(ferry_benches::BATCH) {
        let mut items: Vec<EncodeItem<'_>> = chunk
            .iter()
            .filter(|(_, p)| !is_zero(p))
            .map(|&(i, p)| EncodeItem {
                unit: unit(i),
                data: p,
                tag: TAG_RAW,
                out: Vec::new(),
            })
            .collect();
        enc.encode_batch(&mut items);
        encoded.push(
            items
                .into_iter()
                .map(|it| {
                    let out = if it.tag == TAG_RAW {
                        it.data.to_vec()
                    } else {
                        it.out
                    };
                    (it.unit.index, it.tag, out)
                })
                .collect(),
        );
    }
    g.bench_function("lz4", |b| {
        let mut dec = ferry_core::codec::CodecFactory::decoder(&factory);
        let mut targets = vec![0u8; ferry_benches::BATCH * PAGE];
        b.iter(|| {
            for chunk in &encoded {
                let mut items: Vec<DecodeItem<'_>> = chunk
                    .iter()
                    .zip(targets.chunks_mut(PAGE))
                    .map(|((i, tag, data), target)| DecodeItem {
                        unit: unit(*i),
                        tag: *tag,
                        input: data,
                        target,
                    })
                    .collect();
                dec.decode_batch(&mut items).unwrap();
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("per-page-checks/{source}"));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("is_zero", |b| {
        b.iter(|| mem.chunks(PAGE).filter(|p| is_zero(p)).count())
    });
    let key = DigestKey::random();
    g.bench_function("unit_digest", |b| {
        b.iter(|| {
            mem.chunks(PAGE)
                .enumerate()
                .fold(0u64, |s, (i, p)| s ^ key.unit(i as u64, p))
        })
    });
    g.finish();
}

/// The second pre-copy round on real memory: snapshot t1 encoded after t0 was sent.
fn pipelines_on_a_second_round(c: &mut Criterion) {
    let (Some(t0), Some(t1)) = (
        ferry_benches::corpus_pages("linux-busy-t0.img.zst", PAGES),
        ferry_benches::corpus_pages("linux-busy-t1.img.zst", PAGES),
    ) else {
        eprintln!("note: corpus not found; skipping the second-round pipeline bench");
        return;
    };
    let changed: Vec<usize> = (0..t0.len() / PAGE)
        .filter(|&i| t0[i * PAGE..(i + 1) * PAGE] != t1[i * PAGE..(i + 1) * PAGE])
        .collect();
    let bytes = (changed.len() * PAGE) as u64;
    let mut g = c.benchmark_group("second-round/corpus");
    g.throughput(Throughput::Bytes(bytes));
    let t0_pages = indexed(&t0);
    let t1_changed: Vec<(u64, &[u8])> = changed
        .iter()
        .map(|&i| (i as u64, &t1[i * PAGE..(i + 1) * PAGE]))
        .collect();
    for spec in [
        "lz4",
        "zstd",
        "xor-delta,lz4",
        "xor-delta,zstd",
        "dedup,xor-delta,lz4",
        "dedup,xor-delta,zstd",
    ] {
        let factory = ferry_codecs::parse(spec).unwrap();
        // Prime an encoder with t0, then measure only the changed pages of t1.
        let primed = || {
            let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
            encode_as_engine(enc.as_mut(), &t0_pages);
            enc
        };
        let mut enc = primed();
        let wire = encode_as_engine(enc.as_mut(), &t1_changed);
        eprintln!(
            "{spec}: {} changed pages of t1 after t0 -> ratio {:.1}",
            changed.len(),
            bytes as f64 / wire.max(1) as f64
        );
        g.bench_function(spec, |b| {
            b.iter_batched(
                primed,
                |mut enc| encode_as_engine(enc.as_mut(), &t1_changed),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, codecs, pipelines_on_a_second_round);
criterion_main!(benches);
