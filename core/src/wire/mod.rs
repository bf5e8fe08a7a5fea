//! The wire protocol: checked frames ([`frame`]) carrying typed messages ([`message`]).

pub mod frame;
pub mod message;

pub use frame::{FrameBuf, FrameError, FrameReader, ReadOutcome};
pub use message::*;
