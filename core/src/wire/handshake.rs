//! The handshake: `hello` (version, capabilities, layout, image identities) and
//! `welcome` (what the destination holds).

use super::cursor::{put_str, Cursor};
use super::message::*;
use crate::guest::{Base, DiskLayout, GuestLayout};
use crate::image::ImageIdentity;

/// Verification mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Per-unit digests kept as units move, compared as sums: no extra downtime.
    Digest,
    /// Also hash the whole guest during the pause (catches missed dirty pages).
    Full,
}

/// The handshake a source opens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Capability bits.
    pub capabilities: u64,
    /// Random id of this migration; every channel carries it (see the transport preamble).
    pub migration_id: [u8; 16],
    /// The secret of this migration's unit digests ([`crate::digest::DigestKey`]), drawn
    /// by the source; it travels only inside the channel, never through a guest.
    pub digest_key: [u8; 32],
    /// Number of channels the source opened.
    pub channels: u16,
    /// Verification mode.
    pub verify: VerifyMode,
    /// Codec pipeline spec.
    pub codec: String,
    /// The guest's shape.
    pub layout: GuestLayout,
}

/// Accepted handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Version the destination speaks.
    pub version: u16,
    /// Its capability bits.
    pub capabilities: u64,
    /// Echo of the migration id.
    pub migration_id: [u8; 16],
    /// What the destination already holds, per disk of the hello's layout.
    pub bases: Vec<Base>,
}

pub(super) fn put_identity(out: &mut Vec<u8>, id: &Option<ImageIdentity>) {
    match id {
        None => out.push(0),
        Some(i) => {
            out.push(1);
            out.extend_from_slice(&i.id);
            out.extend_from_slice(&i.generation.to_le_bytes());
        }
    }
}

pub(super) fn get_identity(c: &mut Cursor<'_>) -> Result<Option<ImageIdentity>, DecodeError> {
    match c.u8()? {
        0 => Ok(None),
        1 => Ok(Some(ImageIdentity {
            id: c.array()?,
            generation: c.u64()?,
        })),
        f => Err(c.invalid(format!("identity flag {f}"))),
    }
}

pub(super) fn check_size(c: &Cursor<'_>, what: &str, v: u32) -> Result<(), DecodeError> {
    if !v.is_power_of_two() || !(512..=(2 << 20)).contains(&v) {
        return Err(c.invalid(format!("{what} {v} is not a power of two in 512..=2MiB")));
    }
    Ok(())
}

pub(super) fn encode_hello(h: &Hello, out: &mut Vec<u8>) {
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(&h.capabilities.to_le_bytes());
    out.extend_from_slice(&h.migration_id);
    out.extend_from_slice(&h.digest_key);
    out.extend_from_slice(&h.channels.to_le_bytes());
    out.push(match h.verify {
        VerifyMode::Digest => 0,
        VerifyMode::Full => 1,
    });
    put_str(out, &h.codec, MAX_TEXT);
    put_str(out, &h.layout.backend, MAX_NAME);
    out.extend_from_slice(&h.layout.page_size.to_le_bytes());
    out.extend_from_slice(&h.layout.pages.to_le_bytes());
    out.extend_from_slice(&(h.layout.disks.len() as u16).to_le_bytes());
    for d in &h.layout.disks {
        put_str(out, &d.name, MAX_NAME);
        out.extend_from_slice(&d.block_size.to_le_bytes());
        out.extend_from_slice(&d.blocks.to_le_bytes());
        put_identity(out, &d.identity);
    }
}

pub(super) fn decode_hello(body: &[u8]) -> Result<Hello, DecodeError> {
    let mut c = Cursor::new(body, "hello");
    let version = c.u16()?;
    if version != PROTOCOL_VERSION {
        // Nothing after the version is meaningful in another version: stop here.
        return Err(c.invalid(format!(
            "protocol version {version} not supported (this build speaks {PROTOCOL_VERSION})"
        )));
    }
    let capabilities = c.u64()?;
    let migration_id = c.array()?;
    let digest_key = c.array()?;
    let channels = c.u16()?;
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(c.invalid(format!("{channels} channels (1..={MAX_CHANNELS})")));
    }
    let verify = match c.u8()? {
        0 => VerifyMode::Digest,
        1 => VerifyMode::Full,
        v => return Err(c.invalid(format!("verify mode {v}"))),
    };
    let codec = c.string(MAX_TEXT)?;
    let backend = c.string(MAX_NAME)?;
    let page_size = c.u32()?;
    check_size(&c, "page size", page_size)?;
    let pages = c.u64()?;
    // A post-copy recovery may come from the images alone: no memory, only disks.
    let recovering = capabilities & super::message::CAP_RECOVER != 0;
    if (pages == 0 && !recovering) || pages > (1 << 40) {
        return Err(c.invalid(format!("{pages} pages")));
    }
    let n = c.u16()? as usize;
    if n > MAX_DISKS {
        return Err(c.invalid(format!("{n} disks (at most {MAX_DISKS})")));
    }
    let mut disks = Vec::with_capacity(n);
    for _ in 0..n {
        let name = c.string(MAX_NAME)?;
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(c.invalid(format!("disk name {name:?} is not a plain file name")));
        }
        let block_size = c.u32()?;
        check_size(&c, "block size", block_size)?;
        let blocks = c.u64()?;
        if blocks > (1 << 40) {
            return Err(c.invalid(format!("{blocks} blocks")));
        }
        let identity = get_identity(&mut c)?;
        disks.push(DiskLayout {
            name,
            block_size,
            blocks,
            identity,
        });
    }
    c.end()?;
    Ok(Hello {
        version,
        capabilities,
        migration_id,
        digest_key,
        channels,
        verify,
        codec,
        layout: GuestLayout {
            backend,
            page_size,
            pages,
            disks,
        },
    })
}
