//! Shared inputs for Ferry's benchmarks: pages of real guest memory from `shared/corpus`
//! (decompressed in memory, never written into the repository), or synthetic pages with a
//! printed note where the corpus is absent.

use std::io::Read;
use std::path::PathBuf;

/// Page size used by the benches.
pub const PAGE: usize = 4096;

/// Where the corpus lives: `FERRY_CORPUS`, or `../shared/corpus` beside the workspace.
pub fn corpus_dir() -> PathBuf {
    std::env::var_os("FERRY_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"))
}

/// Up to `pages` pages of corpus image `name` (e.g. `linux-busy-t0.img.zst`), or `None`.
pub fn corpus_pages(name: &str, pages: usize) -> Option<Vec<u8>> {
    let path = corpus_dir().join(name);
    let f = std::fs::File::open(&path).ok()?;
    let mut d = zstd::stream::read::Decoder::new(f).ok()?;
    d.window_log_max(27).ok()?;
    let mut out = Vec::with_capacity(pages * PAGE);
    d.take((pages * PAGE) as u64).read_to_end(&mut out).ok()?;
    out.truncate(out.len() / PAGE * PAGE);
    (!out.is_empty()).then_some(out)
}

/// Synthetic pages resembling guest memory: a mix of zero, text-like and random pages.
pub fn synthetic_pages(pages: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * PAGE];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (i, p) in out.chunks_mut(PAGE).enumerate() {
        match i % 10 {
            0 => {}
            1..=5 => {
                for (j, b) in p.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[(j + i) % 44];
                }
            }
            _ => {
                for b in p.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
    }
    out
}

/// Corpus pages when available, else synthetic ones; the label says which.
pub fn memory_pages(pages: usize) -> (Vec<u8>, &'static str) {
    match corpus_pages("linux-busy-t0.img.zst", pages) {
        Some(p) => (p, "corpus"),
        None => {
            eprintln!(
                "note: {} not found; benchmarking synthetic pages",
                corpus_dir().join("linux-busy-t0.img.zst").display()
            );
            (synthetic_pages(pages), "synthetic")
        }
    }
}

/// Units per batch, as the engine frames them (256 KiB of 4 KiB pages).
pub const BATCH: usize = 64;

/// Encodes `pages` (index, content) as the engine does: zero pages go as flags (the codec
/// hears of them), the rest in batches of [`BATCH`]. Returns the payload bytes on the wire.
pub fn encode_as_engine(enc: &mut dyn ferry_core::codec::Encoder, pages: &[(u64, &[u8])]) -> usize {
    use ferry_core::codec::{EncodeItem, Unit, UnitKind, TAG_RAW};
    let unit = |index| Unit {
        kind: UnitKind::Page,
        index,
    };
    let mut wire = 0;
    let mut items: Vec<EncodeItem<'_>> = Vec::with_capacity(BATCH);
    for chunk in pages.chunks(BATCH) {
        items.clear();
        for &(i, p) in chunk {
            if ferry_core::zero::is_zero(p) {
                enc.note_sent_plain(unit(i), p);
            } else {
                items.push(EncodeItem {
                    unit: unit(i),
                    data: p,
                    tag: TAG_RAW,
                    out: Vec::new(),
                });
            }
        }
        enc.encode_batch(&mut items);
        wire += items
            .iter()
            .map(|it| {
                if it.tag == TAG_RAW {
                    it.data.len()
                } else {
                    it.out.len()
                }
            })
            .sum::<usize>();
    }
    wire
}

/// The pages of an image as (index, content).
pub fn indexed(mem: &[u8]) -> Vec<(u64, &[u8])> {
    mem.chunks(PAGE)
        .enumerate()
        .map(|(i, p)| (i as u64, p))
        .collect()
}
