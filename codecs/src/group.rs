//! Compression with history: the last compressor of a pipeline (`lz4` or `zstd`) compresses
//! the units of a batch in groups of up to [`GROUP_BYTES`] as one block, so redundancy
//! between neighbouring pages counts (per-unit blocks see 4 KiB at a time). Groups are
//! independent of each other and of earlier batches: they are compressed in parallel, a
//! lost or refused batch leaves no history behind, and memory stays bounded by the batch.
//!
//! On the wire a group stays a run of ordinary unit records, so digests, bounds and the
//! engine are unchanged. Every member carries the group stage's tag bit; the group's block
//! is `count: u16 LE` followed by the compressed block of
//! `len[0..count]: u32 LE ++ intermediate[0] ++ … ++ intermediate[count-1]`, where an
//! intermediate is what the unit's earlier stages produced (the raw unit when none
//! applied). The block is cut into pieces no longer than each member's unit, first member
//! first, so every record stays within the per-unit bound (trailing members may be empty).
//! A group is only used when its block is smaller than what its members would send alone.

use std::ops::Range;
use std::time::Instant;

use ferry_core::codec::{CodecError, DecodeItem, EncodeItem, StageStats, TAG_REFERENCE};
use ferry_core::wire::CODEC_SLACK;
use rayon::prelude::*;

use crate::stage::Stage;

/// Most input bytes compressed as one group: a whole batch of 4 KiB pages (the engine's
/// 256 KiB frames), small enough that groups of large blocks still run in parallel.
pub const GROUP_BYTES: usize = 256 << 10;

/// Most units in one group (its count is a u16 on the wire).
const GROUP_UNITS: usize = u16::MAX as usize;

/// The bytes a member sends alone: its encoded output, or the raw unit.
fn alone(it: &EncodeItem<'_>) -> usize {
    if it.tag == 0 {
        it.data.len()
    } else {
        it.out.len()
    }
}

/// What the group stage compresses for a member: the earlier stages' output when any
/// applied (`later_bits` of its tag), else the unit itself.
fn intermediate<'a>(it: &'a EncodeItem<'_>, later_bits: u8) -> &'a [u8] {
    if it.tag & later_bits != 0 {
        &it.out
    } else {
        it.data
    }
}

/// Splits the members (indices of items that are not references) into consecutive groups.
fn plan(items: &[EncodeItem<'_>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    for (i, it) in items.iter().enumerate() {
        if it.tag == TAG_REFERENCE {
            continue;
        }
        match groups.last_mut() {
            Some(g) if bytes + it.data.len() <= GROUP_BYTES && g.len() < GROUP_UNITS => {
                g.push(i);
                bytes += it.data.len();
            }
            _ => {
                groups.push(vec![i]);
                bytes = it.data.len();
            }
        }
    }
    groups
}

/// Compresses the batch's members in groups with `stage` (tag bit `bit`; `later_bits` are
/// the bits of the stages before it) and rewrites the members of every group that pays.
/// Adds the stage's figures to `stats`.
pub(crate) fn encode(
    stage: &dyn Stage,
    bit: u8,
    later_bits: u8,
    items: &mut [EncodeItem<'_>],
    stats: &mut StageStats,
) {
    let groups = plan(items);
    let shared: &[EncodeItem<'_>] = items;
    let compress = |g: &Vec<usize>| {
        let started = Instant::now();
        let mut plain = Vec::with_capacity(g.iter().map(|&i| 4 + shared[i].data.len()).sum());
        for &i in g {
            let len = intermediate(&shared[i], later_bits).len() as u32;
            plain.extend_from_slice(&len.to_le_bytes());
        }
        for &i in g {
            plain.extend_from_slice(intermediate(&shared[i], later_bits));
        }
        let mut block = Vec::new();
        let applied = stage.encode(shared[g[0]].unit, &plain, &mut block);
        let alone: usize = g.iter().map(|&i| alone(&shared[i])).sum();
        let pays = applied && 2 + block.len() < alone;
        (
            pays.then_some(block),
            plain.len(),
            started.elapsed().as_secs_f64(),
        )
    };
    let blocks: Vec<_> = if groups.len() < 2 {
        groups.iter().map(compress).collect()
    } else {
        groups.par_iter().map(compress).collect()
    };
    for (g, (block, plain_len, secs)) in groups.iter().zip(blocks) {
        stats.units_in += g.len() as u64;
        stats.bytes_in += plain_len as u64;
        stats.encode_s += secs;
        let Some(block) = block else { continue };
        stats.units_applied += g.len() as u64;
        stats.bytes_in_applied += plain_len as u64;
        stats.bytes_out += 2 + block.len() as u64;
        let mut rest = &block[..];
        for (k, &i) in g.iter().enumerate() {
            let it = &mut items[i];
            let prior = it.tag;
            it.tag = prior | bit;
            let mut room = it.data.len();
            let mut piece = Vec::with_capacity(room.min(2 + rest.len()));
            if k == 0 {
                piece.extend_from_slice(&(g.len() as u16).to_le_bytes());
                room -= 2;
            }
            let take = room.min(rest.len());
            piece.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            it.out = piece;
        }
        debug_assert!(rest.is_empty(), "a group's block fits its members");
    }
}

/// A malformed group.
fn malformed(reason: String) -> CodecError {
    CodecError::Malformed {
        codec: "group",
        reason,
    }
}

/// A received group: its stage, and the item indices of its members in order.
pub(crate) type Group = (usize, Vec<usize>);

/// The groups of a received batch: for each, the item indices of its members, in order.
/// `group_of(tag)` names the group stage an item's tag uses (None: not in a group).
/// Hostile input: a count that is zero or runs past the batch is an error.
pub(crate) fn find(
    items: &[DecodeItem<'_>],
    group_of: impl Fn(u8) -> Option<usize>,
) -> Result<Vec<Group>, (usize, CodecError)> {
    let mut groups = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let Some(stage) = group_of(items[i].tag) else {
            i += 1;
            continue;
        };
        let count = match items[i].input.first_chunk::<2>() {
            Some(c) => usize::from(u16::from_le_bytes(*c)),
            None => return Err((i, malformed("group without its count".into()))),
        };
        if count == 0 {
            return Err((i, malformed("group of zero units".into())));
        }
        let mut members = vec![i];
        let mut k = i + 1;
        while members.len() < count && k < items.len() {
            if group_of(items[k].tag) == Some(stage) {
                members.push(k);
            } else if group_of(items[k].tag).is_some() {
                return Err((k, malformed("groups of two stages interleaved".into())));
            }
            k += 1;
        }
        if members.len() < count {
            return Err((
                i,
                malformed(format!("group of {count} units has {}", members.len())),
            ));
        }
        groups.push((stage, members));
        i = k;
    }
    Ok(groups)
}

/// Decodes one group's block with `stage`: the decoded group and where each member's
/// intermediate lies in it (each at most `unit + CODEC_SLACK` bytes; `unit` is the batch's
/// unit size), so members are read in place rather than copied out.
pub(crate) fn decode(
    stage: &dyn Stage,
    items: &[DecodeItem<'_>],
    members: &[usize],
    unit: usize,
) -> Result<(Vec<u8>, Vec<Range<usize>>), CodecError> {
    let first = items[members[0]].input;
    let mut block = Vec::with_capacity(members.iter().map(|&i| items[i].input.len()).sum());
    block.extend_from_slice(first.get(2..).unwrap_or_default());
    for &i in &members[1..] {
        block.extend_from_slice(items[i].input);
    }
    let n = members.len();
    let max_len = n * (4 + unit + CODEC_SLACK);
    let mut plain = Vec::new();
    stage.decode(items[members[0]].unit, &block, &[], &mut plain, max_len)?;
    let lens = plain
        .get(..4 * n)
        .ok_or_else(|| malformed(format!("{} bytes cannot hold {n} lengths", plain.len())))?;
    let mut parts = Vec::with_capacity(n);
    let mut at = 4 * n;
    for len in lens.chunks_exact(4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > unit + CODEC_SLACK {
            return Err(malformed(format!("a member of {len} bytes, unit {unit}")));
        }
        if plain.len() - at < len {
            return Err(malformed("members longer than the group".into()));
        }
        parts.push(at..at + len);
        at += len;
    }
    if at != plain.len() {
        return Err(malformed(format!(
            "{} bytes after the members",
            plain.len() - at
        )));
    }
    Ok((plain, parts))
}
