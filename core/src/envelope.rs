//! One envelope for every blob Ferry writes or sends that is not a frame: the sim, KVM and
//! Xen state blobs and the image sidecar.
//!
//! ```text
//! magic [8]   version u32   body length u64   body   crc32c u32 (of everything before it)
//! ```
//!
//! A blob is opened only when its magic, version, length and checksum all hold, so a body
//! decoder never sees a torn, truncated or corrupted blob (it still checks every field:
//! a blob that passes its CRC may come from a hostile peer). [`assert_every_byte_guarded`]
//! is the one test every format runs: it flips every byte of a real blob and requires a
//! clear error, never a panic and never a silently different value.

/// Bytes the envelope adds around a body.
pub const OVERHEAD: usize = 8 + 4 + 8 + 4;

/// Why a blob could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Shorter than an empty envelope.
    #[error("{what}: {len} bytes is too short")]
    Truncated {
        /// The format.
        what: &'static str,
        /// Bytes there were.
        len: usize,
    },
    /// Another format.
    #[error("{what}: bad magic (not this kind of blob)")]
    Magic {
        /// The format.
        what: &'static str,
    },
    /// A version this build does not read.
    #[error("{what}: format version {got} (this build reads {want})")]
    Version {
        /// The format.
        what: &'static str,
        /// The blob's.
        got: u32,
        /// Ours.
        want: u32,
    },
    /// The length field disagrees with the bytes.
    #[error("{what}: the body claims {claimed} bytes, {got} are there")]
    Length {
        /// The format.
        what: &'static str,
        /// The header's length.
        claimed: u64,
        /// The bytes present.
        got: usize,
    },
    /// The checksum fails.
    #[error("{what}: checksum mismatch (torn or corrupt)")]
    Checksum {
        /// The format.
        what: &'static str,
    },
}

/// Wraps `body` in an envelope of `magic` and `version`.
pub fn seal(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + OVERHEAD);
    b.extend_from_slice(magic);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(body);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Checks an envelope of `magic` and `version` (`what` names the format in errors) and
/// returns its body.
pub fn open<'a>(
    what: &'static str,
    magic: &[u8; 8],
    version: u32,
    bytes: &'a [u8],
) -> Result<&'a [u8], EnvelopeError> {
    if bytes.len() < OVERHEAD {
        return Err(EnvelopeError::Truncated {
            what,
            len: bytes.len(),
        });
    }
    // The checksum first: a corrupt magic or version is reported as corruption.
    let (covered, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let magic_ok = &covered[..8] == magic;
    if crc32c::crc32c(covered) != want {
        return Err(if magic_ok {
            EnvelopeError::Checksum { what }
        } else {
            EnvelopeError::Magic { what }
        });
    }
    if !magic_ok {
        return Err(EnvelopeError::Magic { what });
    }
    let got = u32::from_le_bytes([covered[8], covered[9], covered[10], covered[11]]);
    if got != version {
        return Err(EnvelopeError::Version {
            what,
            got,
            want: version,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&covered[12..20]);
    let claimed = u64::from_le_bytes(l);
    let body = &covered[20..];
    if claimed != body.len() as u64 {
        return Err(EnvelopeError::Length {
            what,
            claimed,
            got: body.len(),
        });
    }
    Ok(body)
}

/// The shared corruption test of every blob format: flips each byte of `blob` (three ways)
/// and truncates it at every length; `decode` must return an error every time. Returns
/// how many corrupted blobs were tried.
pub fn assert_every_byte_guarded<T, E: std::fmt::Display>(
    blob: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
) -> usize {
    assert!(decode(blob).is_ok(), "the intact blob must decode");
    let mut tried = 0;
    for i in 0..blob.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = blob.to_vec();
            b[i] ^= flip;
            assert!(
                decode(&b).is_err(),
                "byte {i} of {} flipped by {flip:#x} went unnoticed",
                blob.len()
            );
            tried += 1;
        }
    }
    for len in 0..blob.len() {
        assert!(
            decode(&blob[..len]).is_err(),
            "a blob cut to {len} of {} bytes went unnoticed",
            blob.len()
        );
        tried += 1;
    }
    let mut longer = blob.to_vec();
    longer.push(0);
    assert!(decode(&longer).is_err(), "a trailing byte went unnoticed");
    tried + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[u8; 8] = b"FERRYTST";

    #[test]
    fn sealed_bodies_open_and_every_corruption_is_caught() {
        let blob = seal(M, 3, b"the body of a blob");
        assert_eq!(open("test", M, 3, &blob), Ok(&b"the body of a blob"[..]));
        let n = assert_every_byte_guarded(&blob, |b| open("test", M, 3, b).map(<[u8]>::to_vec));
        assert!(n > 3 * blob.len());
        assert!(matches!(
            open("test", M, 4, &blob),
            Err(EnvelopeError::Version {
                got: 3,
                want: 4,
                ..
            })
        ));
        assert!(matches!(
            open("test", b"FERRYOTH", 3, &blob),
            Err(EnvelopeError::Magic { .. })
        ));
        let empty = seal(M, 1, &[]);
        assert_eq!(open("test", M, 1, &empty), Ok(&[][..]));
    }
}
