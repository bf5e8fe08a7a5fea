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

pub use dest::{
    host_memory, receive, receive_owed_blocks, DestConfig, DestOutcome, DestReport,
    DEFAULT_MAX_DISK,
};
pub use source::{
    error_chain, fill_random, migrate, recover_postcopy, MemoryMode, SourceConfig, StorageMode,
    Throttle,
};

use crate::wire::frame::FrameHeader;
use crate::wire::{FrameError, FrameReader, Message, ReadOutcome};

/// Units are pinned to channels in runs of this many, so a channel's batch holds
/// neighbouring units (which compress together, see `ferry_codecs::GROUP_BYTES`) while the
/// channels still share every region of the guest.
pub const STRIPE: u64 = 64;

/// Channel a page is pinned to.
#[inline]
pub fn page_channel(index: u64, channels: usize) -> usize {
    ((index / STRIPE) % channels as u64) as usize
}

/// Channel a block is pinned to.
#[inline]
pub fn block_channel(disk: u16, index: u64, channels: usize) -> usize {
    ((index / STRIPE).wrapping_add(u64::from(disk)) % channels as u64) as usize
}

/// A control message as passed between threads: a decoded [`Message`] that owns its data
/// (see [`Message::into_control`]). One vocabulary: a new message is added in `wire` only.
pub(crate) type Control = Message<'static>;

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
