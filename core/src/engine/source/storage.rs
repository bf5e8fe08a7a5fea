//! Storage extras on the source: hash-compared bases and the post-copy push.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;

use super::{block_channel, ms, Control};
use crate::basecmp::{differing_chunks, key_for, mark_differing, Digest, Disk};
use crate::bitmap::Bitmap;
use crate::digest::DigestDelta;
use crate::report::{Progress, RoundReport};
use crate::wire::{BatchKind, Message, Phase, RoundEnd, DIGESTS_PER_FRAME};

use super::sender::*;
use super::session::*;
use super::*;

/// Storage post-copy after the hand-over: pushes every owed block, the ones the
/// destination's guest is waiting for first, then a barrier and the final digest sums.
pub(super) fn postcopy_push(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    round: u32,
    owed: Vec<Bitmap>,
) -> Result<(), Failure> {
    const SLICE: usize = 256;
    let n = s.work.len();
    let mut sent: Vec<Bitmap> = owed.iter().map(|b| Bitmap::new(b.len())).collect();
    let order: Vec<(usize, u64)> = owed
        .iter()
        .enumerate()
        .flat_map(|(d, b)| b.iter_ones().map(move |i| (d, i)))
        .collect();
    (s.progress)(Progress::RoundStart {
        phase: Phase::PostCopy.name().into(),
        index: round,
        units: order.len() as u64,
    });
    let start = Instant::now();
    let bytes0 = s.shared.wire_bytes.load(Ordering::Relaxed);
    let mut next = 0usize;
    loop {
        // Pulls first: the guest is blocked on them.
        let mut batch: Vec<(usize, u64)> = Vec::new();
        while let Ok(m) = s.ctl.try_recv() {
            match m {
                Ok(Control::PullBlocks { disk, blocks }) => {
                    let d = usize::from(disk);
                    for b in blocks {
                        if owed.get(d).is_some_and(|o| o.get(b)) && !sent[d].get(b) {
                            batch.push((d, b));
                            s.report.blocks_pulled += 1;
                        }
                    }
                }
                Ok(Control::Abort(r)) => return Err(Failure(format!("destination aborted: {r}"))),
                Ok(Control::Progress(_)) => {}
                Ok(other) => {
                    return Err(Failure(format!(
                        "unexpected {} during post-copy",
                        other.name()
                    )))
                }
                Err(e) => return Err(Failure(e)),
            }
        }
        while batch.len() < SLICE && next < order.len() {
            batch.push(order[next]);
            next += 1;
        }
        batch.retain(|(d, b)| {
            let fresh = !sent[*d].get(*b);
            sent[*d].set(*b);
            fresh
        });
        if batch.is_empty() && next >= order.len() {
            break;
        }
        for (d, disk_owed) in owed.iter().enumerate() {
            let mut set = Bitmap::new(disk_owed.len());
            for (_, b) in batch.iter().filter(|(x, _)| *x == d) {
                set.set(*b);
            }
            if !set.none() {
                let bs = s.shared.layout.disks[d].block_size as usize;
                let disk = d as u16;
                s.dispatch(&set, BatchKind::OwedBlocks(disk), bs, round, false, |i| {
                    block_channel(disk, i, n)
                })?;
            }
        }
        if let Some(e) = s.shared.error() {
            return Err(Failure(e));
        }
    }
    // Barrier on every channel, then the sums of everything the destination now has.
    let (reply_tx, reply_rx) = unbounded();
    for ch in 0..n {
        s.send_work(
            ch,
            Work::Barrier {
                end: RoundEnd {
                    phase: Phase::PostCopy,
                    round,
                },
                reply: reply_tx.clone(),
            },
        )?;
    }
    let mut disk_deltas = vec![DigestDelta::default(); s.shared.disks.len()];
    for _ in 0..n {
        let done = reply_rx
            .recv_timeout(cfg.io_timeout * 6)
            .map_err(|_| Failure("post-copy barrier timed out".into()))?;
        if !done.ok {
            return Err(Failure(
                s.shared
                    .error()
                    .unwrap_or_else(|| "a channel failed".into()),
            ));
        }
        for (a, b) in disk_deltas.iter_mut().zip(done.disks) {
            a.add(b);
        }
    }
    let sums = s
        .shared
        .disks
        .iter()
        .zip(&disk_deltas)
        .map(|(t, d)| t.sum_with([*d]))
        .collect();
    s.control(&Message::PostcopyDone(sums))?;
    let rr = RoundReport {
        phase: Phase::PostCopy.name().into(),
        index: round,
        dirty: order.len() as u64,
        sent: order.len() as u64,
        blocks: order.len() as u64,
        bytes: s.shared.wire_bytes.load(Ordering::Relaxed) - bytes0,
        ms: ms(start.elapsed()),
    };
    (s.progress)(Progress::RoundDone(rr.clone()));
    s.report.rounds.push(rr);
    Ok(())
}

/// The blocks of disk `d` that differ from the destination's base: compare chunk
/// digests (holes cost nothing on either side), then block digests within the chunks
/// that differ, asked for in parts so any disk size fits the frames.
pub(super) fn hash_compare(
    s: &mut Session<'_>,
    cfg: &SourceConfig,
    d: usize,
) -> Result<Bitmap, Failure> {
    let dl = s.shared.layout.disks[d].clone();
    let key = key_for(&s.migration_id);
    let guest = Arc::clone(&s.shared.guest);
    let allocated = guest.allocated_blocks(d).ok();
    let disk = Disk {
        blocks: dl.blocks,
        block_size: dl.block_size as usize,
        allocated: allocated.as_ref(),
        read: |b: u64, buf: &mut [u8]| guest.read_block(d, b, buf).is_ok(),
    };
    let mine = disk.chunk_digests(&key);
    // The destination hashes its base's data first: allow ~200 MB/s for that.
    let wait = cfg.io_timeout + Duration::from_secs(dl.bytes() / 200_000_000);
    let theirs = receive_base_digests(s, d, mine.len(), wait)?;
    let chunks = differing_chunks(&mine, &theirs);
    drop(theirs);
    let mut diff = Bitmap::new(dl.blocks);
    let mut buf = Vec::new();
    let parts: Vec<&[u32]> = if chunks.is_empty() {
        vec![&[]]
    } else {
        chunks.chunks(DIGESTS_PER_FRAME).collect()
    };
    for (k, part) in parts.iter().enumerate() {
        s.control(&Message::DigestRequest {
            disk: d as u16,
            last: k + 1 == parts.len(),
            chunks: part.to_vec(),
        })?;
        let mut answered = 0usize;
        loop {
            match s.expect("block digests", cfg.io_timeout)? {
                Control::BlockDigests {
                    disk: got_disk,
                    last,
                    chunks: got,
                } if usize::from(got_disk) == d => {
                    for (c, ds) in got {
                        if part.binary_search(&c).is_err() {
                            return Err(Failure(format!("digests for unasked chunk {c}")));
                        }
                        let m = disk.chunk_blocks(&key, c, &mut buf);
                        mark_differing(&mut diff, c, &m, &ds);
                        answered += 1;
                    }
                    if last {
                        break;
                    }
                }
                other => {
                    return Err(Failure(format!(
                        "expected block digests of disk {d}, got {}",
                        other.name()
                    )))
                }
            }
        }
        if answered != part.len() {
            return Err(Failure(format!(
                "asked for {} chunks of block digests, got {answered}",
                part.len()
            )));
        }
    }
    Ok(diff)
}

/// The destination's chunk digests of disk `d`, `total` of them, in parts.
fn receive_base_digests(
    s: &mut Session<'_>,
    d: usize,
    total: usize,
    wait: Duration,
) -> Result<Vec<Digest>, Failure> {
    let mut theirs: Vec<Digest> = Vec::new();
    loop {
        match s.expect("base digests", wait)? {
            Control::BaseDigests {
                disk,
                first,
                total: t,
                digests,
            } if usize::from(disk) == d
                && t as usize == total
                && first as usize == theirs.len() =>
            {
                theirs.extend_from_slice(&digests);
                if theirs.len() >= total {
                    return Ok(theirs);
                }
            }
            other => {
                return Err(Failure(format!(
                    "expected base digests of disk {d} from chunk {} of {total}, got {}",
                    theirs.len(),
                    other.name()
                )))
            }
        }
    }
}
