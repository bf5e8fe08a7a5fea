//! The drivers: thin I/O around the pure machines, generic over guest, transport and codec.
//!
//! Threads, not async: each channel has one sender thread on the source and one receiver
//! thread on the destination, each with its own codec state, so N channels use N cores
//! with nothing shared but the end-of-round barrier. Units are pinned to channels by
//! index, so a unit's versions stay in order for codecs with history.

mod dest;
mod source;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use dest::{receive, DestConfig, DestOutcome, DestReport};
pub use source::{error_chain, fill_random, migrate, SourceConfig, StorageMode, Throttle};

use crate::wire::frame::FrameHeader;
use crate::wire::{FrameError, FrameReader, Manifest, Message, ReadOutcome, Verdict, Welcome};

/// Channel a page is pinned to.
#[inline]
pub fn page_channel(index: u64, channels: usize) -> usize {
    (index % channels as u64) as usize
}

/// Channel a block is pinned to.
#[inline]
pub fn block_channel(disk: u16, index: u64, channels: usize) -> usize {
    ((index.wrapping_add(u64::from(disk))) % channels as u64) as usize
}

/// A control message with owned data, as passed between threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    Welcome(Welcome),
    Refuse(String),
    State {
        version: u32,
        bytes: Vec<u8>,
    },
    Manifest(Manifest),
    Verified {
        verify_us: u64,
    },
    Commit,
    Resumed {
        resume_us: u64,
    },
    Verdict(Verdict),
    Abort(String),
    StoragePlan(Vec<crate::guest::DiskPlan>),
    BaseDigests {
        disk: u16,
        digests: Vec<crate::basecmp::Digest>,
    },
    DigestRequest {
        disk: u16,
        chunks: Vec<u32>,
    },
    BlockDigests {
        disk: u16,
        last: bool,
        chunks: Vec<(u32, Vec<crate::basecmp::Digest>)>,
    },
    OwedBlocks {
        disk: u16,
        owed: crate::bitmap::Bitmap,
    },
    PullBlocks {
        disk: u16,
        blocks: Vec<u64>,
    },
    PostcopyDone(Vec<u64>),
    RoundAck(u32),
    Progress(u64),
}

impl Control {
    /// Converts a decoded message; `None` for data, barriers and hellos.
    pub(crate) fn from_message(m: Message<'_>) -> Option<Control> {
        Some(match m {
            Message::Welcome(w) => Control::Welcome(w),
            Message::Refuse(s) => Control::Refuse(s),
            Message::State { version, bytes } => Control::State {
                version,
                bytes: bytes.to_vec(),
            },
            Message::Manifest(m) => Control::Manifest(m),
            Message::Verified { verify_us } => Control::Verified { verify_us },
            Message::Commit => Control::Commit,
            Message::Resumed { resume_us } => Control::Resumed { resume_us },
            Message::Verdict(v) => Control::Verdict(v),
            Message::Abort(s) => Control::Abort(s),
            Message::StoragePlan(p) => Control::StoragePlan(p),
            Message::BaseDigests { disk, digests } => Control::BaseDigests { disk, digests },
            Message::DigestRequest { disk, chunks } => Control::DigestRequest { disk, chunks },
            Message::BlockDigests { disk, last, chunks } => {
                Control::BlockDigests { disk, last, chunks }
            }
            Message::OwedBlocks { disk, owed } => Control::OwedBlocks { disk, owed },
            Message::PullBlocks { disk, blocks } => Control::PullBlocks { disk, blocks },
            Message::PostcopyDone(s) => Control::PostcopyDone(s),
            Message::RoundAck(r) => Control::RoundAck(r),
            Message::Progress(n) => Control::Progress(n),
            Message::Hello(_) | Message::Batch(_) | Message::RoundEnd(_) => return None,
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Control::Welcome(_) => "welcome",
            Control::Refuse(_) => "refuse",
            Control::State { .. } => "state",
            Control::Manifest(_) => "manifest",
            Control::Verified { .. } => "verified",
            Control::Commit => "commit",
            Control::Resumed { .. } => "resumed",
            Control::Verdict(_) => "verdict",
            Control::Abort(_) => "abort",
            Control::StoragePlan(_) => "storage-plan",
            Control::BaseDigests { .. } => "base-digests",
            Control::DigestRequest { .. } => "digest-request",
            Control::BlockDigests { .. } => "block-digests",
            Control::OwedBlocks { .. } => "owed-blocks",
            Control::PullBlocks { .. } => "pull-blocks",
            Control::PostcopyDone(_) => "postcopy-done",
            Control::RoundAck(_) => "round-ack",
            Control::Progress(_) => "progress",
        }
    }
}

/// Polls `reader` until a frame arrives, the stream closes, `stop` is set, or `deadline`
/// passes. Returns the frame's header, or `None` on a clean close.
pub(crate) fn read_frame_until<R: Read>(
    reader: &mut FrameReader<R>,
    deadline: Option<Instant>,
    stop: &AtomicBool,
) -> Result<Option<FrameHeader>, ReadError> {
    loop {
        match reader.poll().map_err(ReadError::Frame)? {
            ReadOutcome::Frame(h) => return Ok(Some(h)),
            ReadOutcome::Closed => return Ok(None),
            ReadOutcome::Idle => {
                if stop.load(Ordering::Relaxed) {
                    return Err(ReadError::Stopped);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ReadError::TimedOut);
                }
            }
        }
    }
}

/// Why a blocking frame read ended without a frame.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Frame(FrameError),
    #[error("timed out")]
    TimedOut,
    #[error("stopped")]
    Stopped,
}

/// Microseconds in a duration, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds as f64.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
