//! LZ4 block compression (lz4_flex), in the sized framing of [`crate::sized`].

use ferry_core::codec::{CodecError, Unit};

use crate::sized;
use crate::stage::Stage;

/// The `lz4` stage.
#[derive(Debug, Default)]
pub struct Lz4;

impl Stage for Lz4 {
    fn name(&self) -> &'static str {
        "lz4"
    }

    fn groups(&self) -> bool {
        true
    }

    fn encode(&self, _unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        let worst = lz4_flex::block::get_maximum_output_size(input.len());
        sized::encode(input, out, worst, lz4_flex::block::compress_into)
    }

    fn decode(
        &self,
        _unit: Unit,
        input: &[u8],
        _base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError> {
        sized::decode("lz4", input, out, max_len, |b, o| {
            lz4_flex::block::decompress_into(b, o)
        })
    }
}
