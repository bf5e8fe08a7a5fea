//! Every codec's decoder (raw, lz4, zstd, xor-delta, dedup references, and pipelines of
//! them) on hostile units: the first byte picks the pipeline, then items of
//! `tag:u8 len:u16 bytes`, decoded as one batch into units that hold a known base.
#![no_main]

use ferry_core::codec::{DecodeItem, Unit, UnitKind};
use libfuzzer_sys::fuzz_target;

const SPECS: &[&str] = &[
    "raw",
    "lz4",
    "zstd",
    "xor-delta",
    "dedup",
    "dedup,lz4",
    "xor-delta,zstd",
    "dedup,xor-delta,zstd",
];
const UNIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let spec = SPECS[usize::from(pick) % SPECS.len()];
    let Ok(factory) = ferry_codecs::resolve(spec) else {
        return;
    };
    let mut decoder = factory.decoder();
    // Two batches, so history (dedup's store, xor-delta's base) carries over.
    for _ in 0..2 {
        let mut parts = Vec::new();
        while parts.len() < 8 && rest.len() >= 3 {
            let tag = rest[0];
            let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
            parts.push((tag, &rest[3..3 + len]));
            rest = &rest[3 + len..];
        }
        if parts.is_empty() {
            return;
        }
        let mut targets: Vec<Vec<u8>> = (0..parts.len()).map(|k| vec![k as u8; UNIT]).collect();
        let mut items: Vec<DecodeItem<'_>> = parts
            .iter()
            .zip(targets.iter_mut())
            .enumerate()
            .map(|(k, ((tag, input), target))| DecodeItem {
                unit: Unit {
                    kind: UnitKind::Page,
                    index: k as u64,
                },
                tag: *tag,
                input,
                target,
            })
            .collect();
        let _ = decoder.decode_batch(&mut items);
    }
});
