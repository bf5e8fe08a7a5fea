//! A Ferry-owned block back-end: a disk image served over the NBD protocol, so that a
//! hypervisor's block path (Linux's `nbd` driver under Xen's blkback, QEMU's qdisk, any NBD
//! client) reads and writes the guest's disk through Ferry, and every guest write marks
//! the block log and the generation log as the paper's block back-end did.
//!
//! Two ways in: [`serve`] after the fixed-newstyle handshake (a client such as QEMU's), or
//! [`serve_transmission`] straight away (the kernel's `nbd` driver, configured by ioctl:
//! see [`crate::kernel_nbd`]). Everything a client sends is hostile until checked: magic
//! numbers, commands, lengths and ranges are bounds-checked, and a bad request either gets
//! an NBD error reply or ends the connection with an [`NbdError`]; nothing panics.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::image::DiskImage;

/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const REPLY_MAGIC: u32 = 0x6744_6698;
/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// The largest read or write served (Linux sends at most its `max_sectors`, well below).
pub const MAX_REQUEST: u32 = 32 << 20;

/// `NBDMAGIC`.
const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The longest option payload read (a GO with a 4 KiB export name fits).
const MAX_OPTION: u32 = 8192;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

/// Transmission flags: the export takes flags, flushes and FUA writes.
pub const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
const FLAG_HAS_FLAGS: u16 = 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_FUA: u16 = 1 << 3;
/// Command flag: force unit access (the write is durable before the reply).
const CMD_FLAG_FUA: u16 = 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// NBD error numbers in replies.
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Why serving stopped other than by the client's disconnect.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A request header without the request magic.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// A command this server does not know (its payload length is unknown, so the
    /// connection cannot go on).
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A read or write longer than [`MAX_REQUEST`].
    #[error("request of {0} bytes (at most {MAX_REQUEST})")]
    TooLarge(u32),
    /// The handshake went wrong.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The connection or the image failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| NbdError::Io { what, source }
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read,
    /// Write the `len` bytes that follow the header at `offset`.
    Write,
    /// The client is leaving.
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard a range (not offered: answered with EINVAL).
    Trim,
    /// Write zeroes (not offered: answered with EINVAL).
    WriteZeroes,
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Command flags (FUA).
    pub flags: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Decodes a header (big-endian, as on the wire).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, NbdError> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let magic = u32_at(0);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic(magic));
        }
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let kind = u16::from_be_bytes([b[6], b[7]]);
        let command = match kind {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            k => return Err(NbdError::UnknownCommand(k)),
        };
        let len = u32_at(24);
        if matches!(command, Command::Read | Command::Write) && len > MAX_REQUEST {
            return Err(NbdError::TooLarge(len));
        }
        Ok(Self {
            command,
            flags,
            cookie: u64_at(8),
            offset: u64_at(16),
            len,
        })
    }

    /// Encodes a header (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let kind: u16 = match self.command {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
        };
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A cap on the guest's disk writes (blocks per second, 0 = none) that the migration
/// engine sets when storage does not converge; the server paces writes to it.
#[derive(Debug, Default)]
pub struct WriteLimit(AtomicU64);

impl WriteLimit {
    /// Sets the cap (`None`: no cap).
    pub fn set(&self, blocks_per_second: Option<u64>) {
        self.0
            .store(blocks_per_second.map_or(0, |n| n.max(1)), Ordering::Relaxed);
    }

    /// Paces `blocks` written at `*next`.
    fn pace(&self, blocks: u64, next: &mut Instant) {
        let rate = self.0.load(Ordering::Relaxed);
        let now = Instant::now();
        if rate == 0 {
            *next = now;
            return;
        }
        if *next > now {
            std::thread::sleep(*next - now);
        }
        *next = (*next).max(now) + Duration::from_secs_f64(blocks as f64 / rate as f64);
    }
}

/// What a served connection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests (and FUA writes).
    pub flushes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// Serves `image` to a client that starts with the fixed-newstyle handshake, until it
/// disconnects. Any export name is this image.
pub fn serve<S: Read + Write>(
    mut stream: S,
    image: &DiskImage,
    limit: &WriteLimit,
) -> Result<Served, NbdError> {
    if !handshake(&mut stream, image)? {
        return Ok(Served::default());
    }
    serve_transmission(stream, image, limit)
}

fn read_u32<S: Read>(s: &mut S) -> Result<u32, NbdError> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).map_err(io("reading the handshake"))?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<S: Read>(s: &mut S) -> Result<u64, NbdError> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(io("reading the handshake"))?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply<S: Write>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).map_err(io("writing the handshake"))
}

/// The export's size in bytes.
fn export_size(image: &DiskImage) -> u64 {
    image.blocks() * u64::from(image.block_size())
}

/// Runs the handshake; returns whether transmission follows (false: the client aborted).
fn handshake<S: Read + Write>(s: &mut S, image: &DiskImage) -> Result<bool, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    hello.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).map_err(io("writing the handshake"))?;
    let client = read_u32(s)?;
    if client & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Handshake(format!(
            "unknown client flags {client:#x}"
        )));
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    let size = export_size(image);
    loop {
        let magic = read_u64(s)?;
        if magic != OPT_MAGIC {
            return Err(NbdError::Handshake(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            return Err(NbdError::Handshake(format!(
                "option {option} of {len} bytes (at most {MAX_OPTION})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .map_err(io("reading the handshake"))?;
        match option {
            OPT_EXPORT_NAME => {
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).map_err(io("writing the handshake"))?;
                return Ok(true);
            }
            OPT_ABORT => {
                option_reply(s, option, REP_ACK, &[])?;
                return Ok(false);
            }
            OPT_INFO | OPT_GO => {
                if !go_request_is_well_formed(&data) {
                    option_reply(s, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(s, option, REP_INFO, &export)?;
                // Any size works (partial blocks are read, patched and written whole);
                // whole blocks are the fast path.
                let mut sizes = Vec::with_capacity(14);
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&image.block_size().to_be_bytes());
                sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(s, option, REP_INFO, &sizes)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// A GO/INFO payload: name length, name, count of info requests, the requests.
fn go_request_is_well_formed(d: &[u8]) -> bool {
    let Some(name_len) = d
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return false;
    };
    let at = 4usize.saturating_add(name_len as usize);
    let Some(n) = d.get(at..at.saturating_add(2)) else {
        return false;
    };
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    d.len() == at + 2 + 2 * n
}

/// Serves transmission requests on `stream` (the handshake done or not needed) until the
/// client disconnects or closes the connection.
pub fn serve_transmission<S: Read + Write>(
    mut stream: S,
    image: &DiskImage,
    limit: &WriteLimit,
) -> Result<Served, NbdError> {
    let size = export_size(image);
    let mut served = Served::default();
    let mut data = Vec::new();
    let mut next_write = Instant::now();
    loop {
        let mut h = [0u8; REQUEST_LEN];
        match stream.read_exact(&mut h) {
            Ok(()) => {}
            // A client that just closes the socket is done too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(io("reading a request")(e)),
        }
        let req = Request::parse(&h)?;
        let in_range = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= size);
        let mut error = 0;
        match req.command {
            Command::Disconnect => return Ok(served),
            Command::Read => {
                served.reads += 1;
                // Out of range: refused before anything is allocated for it.
                if !in_range {
                    error = EINVAL;
                } else {
                    data.resize(req.len as usize, 0);
                    if let Err(e) = read_range(image, req.offset, &mut data) {
                        tracing::warn!("nbd read at {}: {e}", req.offset);
                        error = EIO;
                    }
                }
            }
            Command::Write if !in_range => {
                served.writes += 1;
                // The data still follows the request: skip it without keeping it.
                let skipped = std::io::copy(
                    &mut (&mut stream).take(u64::from(req.len)),
                    &mut std::io::sink(),
                )
                .map_err(io("reading write data"))?;
                if skipped != u64::from(req.len) {
                    return Err(io("reading write data")(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                error = EINVAL;
            }
            Command::Write => {
                served.writes += 1;
                data.resize(req.len as usize, 0);
                stream
                    .read_exact(&mut data)
                    .map_err(io("reading write data"))?;
                let blocks = u64::from(req.len).div_ceil(u64::from(image.block_size()));
                limit.pace(blocks, &mut next_write);
                let r = write_range(image, req.offset, &data).and_then(|()| {
                    if req.flags & CMD_FLAG_FUA != 0 {
                        served.flushes += 1;
                        image.flush()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = r {
                    tracing::warn!("nbd write at {}: {e}", req.offset);
                    error = EIO;
                }
            }
            Command::Flush => {
                served.flushes += 1;
                if let Err(e) = image.flush() {
                    tracing::warn!("nbd flush: {e}");
                    error = EIO;
                }
            }
            Command::Trim | Command::WriteZeroes => error = EINVAL,
        }
        if error != 0 {
            served.errors += 1;
        }
        let mut reply = [0u8; 16];
        reply[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        reply[4..8].copy_from_slice(&error.to_be_bytes());
        reply[8..16].copy_from_slice(&req.cookie.to_be_bytes());
        stream.write_all(&reply).map_err(io("writing a reply"))?;
        if req.command == Command::Read && error == 0 {
            stream.write_all(&data).map_err(io("writing read data"))?;
        }
        stream.flush().map_err(io("writing a reply"))?;
    }
}

/// The pieces of `len` bytes at byte `offset` in blocks of `bs`: (block index, offset in
/// the block, bytes, offset in the request).
fn pieces(offset: u64, len: usize, bs: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let (index, skip) = (at / bs, (at % bs) as usize);
        let n = (bs as usize - skip).min(len - done);
        let piece = (index, skip, n, done);
        done += n;
        Some(piece)
    })
}

/// Reads `buf.len()` bytes at byte `offset` (in range), block by block.
fn read_range(image: &DiskImage, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let bs = u64::from(image.block_size());
    let mut block = vec![0u8; bs as usize];
    for (index, skip, n, at) in pieces(offset, buf.len(), bs) {
        image.read(index, &mut block)?;
        buf[at..at + n].copy_from_slice(&block[skip..skip + n]);
    }
    Ok(())
}

/// Writes `data` at byte `offset` (in range) as guest writes; a partly covered block is
/// read, patched and written whole.
fn write_range(image: &DiskImage, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let bs = u64::from(image.block_size());
    let mut block = vec![0u8; bs as usize];
    for (index, skip, n, at) in pieces(offset, data.len(), bs) {
        if n == bs as usize {
            image.guest_write(index, &data[at..at + n])?;
        } else {
            image.read(index, &mut block)?;
            block[skip..skip + n].copy_from_slice(&data[at..at + n]);
            image.guest_write(index, &block)?;
        }
    }
    Ok(())
}
