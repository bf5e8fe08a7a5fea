//! The framing shared by the block compressors: the input length as u32 LE, then the
//! compressed block. Decoding checks the claimed length against the unit's bound before
//! allocating, and that the block decompresses to exactly that length.

use ferry_core::codec::CodecError;

/// Encodes `input` into `out` with `compress(input, room) -> written`, given the
/// compressor's worst-case output size; true when the result is smaller than the input.
pub fn encode<E>(
    input: &[u8],
    out: &mut Vec<u8>,
    worst_case: usize,
    compress: impl FnOnce(&[u8], &mut [u8]) -> Result<usize, E>,
) -> bool {
    out.clear();
    out.resize(4 + worst_case, 0);
    out[..4].copy_from_slice(&(input.len() as u32).to_le_bytes());
    match compress(input, &mut out[4..]) {
        Ok(n) => {
            out.truncate(4 + n);
            out.len() < input.len()
        }
        Err(_) => false,
    }
}

/// Decodes a sized block of `codec` into `out` with `decompress(block, room) -> written`.
pub fn decode<E: std::fmt::Display>(
    codec: &'static str,
    input: &[u8],
    out: &mut Vec<u8>,
    max_len: usize,
    decompress: impl FnOnce(&[u8], &mut [u8]) -> Result<usize, E>,
) -> Result<(), CodecError> {
    let malformed = |reason: String| CodecError::Malformed { codec, reason };
    let (len, body) = input
        .split_first_chunk::<4>()
        .ok_or_else(|| malformed("missing length".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > max_len {
        return Err(malformed(format!("claims {len} bytes, at most {max_len}")));
    }
    out.clear();
    out.resize(len, 0);
    let n = decompress(body, out).map_err(|e| malformed(e.to_string()))?;
    if n != len {
        return Err(CodecError::WrongSize {
            got: n,
            expected: len,
        });
    }
    Ok(())
}
