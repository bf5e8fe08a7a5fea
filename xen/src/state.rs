//! The versioned state blob of a Xen domain, in the envelope of [`ferry_core::envelope`]
//! (magic `"FERRYXEN"`); the body, little-endian fields —
//! RAM map digest and page count, TSC info (mode, elapsed ns, kHz, incarnation), the
//! carried HVM params, and Xen's own HVM context records (validated by Xen on load).

/// Format version of the blob.
pub const STATE_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"FERRYXEN";
/// Most HVM params a blob may carry.
const MAX_PARAMS: u64 = 64;
/// Largest HVM context accepted (Xen's are a few KiB per vCPU).
const MAX_CONTEXT: u64 = 16 << 20;

/// A domain's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XenState {
    /// Digest of the RAM gfn list (both sides must agree).
    pub memmap_digest: u64,
    /// RAM pages.
    pub pages: u64,
    /// `xc_domain_get_tsc_info`.
    pub tsc: [u64; 4],
    /// `(param, value)`.
    pub params: Vec<(u32, u64)>,
    /// `xc_domain_hvm_getcontext`.
    pub hvm_context: Vec<u8>,
}

/// Encodes the state.
pub fn encode(s: &XenState) -> Vec<u8> {
    let mut b = Vec::new();
    let mut put = |v: u64| b.extend_from_slice(&v.to_le_bytes());
    put(s.memmap_digest);
    put(s.pages);
    for t in s.tsc {
        put(t);
    }
    put(s.params.len() as u64);
    for &(p, v) in &s.params {
        put(u64::from(p));
        put(v);
    }
    put(s.hvm_context.len() as u64);
    b.extend_from_slice(&s.hvm_context);
    ferry_core::envelope::seal(MAGIC, STATE_VERSION, &b)
}

/// Decodes a blob; lengths are checked, nothing is trusted.
pub fn decode(bytes: &[u8]) -> Result<XenState, String> {
    let mut b = ferry_core::envelope::open("Xen state", MAGIC, STATE_VERSION, bytes)
        .map_err(|e| e.to_string())?;
    let mut get = || -> Result<u64, String> {
        if b.len() < 8 {
            return Err("truncated Xen state".into());
        }
        let (head, rest) = b.split_at(8);
        b = rest;
        let mut a = [0u8; 8];
        a.copy_from_slice(head);
        Ok(u64::from_le_bytes(a))
    };
    let memmap_digest = get()?;
    let pages = get()?;
    let tsc = [get()?, get()?, get()?, get()?];
    let n = get()?;
    if n > MAX_PARAMS {
        return Err(format!("{n} HVM params"));
    }
    let mut params = Vec::new();
    for _ in 0..n {
        let p = u32::try_from(get()?).map_err(|_| "HVM param number out of range")?;
        params.push((p, get()?));
    }
    let len = get()?;
    if len > MAX_CONTEXT || len as usize != b.len() {
        return Err(format!("HVM context of {len} bytes, {} left", b.len()));
    }
    Ok(XenState {
        memmap_digest,
        pages,
        tsc,
        params,
        hvm_context: b.to_vec(),
    })
}

/// One record of Xen's HVM context: type code, instance, body.
pub type HvmRecord<'a> = (u16, u16, &'a [u8]);

/// Splits an HVM context into its records (`typecode u16, instance u16, length u32`, then
/// the body), up to and including the END record (type 0). Bounds-checked.
pub fn hvm_records(ctx: &[u8]) -> Result<Vec<HvmRecord<'_>>, String> {
    let mut out = Vec::new();
    let mut b = ctx;
    loop {
        if b.len() < 8 {
            return Err(format!(
                "HVM context: truncated record header after {} records",
                out.len()
            ));
        }
        let ty = u16::from_le_bytes([b[0], b[1]]);
        let inst = u16::from_le_bytes([b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        if b.len() - 8 < len {
            return Err(format!("HVM context: record type {ty} claims {len} bytes"));
        }
        out.push((ty, inst, &b[8..8 + len]));
        b = &b[8 + len..];
        if ty == 0 {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_input() {
        let s = XenState {
            memmap_digest: 7,
            pages: 65536,
            tsc: [1, 2, 3, 4],
            params: vec![(12, 0xfeffc000), (10, 1)],
            hvm_context: vec![9; 1000],
        };
        let e = encode(&s);
        assert_eq!(decode(&e).unwrap(), s);
        ferry_core::envelope::assert_every_byte_guarded(&e, decode);
        // Inside a valid envelope the fields are still checked: a hostile peer seals too.
        let body = ferry_core::envelope::open("Xen state", MAGIC, STATE_VERSION, &e).unwrap();
        for cut in 0..body.len() {
            let sealed = ferry_core::envelope::seal(MAGIC, STATE_VERSION, &body[..cut]);
            assert!(decode(&sealed).is_err(), "body cut at {cut}");
        }
    }

    #[test]
    fn hvm_records_split_and_refuse_overruns() {
        let mut ctx = Vec::new();
        for (ty, body) in [(1u16, &[1u8, 2][..]), (2, &[3; 10][..]), (0, &[][..])] {
            ctx.extend_from_slice(&ty.to_le_bytes());
            ctx.extend_from_slice(&0u16.to_le_bytes());
            ctx.extend_from_slice(&(body.len() as u32).to_le_bytes());
            ctx.extend_from_slice(body);
        }
        let r = hvm_records(&ctx).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], (2, 0, &[3u8; 10][..]));
        for cut in 0..ctx.len() {
            assert!(hvm_records(&ctx[..cut]).is_err());
        }
    }
}
