//! The wire protocol: checked frames ([`frame`]) carrying typed messages ([`message`]).

mod batch;
mod cursor;
pub mod frame;
mod handshake;
pub mod message;

pub use frame::{FrameBuf, FrameError, FrameReader, ReadOutcome};
pub use message::*;
