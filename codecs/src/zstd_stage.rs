//! zstd block compression (`zstd:LEVEL`, level 3 by default). Output: the input length as
//! u32 LE, then one zstd frame.

use ferry_core::codec::{CodecError, Unit};

use crate::pipeline::Stage;

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
        out.clear();
        out.resize(4 + zstd::zstd_safe::compress_bound(input.len()), 0);
        out[..4].copy_from_slice(&(input.len() as u32).to_le_bytes());
        match zstd::bulk::compress_to_buffer(input, &mut out[4..], self.level) {
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
            codec: "zstd",
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
        let n = zstd::bulk::decompress_to_buffer(body, &mut out[..])
            .map_err(|e| malformed(e.to_string()))?;
        if n != len {
            return Err(CodecError::WrongSize {
                got: n,
                expected: len,
            });
        }
        Ok(())
    }
}
