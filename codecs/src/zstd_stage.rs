//! zstd block compression (`zstd:LEVEL`, level 3 by default), in the sized framing of
//! [`crate::sized`]. Each worker thread keeps its own compression and decompression
//! contexts: creating one per 4 KiB unit would cost more than compressing it.

use std::cell::RefCell;

use ferry_core::codec::{CodecError, Unit};

use crate::sized;
use crate::stage::Stage;

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// The largest window a unit's frame may ask of the decoder (4 MiB).
const WINDOW_LOG_MAX: u32 = 22;

/// The `zstd` stage.
#[derive(Debug)]
pub struct Zstd {
    level: i32,
}

impl Zstd {
    /// A stage compressing at `level`.
    pub fn new(level: i32) -> Self {
        Self { level }
    }
}

/// Compresses with this thread's context for `level`.
fn compress(level: i32, input: &[u8], room: &mut [u8]) -> std::io::Result<usize> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match c.as_mut() {
            Some((_, comp)) => comp.compress_to_buffer(input, room),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

fn decompress(input: &[u8], room: &mut [u8]) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut dec = zstd::bulk::Decompressor::new()?;
            // A unit is at most 2 MiB: a hostile frame must not make the decoder reserve
            // a larger window (zstd's default allows 128 MiB).
            dec.window_log_max(WINDOW_LOG_MAX)?;
            *d = Some(dec);
        }
        match d.as_mut() {
            Some(dec) => dec.decompress_to_buffer(input, room),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

impl Stage for Zstd {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn groups(&self) -> bool {
        true
    }

    fn encode(&self, _unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        let worst = zstd::zstd_safe::compress_bound(input.len());
        sized::encode(input, out, worst, |i, o| compress(self.level, i, o))
    }

    fn decode(
        &self,
        _unit: Unit,
        input: &[u8],
        _base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError> {
        sized::decode("zstd", input, out, max_len, decompress)
    }
}
