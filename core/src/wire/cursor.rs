//! A bounds-checked little-endian reader: every decoder reads through it, so no input
//! can make one index out of bounds.

use super::message::*;

/// A bounds-checked little-endian reader over a body.
pub(super) struct Cursor<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, pos: 0, what }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(DecodeError::Truncated { what: self.what })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(super) fn invalid(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            what: self.what,
            reason: reason.into(),
        }
    }

    /// A string with a u16 length prefix, at most `max` bytes, UTF-8.
    pub(super) fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(self.invalid(format!("string of {len} bytes exceeds {max}")));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.invalid("string is not UTF-8"))
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.pos..];
        self.pos = self.data.len();
        s
    }

    pub(super) fn end(&self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    // Callers never pass more than `max`; cut defensively (at a char boundary).
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}
