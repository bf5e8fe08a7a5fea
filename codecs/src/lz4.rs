//! LZ4 block compression (lz4_flex). Output: the input length as u32 LE, then the block.

use ferry_core::codec::{CodecError, Unit};

use crate::pipeline::Stage;

/// The `lz4` stage.
#[derive(Debug, Default)]
pub struct Lz4;

impl Stage for Lz4 {
    fn name(&self) -> &'static str {
        "lz4"
    }

    fn encode(&mut self, _unit: Unit, input: &[u8], out: &mut Vec<u8>) -> bool {
        let max = lz4_flex::block::get_maximum_output_size(input.len());
        out.clear();
        out.resize(4 + max, 0);
        out[..4].copy_from_slice(&(input.len() as u32).to_le_bytes());
        match lz4_flex::block::compress_into(input, &mut out[4..]) {
            Ok(n) => {
                out.truncate(4 + n);
                out.len() < input.len()
            }
            Err(_) => false,
        }
    }

    fn decode(
        &mut self,
        _unit: Unit,
        input: &[u8],
        _base: &[u8],
        out: &mut Vec<u8>,
        max_len: usize,
    ) -> Result<(), CodecError> {
        let malformed = |reason: String| CodecError::Malformed {
            codec: "lz4",
            reason,
        };
        let (len, body) = input
            .split_first_chunk::<4>()
            .ok_or_else(|| malformed("missing length".into()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > max_len {
            return Err(malformed(format!("claims {len} bytes, at most {max_len}")));
        }
        out.clear();
        out.resize(len, 0);
        let n =
            lz4_flex::block::decompress_into(body, out).map_err(|e| malformed(e.to_string()))?;
        if n != len {
            return Err(CodecError::WrongSize {
                got: n,
                expected: len,
            });
        }
        Ok(())
    }
}
