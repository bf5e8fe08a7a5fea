//! Frames: a 16-byte header, then a body.
//!
//! ```text
//! 0      2      3       4           8           12          16
//! +------+------+-------+-----------+-----------+-----------+---- ... ----+
//! | "FY" | type | flags | body len  | body crc  | head crc  |    body     |
//! +------+------+-------+-----------+-----------+-----------+---- ... ----+
//! ```
//! All integers little-endian; CRCs are CRC-32C (hardware-accelerated). The header CRC
//! covers bytes 0..12, so a corrupt length is caught before anything is allocated.
//!
//! Flag [`FLAG_RECORD_DIGESTS`] (batch frames only): the body CRC covers the batch prefix
//! and the record headers, while each unit's data is covered by its own 64-bit digest,
//! which the receiver checks after decoding. Every byte stays covered, and the bulk data
//! is hashed once per side instead of twice (at loopback speeds each pass over the data
//! costs ~10% of throughput).

use std::io::{ErrorKind, Read, Write};

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"FY";
/// Header size in bytes.
pub const HEADER_LEN: usize = 16;
/// Body CRC covers only the batch prefix and record headers; see the module docs.
pub const FLAG_RECORD_DIGESTS: u8 = 0x01;
/// Flags this build understands.
const KNOWN_FLAGS: u8 = FLAG_RECORD_DIGESTS;

/// Largest body a peer may send (a batch of 64 raw 4 KiB pages is ~260 KiB).
pub const MAX_BODY: u32 = 16 << 20;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub ty: u8,
    /// Flags (reserved, must be 0 in version 1).
    pub flags: u8,
    /// Body length.
    pub len: u32,
    /// CRC-32C of the body.
    pub body_crc: u32,
}

/// A framing error.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the channel failed.
    #[error("channel i/o")]
    Io(#[source] std::io::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The header does not start with the magic.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The header checksum is wrong.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The body checksum is wrong.
    #[error("frame body checksum mismatch (type {ty})")]
    BodyChecksum {
        /// Message type of the frame.
        ty: u8,
    },
    /// The body is larger than allowed.
    #[error("frame body of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Claimed (or attempted) length.
        len: u64,
        /// Limit.
        max: u32,
    },
    /// Reserved flags are set.
    #[error("unknown frame flags {0:#04x}")]
    BadFlags(u8),
}

/// Parses and checks a header.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    if h[0..2] != MAGIC {
        return Err(FrameError::BadMagic([h[0], h[1]]));
    }
    let head_crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if crc32c::crc32c(&h[..12]) != head_crc {
        return Err(FrameError::HeaderChecksum);
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_BODY {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_BODY,
        });
    }
    if h[3] & !KNOWN_FLAGS != 0 {
        return Err(FrameError::BadFlags(h[3]));
    }
    Ok(FrameHeader {
        ty: h[2],
        flags: h[3],
        len,
        body_crc: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
    })
}

/// Builds a header for `body`.
pub fn make_header(ty: u8, body: &[u8]) -> [u8; HEADER_LEN] {
    header_with(ty, 0, body.len(), crc32c::crc32c(body))
}

/// Builds a header from its parts.
pub fn header_with(ty: u8, flags: u8, len: usize, body_crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = ty;
    h[3] = flags;
    // Never truncated: a body too large for the field claims the largest length, which
    // every reader refuses (writers check first, see `write_frame`).
    h[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[8..12].copy_from_slice(&body_crc.to_le_bytes());
    let hc = crc32c::crc32c(&h[..12]);
    h[12..16].copy_from_slice(&hc.to_le_bytes());
    h
}

/// A reusable buffer that builds one frame: header space first, body appended, header
/// filled in by [`FrameBuf::finish`]. One buffer, one `write_all` per frame.
#[derive(Debug, Default)]
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    /// An empty buffer with room for `capacity` body bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity + HEADER_LEN),
        }
    }

    /// Starts a new frame, discarding any previous content.
    pub fn start(&mut self) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
        &mut self.buf
    }

    /// The body so far.
    pub fn body_len(&self) -> usize {
        self.buf.len().saturating_sub(HEADER_LEN)
    }

    /// Mutable access to the whole buffer (header space included) for appending body bytes.
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Fills in the header for type `ty` and returns the complete frame.
    pub fn finish(&mut self, ty: u8) -> &[u8] {
        let h = make_header(ty, &self.buf[HEADER_LEN..]);
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        &self.buf
    }

    /// Fills in a header with `flags` and a body CRC the caller computed (a batch whose
    /// records carry digests: the CRC covers prefix and record headers only).
    pub fn finish_with(&mut self, ty: u8, flags: u8, body_crc: u32) -> &[u8] {
        let h = header_with(ty, flags, self.body_len(), body_crc);
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        &self.buf
    }
}

/// Writes one frame of type `ty` with `body`.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, ty: u8, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_BODY as usize {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: MAX_BODY,
        });
    }
    let h = make_header(ty, body);
    w.write_all(&h).map_err(FrameError::Io)?;
    w.write_all(body).map_err(FrameError::Io)?;
    Ok(())
}

/// What one poll of a [`FrameReader`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A whole, checked frame is in the reader's body buffer.
    Frame(FrameHeader),
    /// The read timed out; partial progress is kept. Poll again.
    Idle,
    /// The peer closed the stream cleanly between frames.
    Closed,
}

/// Reads frames from a byte stream, surviving read timeouts mid-frame.
pub struct FrameReader<R> {
    inner: R,
    head: [u8; HEADER_LEN],
    head_got: usize,
    header: Option<FrameHeader>,
    body: Vec<u8>,
    body_got: usize,
    /// The current frame's body length (the header's claim); the buffer grows toward it
    /// only as bytes arrive, so a header alone reserves nothing.
    body_want: usize,
}

/// The body buffer grows by at least this much at a time.
const BODY_GROWTH: usize = 64 << 10;

impl<R: Read> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            head: [0; HEADER_LEN],
            head_got: 0,
            header: None,
            body: Vec::new(),
            body_got: 0,
            body_want: 0,
        }
    }

    /// The body of the frame last returned by [`FrameReader::poll`].
    pub fn body(&self) -> &[u8] {
        &self.body[..self.body_got]
    }

    /// Reads until a frame is complete, the read times out, or the stream ends.
    pub fn poll(&mut self) -> Result<ReadOutcome, FrameError> {
        if self.header.is_some() && self.body_got == self.body_want {
            // The previous frame was handed out: start the next one.
            self.header = None;
            self.head_got = 0;
            self.body_got = 0;
        }
        while self.header.is_none() {
            match self.inner.read(&mut self.head[self.head_got..]) {
                Ok(0) if self.head_got == 0 => return Ok(ReadOutcome::Closed),
                Ok(0) => {
                    return Err(FrameError::Truncated {
                        got: self.head_got,
                        want: HEADER_LEN,
                    })
                }
                Ok(n) => {
                    self.head_got += n;
                    if self.head_got == HEADER_LEN {
                        let h = parse_header(&self.head)?;
                        self.body_want = h.len as usize;
                        self.body.truncate(self.body_want.min(self.body.len()));
                        self.body_got = 0;
                        self.header = Some(h);
                    }
                }
                Err(e) => match e.kind() {
                    ErrorKind::Interrupted => {}
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => return Ok(ReadOutcome::Idle),
                    _ => return Err(FrameError::Io(e)),
                },
            }
        }
        let Some(h) = self.header else {
            return Ok(ReadOutcome::Idle);
        };
        while self.body_got < self.body_want {
            if self.body_got == self.body.len() {
                let grown = (self.body.len() * 2).max(BODY_GROWTH).min(self.body_want);
                self.body.resize(grown, 0);
            }
            match self.inner.read(&mut self.body[self.body_got..]) {
                Ok(0) => {
                    return Err(FrameError::Truncated {
                        got: HEADER_LEN + self.body_got,
                        want: HEADER_LEN + self.body_want,
                    })
                }
                Ok(n) => self.body_got += n,
                Err(e) => match e.kind() {
                    ErrorKind::Interrupted => {}
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => return Ok(ReadOutcome::Idle),
                    _ => return Err(FrameError::Io(e)),
                },
            }
        }
        // With record digests the message decoder checks the CRC over the parts it covers.
        if h.flags & FLAG_RECORD_DIGESTS == 0 && crc32c::crc32c(&self.body) != h.body_crc {
            // Poison the reader: the stream is no longer trustworthy.
            self.header = None;
            self.head_got = 0;
            return Err(FrameError::BodyChecksum { ty: h.ty });
        }
        Ok(ReadOutcome::Frame(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, ty, body).unwrap();
        v
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, FrameError> {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.poll()? {
                ReadOutcome::Frame(h) => out.push((h.ty, r.body().to_vec())),
                ReadOutcome::Closed => return Ok(out),
                ReadOutcome::Idle => unreachable!("slices never time out"),
            }
        }
    }

    #[test]
    fn roundtrip_and_clean_end() {
        let mut bytes = frame(3, b"hello");
        bytes.extend(frame(4, b""));
        let frames = read_all(&bytes).unwrap();
        assert_eq!(frames, vec![(3, b"hello".to_vec()), (4, vec![])]);
    }

    #[test]
    fn truncation_anywhere_is_an_error_not_a_panic() {
        let bytes = frame(3, b"some body bytes");
        for cut in 1..bytes.len() {
            let err = read_all(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn corruption_of_each_byte_is_detected() {
        let bytes = frame(3, b"payload");
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(read_all(&b).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn oversized_and_flagged_frames_are_rejected() {
        let mut h = make_header(1, b"");
        h[4..8].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let c = crc32c::crc32c(&h[..12]);
        h[12..16].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(parse_header(&h), Err(FrameError::TooLarge { .. })));
        // A writer refuses a body over the limit instead of truncating its length.
        let mut out = Vec::new();
        let big = vec![0u8; MAX_BODY as usize + 1];
        assert!(matches!(
            write_frame(&mut out, 1, &big),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty(), "nothing was written");
        let h = header_with(1, 0, 5 << 30, 0);
        assert!(
            matches!(parse_header(&h), Err(FrameError::TooLarge { .. })),
            "a 5 GiB length is not truncated to 1 GiB"
        );
        let mut h = make_header(1, b"");
        h[3] = 0x02;
        let c = crc32c::crc32c(&h[..12]);
        h[12..16].copy_from_slice(&c.to_le_bytes());
        assert!(matches!(parse_header(&h), Err(FrameError::BadFlags(2))));
    }

    /// A reader that returns a timeout before every chunk: partial frames must survive.
    struct Stuttering<'a> {
        data: &'a [u8],
        pos: usize,
        tick: bool,
    }

    impl Read for Stuttering<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.tick = !self.tick;
            if self.tick {
                return Err(std::io::Error::from(ErrorKind::TimedOut));
            }
            let n = buf.len().min(3).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn timeouts_mid_frame_keep_progress() {
        let mut bytes = frame(7, b"0123456789abcdef");
        bytes.extend(frame(8, b"xy"));
        let mut r = FrameReader::new(Stuttering {
            data: &bytes,
            pos: 0,
            tick: false,
        });
        let mut got = Vec::new();
        loop {
            match r.poll().unwrap() {
                ReadOutcome::Frame(h) => got.push((h.ty, r.body().to_vec())),
                ReadOutcome::Idle => continue,
                ReadOutcome::Closed => break,
            }
        }
        assert_eq!(
            got,
            vec![(7, b"0123456789abcdef".to_vec()), (8, b"xy".to_vec())]
        );
    }
}
