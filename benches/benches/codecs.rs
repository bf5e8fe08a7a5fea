//! Codec throughput and ratio on real guest memory, next to the library baseline.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_benches::{memory_pages, PAGE};
use ferry_core::codec::{Unit, UnitKind, TAG_RAW};
use ferry_core::digest::unit_digest;
use ferry_core::zero::is_zero;

const PAGES: usize = 8192; // 32 MiB

/// Bytes the pages would take on the wire through `enc` (zero pages as flags, pages the
/// codec does not shrink as raw): the figure a ratio is computed from.
fn wire_bytes<'a>(
    enc: &mut dyn ferry_core::codec::Encoder,
    pages: impl Iterator<Item = (u64, &'a [u8])>,
) -> usize {
    let mut out = Vec::new();
    pages
        .map(|(index, p)| {
            out.clear();
            let unit = Unit {
                kind: UnitKind::Page,
                index,
            };
            if is_zero(p) {
                0
            } else if enc.encode(unit, p, &mut out) == TAG_RAW {
                PAGE
            } else {
                out.len()
            }
        })
        .sum()
}

fn codecs(c: &mut Criterion) {
    let (mem, source) = memory_pages(PAGES);
    let bytes = mem.len() as u64;
    let mut g = c.benchmark_group(format!("codec-encode/{source}"));
    g.throughput(Throughput::Bytes(bytes));
    for spec in ["raw", "lz4", "zstd"] {
        let factory = ferry_codecs::parse(spec).unwrap();
        // Report the ratio once, outside the timing.
        let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
        let wire = wire_bytes(
            enc.as_mut(),
            mem.chunks(PAGE).enumerate().map(|(i, p)| (i as u64, p)),
        );
        eprintln!(
            "{spec}: ratio {:.2} on {source} pages (zero pages as flags)",
            bytes as f64 / wire.max(1) as f64
        );
        g.bench_function(BenchmarkId::new("ferry", spec), |b| {
            let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
            let mut out = Vec::with_capacity(2 * PAGE);
            b.iter(|| {
                let mut n = 0usize;
                for (i, p) in mem.chunks(PAGE).enumerate() {
                    out.clear();
                    let unit = Unit {
                        kind: UnitKind::Page,
                        index: i as u64,
                    };
                    enc.encode(unit, p, &mut out);
                    n += out.len();
                }
                n
            })
        });
    }
    // The library itself, page by page, as the baseline for Ferry's lz4 stage.
    g.bench_function(BenchmarkId::new("lz4_flex-block", "lz4"), |b| {
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)];
        b.iter(|| {
            let mut n = 0usize;
            for p in mem.chunks(PAGE) {
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
    let encoded: Vec<(u8, Vec<u8>)> = mem
        .chunks(PAGE)
        .enumerate()
        .map(|(i, p)| {
            let mut out = Vec::new();
            let unit = Unit {
                kind: UnitKind::Page,
                index: i as u64,
            };
            (enc.encode(unit, p, &mut out), out)
        })
        .collect();
    g.bench_function("lz4", |b| {
        let mut dec = ferry_core::codec::CodecFactory::decoder(&factory);
        let mut target = vec![0u8; PAGE];
        b.iter(|| {
            for (i, (tag, data)) in encoded.iter().enumerate() {
                if *tag != TAG_RAW {
                    let unit = Unit {
                        kind: UnitKind::Page,
                        index: i as u64,
                    };
                    dec.decode(unit, *tag, data, &mut target).unwrap();
                }
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("per-page-checks/{source}"));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("is_zero", |b| {
        b.iter(|| mem.chunks(PAGE).filter(|p| is_zero(p)).count())
    });
    g.bench_function("unit_digest", |b| {
        b.iter(|| {
            mem.chunks(PAGE)
                .enumerate()
                .fold(0u64, |s, (i, p)| s.wrapping_add(unit_digest(i as u64, p)))
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
    for spec in ["lz4", "zstd", "xor-delta,lz4", "xor-delta,zstd"] {
        let factory = ferry_codecs::parse(spec).unwrap();
        // Prime an encoder with t0, then measure only the changed pages of t1.
        let primed = || {
            let mut enc = ferry_core::codec::CodecFactory::encoder(&factory);
            let mut out = Vec::new();
            for (i, p) in t0.chunks(PAGE).enumerate() {
                out.clear();
                let unit = Unit {
                    kind: UnitKind::Page,
                    index: i as u64,
                };
                // Zero pages go as flags; raw ones as they are: the codec hears of both.
                if is_zero(p) || enc.encode(unit, p, &mut out) == TAG_RAW {
                    enc.note_sent_plain(unit, p);
                }
            }
            enc
        };
        let mut enc = primed();
        let wire = wire_bytes(
            enc.as_mut(),
            changed
                .iter()
                .map(|&i| (i as u64, &t1[i * PAGE..(i + 1) * PAGE])),
        );
        eprintln!(
            "{spec}: {} changed pages of t1 after t0 -> ratio {:.1}",
            changed.len(),
            bytes as f64 / wire.max(1) as f64
        );
        g.bench_function(spec, |b| {
            b.iter_batched(
                primed,
                |mut enc| {
                    let mut out = Vec::with_capacity(2 * PAGE);
                    let mut n = 0usize;
                    for &i in &changed {
                        out.clear();
                        let unit = Unit {
                            kind: UnitKind::Page,
                            index: i as u64,
                        };
                        enc.encode(unit, &t1[i * PAGE..(i + 1) * PAGE], &mut out);
                        n += out.len();
                    }
                    n
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, codecs, pipelines_on_a_second_round);
criterion_main!(benches);
