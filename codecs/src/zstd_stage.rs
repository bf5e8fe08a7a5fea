//! zstd block compression (`zstd:LEVEL`, level 3 by default), in the sized framing of
//! [`crate::sized`].

use ferry_core::codec::{CodecError, Unit};

use crate::pipeline::Stage;
use crate::sized;

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

impl Stage for Zstd {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn encode(&mut self, _unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        let worst = zstd::zstd_safe::compress_bound(input.len());
        let level = self.level;
        sized::encode(input, out, worst, |i, o| {
            zstd::bulk::compress_to_buffer(i, o, level)
        })
    }

    fn decode(
        &mut self,
        _unit: Unit,
        input: &[u8],
        _base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError> {
        sized::decode("zstd", input, out, max_len, |b, o| {
            zstd::bulk::decompress_to_buffer(b, o)
        })
    }
}
