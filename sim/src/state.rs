//! The sim guest's state blob (its "vCPU state"): workload settings and every thread's
//! registers, in the envelope of [`ferry_core::envelope`] (magic `FSIMST01`). Format
//! version 2, the body:
//!
//! ```text
//! pattern:u8 threads:u16 dirty_rate:u64 disk_rate:u64 seed:u64
//! (rng:u64 cursor:u64 writes:u64) × (threads + 1)
//! ```

use ferry_core::guest::StateBlob;

use crate::workload::{Pattern, Regs, WorkloadConfig};
use crate::MAX_THREADS;

const MAGIC: &[u8; 8] = b"FSIMST01";
/// Format version.
pub const VERSION: u32 = 2;

/// Encodes settings and registers.
pub fn encode(cfg: &WorkloadConfig, regs: &[Regs]) -> StateBlob {
    let mut b = Vec::with_capacity(64 + regs.len() * 24);
    b.push(cfg.pattern.code());
    b.extend_from_slice(&cfg.threads.to_le_bytes());
    b.extend_from_slice(&cfg.dirty_rate.to_le_bytes());
    b.extend_from_slice(&cfg.disk_rate.to_le_bytes());
    b.extend_from_slice(&cfg.seed.to_le_bytes());
    for r in regs {
        b.extend_from_slice(&r.rng.to_le_bytes());
        b.extend_from_slice(&r.cursor.to_le_bytes());
        b.extend_from_slice(&r.writes.to_le_bytes());
    }
    StateBlob {
        version: VERSION,
        bytes: ferry_core::envelope::seal(MAGIC, VERSION, &b),
    }
}

/// Decodes a blob, checking version, magic, size and CRC.
pub fn decode(blob: &StateBlob) -> Result<(WorkloadConfig, Vec<Regs>), String> {
    if blob.version != VERSION {
        return Err(format!(
            "state format version {} (this build reads {VERSION})",
            blob.version
        ));
    }
    let body = ferry_core::envelope::open("sim state", MAGIC, VERSION, &blob.bytes)
        .map_err(|e| e.to_string())?;
    const HEAD: usize = 1 + 2 + 8 * 3;
    if body.len() < HEAD {
        return Err("sim state: too short".into());
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&body[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let pattern = Pattern::from_code(body[0]).ok_or("unknown workload pattern")?;
    let threads = u16::from_le_bytes([body[1], body[2]]);
    if threads == 0 || usize::from(threads) > MAX_THREADS {
        return Err(format!("{threads} threads"));
    }
    let cfg = WorkloadConfig {
        pattern,
        threads,
        dirty_rate: u64_at(3),
        disk_rate: u64_at(11),
        seed: u64_at(19),
    };
    let rest = &body[HEAD..];
    let want = (usize::from(threads) + 1) * 24;
    if rest.len() != want {
        return Err(format!(
            "state holds {} register bytes, expected {want}",
            rest.len()
        ));
    }
    let regs = rest
        .chunks_exact(24)
        .enumerate()
        .map(|(i, _)| {
            let o = HEAD + i * 24;
            Regs {
                rng: u64_at(o),
                cursor: u64_at(o + 8),
                writes: u64_at(o + 16),
            }
        })
        .collect();
    Ok((cfg, regs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_every_corruption_is_caught() {
        let cfg = WorkloadConfig {
            threads: 2,
            ..Default::default()
        };
        let regs = vec![
            Regs {
                rng: 1,
                cursor: 2,
                writes: 3,
            },
            Regs {
                rng: 4,
                cursor: 5,
                writes: 6,
            },
            Regs {
                rng: 7,
                cursor: 8,
                writes: 9,
            },
        ];
        let blob = encode(&cfg, &regs);
        assert_eq!(decode(&blob).unwrap(), (cfg, regs));
        ferry_core::envelope::assert_every_byte_guarded(&blob.bytes, |b| {
            decode(&StateBlob {
                version: VERSION,
                bytes: b.to_vec(),
            })
        });
        let mut v3 = blob;
        v3.version = 3;
        assert!(decode(&v3).unwrap_err().contains("version 3"));
    }
}
