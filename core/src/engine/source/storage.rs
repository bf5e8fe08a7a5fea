//! Storage extras on the source: hash-compared bases.

use std::sync::Arc;
use std::time::Duration;

use super::Control;
use crate::basecmp::{differing_chunks, key_for, mark_differing, Digest, Disk};
use crate::bitmap::Bitmap;
use crate::wire::{Message, DIGESTS_PER_FRAME};

use super::session::*;
use super::*;

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
