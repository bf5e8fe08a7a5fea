//! Fast all-zero detection. Zero pages and zero blocks cost a flag on the wire, never data,
//! whatever the codec, so this check runs on every page the engine sends.

/// True when every byte of `data` is zero.
///
/// Works 64 bytes at a time: eight word loads ORed together compile to a few vector
/// instructions, with one early-exit test per 64 bytes (most non-zero pages fail in the
/// first chunk, most zero pages are scanned at memory speed).
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for w in chunk.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn agrees_with_naive(len in 0usize..5000, pos in any::<prop::sample::Index>(), val in 1u8..=255) {
            let mut v = vec![0u8; len];
            prop_assert!(is_zero(&v));
            if len > 0 {
                let i = pos.index(len);
                v[i] = val;
                prop_assert!(!is_zero(&v));
            }
        }
    }
}
