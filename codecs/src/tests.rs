//! Round trips of every pipeline over random version histories, batch by batch as the
//! engine drives them, and hostile input for every decoder.

use ferry_core::codec::{
    CodecError, CodecFactory, DecodeItem, EncodeItem, Unit, UnitKind, TAG_RAW,
};
use std::time::Duration;

use proptest::prelude::*;

use crate::{parse, SpecError};

const PAGE: usize = 4096;
const UNITS: usize = 8;

fn unit(i: u64) -> Unit {
    Unit {
        kind: UnitKind::Page,
        index: i,
    }
}

fn page(seed: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..PAGE)
        .map(|i| {
            if compressible && i % 64 > 8 {
                0x41
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// Changes `flips` bytes at pseudo-random places.
fn evolve(page: &mut [u8], seed: u64, flips: usize) {
    let mut x = seed | 1;
    for _ in 0..flips {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x as usize) % page.len();
        page[i] = (x >> 32) as u8;
    }
}

const SPECS: &[&str] = &[
    "raw",
    "lz4",
    "zstd",
    "zstd:9",
    "xor-delta",
    "xor-delta,lz4",
    "xor-delta,zstd:1",
    "dedup",
    "dedup,lz4",
    "dedup,xor-delta,lz4",
    "dedup:64KiB,xor-delta,zstd",
    "auto",
];

/// What happens to a unit in one step.
#[derive(Debug, Clone)]
enum Change {
    Flip(u64, usize),
    Zero,
    CopyOf(usize),
    Fresh(u64, bool),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (any::<u64>(), 0usize..300).prop_map(|(s, f)| Change::Flip(s, f)),
        1 => Just(Change::Zero),
        2 => (0..UNITS).prop_map(Change::CopyOf),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(s, c)| Change::Fresh(s, c)),
    ]
}

/// Decoder items for what was sent, (unit, tag, bytes) each, into `targets` in order.
fn decode_items<'a>(
    sent: &'a [(usize, u8, Vec<u8>)],
    targets: impl Iterator<Item = &'a mut [u8]>,
) -> Vec<DecodeItem<'a>> {
    sent.iter()
        .zip(targets)
        .map(|(s, target)| DecodeItem {
            unit: unit(s.0 as u64),
            tag: s.1,
            input: &s.2,
            target,
        })
        .collect()
}

/// Source and destination of one channel, driven batch by batch like the engine.
struct Link {
    enc: Box<dyn ferry_core::codec::Encoder>,
    dec: Box<dyn ferry_core::codec::Decoder>,
    src: Vec<Vec<u8>>,
    dst: Vec<Vec<u8>>,
    wire: usize,
}

impl Link {
    fn new(spec: &str) -> Self {
        let p = parse(spec).unwrap();
        Self {
            enc: p.encoder(),
            dec: p.decoder(),
            src: (0..UNITS as u64).map(|i| page(i, i % 2 == 0)).collect(),
            dst: vec![vec![0u8; PAGE]; UNITS],
            wire: 0,
        }
    }

    /// Sends the given units (each once) as one batch and checks the destination.
    fn batch(&mut self, units: &[usize]) -> Result<(), TestCaseError> {
        let mut items = Vec::new();
        for &u in units {
            if self.src[u].iter().all(|b| *b == 0) {
                self.enc.note_sent_plain(unit(u as u64), &self.src[u]);
                self.dst[u].fill(0);
                continue;
            }
            if self.enc.is_raw() {
                // The engine's raw path: the encoder only sees units offered for trials.
                self.enc.sample_raw(unit(u as u64), &self.src[u]);
                self.dst[u].copy_from_slice(&self.src[u]);
                continue;
            }
            items.push(EncodeItem {
                unit: unit(u as u64),
                data: &self.src[u],
                tag: TAG_RAW,
                out: Vec::new(),
            });
        }
        self.enc.encode_batch(&mut items);
        let sent: Vec<(usize, u8, Vec<u8>)> = items
            .iter()
            .map(|it| {
                let u = it.unit.index as usize;
                if it.tag == TAG_RAW {
                    prop_assert!(it.out.is_empty());
                    Ok((u, TAG_RAW, it.data.to_vec()))
                } else {
                    prop_assert!(it.out.len() <= PAGE, "{} bytes", it.out.len());
                    Ok((u, it.tag, it.out.clone()))
                }
            })
            .collect::<Result<_, TestCaseError>>()?;
        drop(items);
        self.wire += sent.iter().map(|s| s.2.len()).sum::<usize>();
        // Raw units are written as they are; only encoded ones reach the decoder.
        let (raw, sent): (Vec<_>, Vec<_>) = sent.into_iter().partition(|s| s.1 == TAG_RAW);
        for (u, _, data) in raw {
            self.dst[u] = data;
        }
        let mut targets: Vec<(usize, Vec<u8>)> =
            sent.iter().map(|s| (s.0, self.dst[s.0].clone())).collect();
        let mut ditems = decode_items(&sent, targets.iter_mut().map(|t| &mut t.1[..]));
        self.dec
            .decode_batch(&mut ditems)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", self.enc.stats().len())))?;
        for (u, t) in targets {
            prop_assert_eq!(&t, &self.src[u], "unit {} decoded wrong", u);
            self.dst[u] = t;
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_pipeline_roundtrips_random_version_histories(
        steps in proptest::collection::vec(
            (proptest::collection::vec((0..UNITS, change()), 1..8), any::<bool>()), 1..24)
    ) {
        for spec in SPECS {
            let mut link = Link::new(spec);
            for (batch, slow) in &steps {
                // Tell adaptive encoders the link is slow (sender waiting all the time) or
                // fast (never waiting), so `auto` switches codecs mid-history.
                let (bytes, send) = if *slow { (1_000, 200) } else { (1 << 30, 0) };
                link.enc.note_link(bytes, Duration::from_millis(send), Duration::from_millis(200));
                let mut units: Vec<usize> = Vec::new();
                for (u, c) in batch {
                    match c {
                        Change::Flip(s, f) => evolve(&mut link.src[*u], *s, *f),
                        Change::Zero => link.src[*u].fill(0),
                        Change::CopyOf(o) => link.src[*u] = link.src[*o].clone(),
                        Change::Fresh(s, c) => link.src[*u] = page(*s, *c),
                    }
                    if !units.contains(u) {
                        units.push(*u);
                    }
                }
                link.batch(&units)?;
            }
        }
    }

    #[test]
    fn malformed_input_never_panics_any_pipeline(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        tag in any::<u8>(),
    ) {
        for spec in SPECS {
            let mut dec = parse(spec).unwrap().decoder();
            let mut target = vec![7u8; PAGE];
            let _ = dec.decode(unit(0), tag, &bytes, &mut target);
        }
    }
}

#[test]
fn an_unchanged_page_costs_almost_nothing_with_xor_delta() {
    let p = parse("xor-delta").unwrap();
    let mut enc = p.encoder();
    let data = page(3, false);
    let mut out = Vec::new();
    assert_eq!(
        enc.encode(unit(1), &data, &mut out),
        TAG_RAW,
        "first version has no base"
    );
    out.clear();
    let tag = enc.encode(unit(1), &data, &mut out);
    assert_ne!(tag, TAG_RAW);
    assert!(out.len() <= 2, "{} bytes for an unchanged page", out.len());
    let mut d2 = data.clone();
    d2[100] ^= 1;
    d2[3000] ^= 1;
    out.clear();
    enc.encode(unit(1), &d2, &mut out);
    assert!(out.len() < 16, "{} bytes for a two-byte change", out.len());
    let mut target = data.clone();
    p.decoder().decode(unit(1), 1, &out, &mut target).unwrap();
    assert_eq!(target, d2);
}

#[test]
fn duplicate_content_goes_as_a_reference_and_unknown_references_fail() {
    let mut link = Link::new("dedup,lz4");
    let shared = page(9, false);
    for u in 0..UNITS {
        link.src[u] = shared.clone();
    }
    link.batch(&(0..UNITS).collect::<Vec<_>>()).unwrap();
    // One copy travels, the rest are references of a byte or two.
    assert!(link.wire < PAGE + UNITS * 4, "{} bytes", link.wire);
    let stats = link.enc.stats();
    assert_eq!(stats[0].stage, "dedup");
    assert_eq!(stats[0].units_applied, UNITS as u64 - 1);
    assert_eq!(stats[0].cache_hits, UNITS as u64 - 1);
    // A fresh decoder has registered nothing.
    let mut dec = parse("dedup,lz4").unwrap().decoder();
    let mut target = vec![0u8; PAGE];
    let e = dec
        .decode(unit(0), ferry_core::codec::TAG_REFERENCE, &[1], &mut target)
        .unwrap_err();
    assert!(e.to_string().contains("unknown content"), "{e}");
    // A pipeline without dedup knows no references.
    let mut dec = parse("lz4").unwrap().decoder();
    assert_eq!(
        dec.decode(unit(0), ferry_core::codec::TAG_REFERENCE, &[1], &mut target),
        Err(CodecError::UnknownTag(0x80))
    );
}

#[test]
fn truncated_and_lying_lz4_is_rejected() {
    let p = parse("lz4").unwrap();
    let data = page(5, true);
    let mut out = Vec::new();
    let tag = p.encoder().encode(unit(0), &data, &mut out);
    assert_eq!(tag, 1);
    let mut target = vec![0u8; PAGE];
    for cut in 0..out.len() {
        assert!(p
            .decoder()
            .decode(unit(0), tag, &out[..cut], &mut target)
            .is_err());
    }
    let mut lie = out.clone();
    lie[..4].copy_from_slice(&100_000u32.to_le_bytes());
    assert!(p.decoder().decode(unit(0), tag, &lie, &mut target).is_err());
    assert_eq!(
        p.decoder().decode(unit(0), 2, &out, &mut target),
        Err(CodecError::UnknownTag(2))
    );
}

#[test]
fn spec_strings_are_canonical_and_negotiable() {
    for (given, canon) in [
        ("raw", "raw"),
        ("LZ4", "lz4"),
        ("dedup, xor-delta ,zstd", "dedup,xor-delta,zstd:3"),
        ("auto", "auto"),
    ] {
        let p = parse(given).unwrap();
        assert_eq!(p.spec(), canon);
        assert_eq!(parse(&p.spec()).unwrap(), p, "{canon} parses to itself");
    }
    assert!(matches!(parse("lz4,xor-delta"), Err(SpecError::Order(_))));
}

#[test]
fn auto_compresses_on_a_slow_link_and_not_on_a_fast_one() {
    let mut link = Link::new("auto");
    let all: Vec<usize> = (0..UNITS).collect();
    for round in 0..6u64 {
        for u in 0..UNITS {
            evolve(&mut link.src[u], round * 31 + u as u64, 40);
        }
        link.enc.note_link(
            1_000,
            Duration::from_millis(190),
            Duration::from_millis(200),
        );
        link.batch(&all).unwrap();
    }
    let slow = link.enc.choices();
    let compressed: u64 = slow.iter().filter(|c| c.0 != "raw").map(|c| c.1).sum();
    assert!(compressed >= 3, "{slow:?}");
    for round in 0..8u64 {
        for u in 0..UNITS {
            evolve(&mut link.src[u], round * 17 + u as u64, 40);
        }
        link.enc
            .note_link(10 << 30, Duration::ZERO, Duration::from_millis(200));
        link.batch(&all).unwrap();
    }
    let fast = link.enc.choices();
    let raw_after = fast[0].1 - slow[0].1;
    assert!(raw_after >= 6, "{slow:?} then {fast:?}");
}

/// A page that shares most of its bytes with its neighbours but never repeats within
/// itself in a way a 4 KiB window alone could exploit.
fn neighbour_page(common: &[u8], seed: u64) -> Vec<u8> {
    let mut p = common.to_vec();
    evolve(&mut p, seed, 64);
    p
}

#[test]
fn neighbouring_pages_compress_together() {
    let common = page(77, false);
    for spec in ["lz4", "zstd", "dedup,xor-delta,zstd:1"] {
        let mut link = Link::new(spec);
        for u in 0..UNITS {
            link.src[u] = neighbour_page(&common, 2 * u as u64 + 1);
        }
        link.batch(&(0..UNITS).collect::<Vec<_>>()).unwrap();
        // Alone every page is random bytes; together all but the first cost their edits.
        assert!(
            link.wire < PAGE + UNITS * 600,
            "{spec}: {} bytes for {UNITS} neighbouring pages",
            link.wire
        );
        let stats = link.enc.stats();
        let last = stats.last().unwrap();
        assert_eq!(last.units_applied, UNITS as u64, "{spec}: {stats:?}");
    }
}

/// Distinct compressible pages.
fn group_page(i: u64) -> Vec<u8> {
    page(2 * i + 1, true)
}

/// Encodes `UNITS` compressible pages as one batch of `spec`: (unit, tag, bytes) per item.
fn one_group(spec: &str) -> Vec<(usize, u8, Vec<u8>)> {
    let p = parse(spec).unwrap();
    let mut enc = p.encoder();
    let pages: Vec<Vec<u8>> = (0..UNITS as u64).map(group_page).collect();
    let mut items: Vec<EncodeItem<'_>> = pages
        .iter()
        .enumerate()
        .map(|(u, d)| EncodeItem {
            unit: unit(u as u64),
            data: d,
            tag: TAG_RAW,
            out: Vec::new(),
        })
        .collect();
    enc.encode_batch(&mut items);
    items
        .into_iter()
        .map(|it| (it.unit.index as usize, it.tag, it.out))
        .collect()
}

fn decode_all(spec: &str, sent: &[(usize, u8, Vec<u8>)]) -> Result<(), String> {
    let mut dec = parse(spec).unwrap().decoder();
    let mut targets = vec![vec![0u8; PAGE]; sent.len()];
    let mut items = decode_items(sent, targets.iter_mut().map(|t| &mut t[..]));
    dec.decode_batch(&mut items).map_err(|e| e.to_string())?;
    for (s, t) in sent.iter().zip(&targets) {
        if *t != group_page(s.0 as u64) {
            return Err(format!("unit {} decoded to other content", s.0));
        }
    }
    Ok(())
}

#[test]
fn hostile_groups_are_refused_without_panic() {
    for spec in ["lz4", "zstd", "xor-delta,zstd", "dedup,lz4"] {
        let sent = one_group(spec);
        assert!(
            sent[1..].iter().any(|s| s.2.is_empty()),
            "{spec}: one group"
        );
        decode_all(spec, &sent).unwrap();
        let count = |sent: &mut Vec<(usize, u8, Vec<u8>)>, n: u16| {
            sent[0].2[..2].copy_from_slice(&n.to_le_bytes());
        };
        let mut zero = sent.clone();
        count(&mut zero, 0);
        assert!(decode_all(spec, &zero).unwrap_err().contains("zero units"));
        let mut more = sent.clone();
        count(&mut more, UNITS as u16 + 1);
        let e = decode_all(spec, &more).unwrap_err();
        assert!(
            e.contains(&format!("group of {} units has {UNITS}", UNITS + 1)),
            "{e}"
        );
        let fewer = sent[..UNITS - 1].to_vec();
        assert!(
            decode_all(spec, &fewer).is_err(),
            "{spec}: a member missing"
        );
        let mut less = sent.clone();
        count(&mut less, UNITS as u16 - 1);
        assert!(
            decode_all(spec, &less).is_err(),
            "{spec}: a count one short"
        );
        // Every cut and every flipped byte of the block: an error or other content, never
        // a panic (the engine's digests catch other content).
        for cut in 0..sent[0].2.len() {
            let mut c = sent.clone();
            c[0].2.truncate(cut);
            let _ = decode_all(spec, &c);
        }
        for at in 0..sent[0].2.len() {
            let mut c = sent.clone();
            c[0].2[at] ^= 0x5a;
            let _ = decode_all(spec, &c);
        }
    }
}
