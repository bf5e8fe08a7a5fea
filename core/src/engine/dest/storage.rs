//! Storage on the destination: the plan, answering a hash comparison, finishing post-copy.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::{read_frame_until, Control};
use crate::digest::{DigestDelta, DigestTable};
use crate::guest::{Base, DestGuest, DiskPlan, GuestLayout};
use crate::wire::{FrameReader, Message};

use super::receiver::*;
use super::*;

pub(super) fn apply_storage_plan(
    reader: &mut FrameReader<Box<dyn std::io::Read + Send>>,
    guest: &dyn DestGuest,
    bases: &[Base],
    cfg: &DestConfig,
    stop: &AtomicBool,
) -> Result<Vec<DiskPlan>, String> {
    let plans = match read_frame_until(reader, Some(Instant::now() + cfg.io_timeout), stop) {
        Ok(Some(h)) => match Message::decode_frame(&h, reader.body()) {
            Ok(Message::StoragePlan(p)) => p,
            Ok(Message::Abort(r)) => return Err(format!("source aborted: {r}")),
            Ok(_) => {
                return Err(format!(
                    "expected the storage plan, got message type {}",
                    h.ty
                ))
            }
            Err(e) => return Err(format!("bad storage plan: {e}")),
        },
        Ok(None) => return Err("source closed the connection before the storage plan".into()),
        Err(e) => return Err(format!("storage plan: {}", crate::engine::error_chain(&e))),
    };
    if plans.len() != bases.len() {
        return Err(format!(
            "storage plan for {} disks, the guest has {}",
            plans.len(),
            bases.len()
        ));
    }
    for (d, (plan, base)) in plans.iter().zip(bases).enumerate() {
        let needs_base = *plan != DiskPlan::Full;
        if needs_base && *base == Base::None {
            return Err(format!(
                "{plan:?} plan for disk {d}, which has no base here"
            ));
        }
        if *plan == DiskPlan::Incremental && !matches!(base, Base::Identity(_)) {
            return Err(format!(
                "incremental plan for disk {d} without an identified base"
            ));
        }
        guest
            .prepare_disk(d, *plan)
            .map_err(|e| format!("preparing disk {d}: {e}"))?;
    }
    Ok(plans)
}

/// For each hash-compared disk: send the base's chunk digests, then the block digests of
/// the chunks the source asks for.
#[allow(clippy::too_many_arguments)]
pub(super) fn answer_hash_compare(
    reader: &mut FrameReader<Box<dyn std::io::Read + Send>>,
    tx: &mut (dyn Write + Send),
    guest: &dyn DestGuest,
    layout: &GuestLayout,
    plans: &[DiskPlan],
    key: &[u8; 32],
    cfg: &DestConfig,
    stop: &AtomicBool,
) -> Result<(), String> {
    use crate::basecmp::{Disk, CHUNK_BLOCKS};
    use crate::wire::{CHUNKS_PER_FRAME, DIGESTS_PER_FRAME};
    for (d, plan) in plans.iter().enumerate() {
        if *plan != DiskPlan::HashCompared {
            continue;
        }
        let dl = &layout.disks[d];
        let allocated = guest.allocated_blocks(d).ok();
        let disk = Disk {
            blocks: dl.blocks,
            block_size: dl.block_size as usize,
            allocated: allocated.as_ref(),
            read: |b: u64, buf: &mut [u8]| guest.read_block(d, b, buf).is_ok(),
        };
        let chunk_digests = disk.chunk_digests(key);
        let total = u32::try_from(chunk_digests.len())
            .map_err(|_| format!("disk {d} has too many chunks to compare"))?;
        let parts: Vec<&[crate::basecmp::Digest]> = if chunk_digests.is_empty() {
            vec![&[]]
        } else {
            chunk_digests.chunks(DIGESTS_PER_FRAME).collect()
        };
        for (k, part) in parts.iter().enumerate() {
            send(
                tx,
                &Message::BaseDigests {
                    disk: d as u16,
                    first: (k * DIGESTS_PER_FRAME) as u32,
                    total,
                    digests: part.to_vec(),
                },
            )?;
        }
        drop(chunk_digests);
        let n_chunks = dl.blocks.div_ceil(CHUNK_BLOCKS);
        let mut buf = Vec::new();
        // The request comes in parts; each is answered before the next is read.
        loop {
            let deadline = Some(Instant::now() + cfg.io_timeout * 3);
            let (chunks, last_request) = match read_frame_until(reader, deadline, stop) {
                Ok(Some(h)) => match Message::decode_frame(&h, reader.body()) {
                    Ok(Message::DigestRequest { disk, last, chunks }) if usize::from(disk) == d => {
                        (chunks, last)
                    }
                    Ok(Message::Abort(r)) => return Err(format!("source aborted: {r}")),
                    Ok(_) => {
                        return Err(format!(
                            "expected a digest request, got message type {}",
                            h.ty
                        ))
                    }
                    Err(e) => return Err(format!("bad digest request: {e}")),
                },
                Ok(None) => return Err("source closed the connection during the comparison".into()),
                Err(e) => {
                    return Err(format!(
                        "digest request: {}",
                        crate::engine::error_chain(&e)
                    ))
                }
            };
            let answers: Vec<&[u32]> = if chunks.is_empty() {
                vec![&[]]
            } else {
                chunks.chunks(CHUNKS_PER_FRAME).collect()
            };
            for (k, answer) in answers.iter().enumerate() {
                let mut out = Vec::with_capacity(answer.len());
                for &c in answer.iter() {
                    if u64::from(c) >= n_chunks {
                        return Err(format!("digest request for chunk {c} of {n_chunks}"));
                    }
                    out.push((c, disk.chunk_blocks(key, c, &mut buf)));
                }
                send(
                    tx,
                    &Message::BlockDigests {
                        disk: d as u16,
                        last: k + 1 == answers.len(),
                        chunks: out,
                    },
                )?;
            }
            if last_request {
                break;
            }
        }
    }
    Ok(())
}

/// Waits until every channel passed its post-copy barrier and the source's sums came,
/// then checks the disks' and the memory's digest sums against them.
pub(super) fn wait_postcopy(
    events: &crossbeam_channel::Receiver<Event>,
    pages: &DigestTable,
    disks: &[DigestTable],
    channels: usize,
    cfg: &DestConfig,
) -> Result<(), String> {
    let mut barriers = 0usize;
    let mut deltas = vec![DigestDelta::default(); disks.len()];
    let mut page_deltas = Vec::with_capacity(channels);
    let mut sums: Option<Vec<u64>> = None;
    while barriers < channels || sums.is_none() {
        match events.recv_timeout(cfg.io_timeout * 6) {
            Ok(Event::PostcopyBarrier { pages: p, disks: d }) => {
                barriers += 1;
                page_deltas.push(p);
                for (a, b) in deltas.iter_mut().zip(d) {
                    a.add(b);
                }
            }
            Ok(Event::Control(Control::PostcopyDone(s))) => sums = Some(s),
            Ok(Event::Failed(e)) => return Err(e),
            Ok(Event::Closed(ch)) => {
                return Err(format!("source closed channel {ch} during post-copy"))
            }
            Ok(_) => return Err("unexpected message during post-copy".into()),
            Err(_) => return Err("the source stopped sending owed units".into()),
        }
    }
    let sums = sums.unwrap_or_default();
    if sums.len() != disks.len() + 1 {
        return Err(format!(
            "post-copy sums for {} spaces, expected {} disks and memory",
            sums.len(),
            disks.len()
        ));
    }
    if pages.sum_with(page_deltas) != sums[disks.len()] {
        return Err("memory: the pages received differ from the pages sent".into());
    }
    for (d, (t, want)) in disks.iter().zip(&sums).enumerate() {
        if t.sum_with([deltas[d]]) != *want {
            return Err(format!(
                "disk {d}: the blocks received differ from the blocks sent"
            ));
        }
    }
    Ok(())
}
