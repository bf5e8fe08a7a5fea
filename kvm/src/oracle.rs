//! The guest's consistency check, done by the VMM at a pacing point of each vCPU, where
//! the guest program's registers say exactly how far it got.
//!
//! Memory: in visiting order, pages read `pass + 1` up to the step reached and `pass`
//! after it — exactly one step, as QEMU's migration test checks — with `pass` and the
//! step taken from the vCPU's registers, and the SSE copy of the pass counter (xmm0)
//! equal to it. Disk: every block the guest wrote holds the last sequence number written
//! to it (an unbroken sequence).

use kvm_ioctls::VcpuFd;

use crate::guest::Machine;
use crate::layout::{io_page, PAGE};
use crate::state::DeviceState;

/// Problems listed per vCPU at most.
const MAX_PROBLEMS: usize = 6;

/// One vCPU's check.
#[derive(Debug, Clone, Default)]
pub struct VcpuCheck {
    /// Pages checked.
    pub pages: u64,
    /// Blocks checked.
    pub blocks: u64,
    /// What was wrong.
    pub problems: Vec<String>,
}

/// Checks vCPU `id`'s share of memory and disk against its registers.
pub fn check_vcpu(m: &Machine, fd: &VcpuFd, id: usize, dev: &DeviceState) -> VcpuCheck {
    let mut out = VcpuCheck::default();
    let problem = |out: &mut VcpuCheck, s: String| {
        if out.problems.len() < MAX_PROBLEMS {
            out.problems.push(format!("vCPU {id}: {s}"));
        }
    };
    let (regs, fpu) = match (fd.get_regs(), fd.get_fpu()) {
        (Ok(r), Ok(f)) => (r, f),
        (Err(e), _) | (_, Err(e)) => {
            problem(&mut out, format!("cannot read its state: {e}"));
            return out;
        }
    };
    let p = dev.part;
    if regs.rdi != p.first_page * PAGE
        || regs.rsi != p.pages
        || regs.r12 != p.stride
        || regs.r9 != p.first_block
        || regs.r10 != p.blocks
        || regs.r13 != io_page(id)
    {
        problem(
            &mut out,
            format!(
                "registers do not describe its partition (rdi {:#x} rsi {} r12 {} r9 {} r10 {} r13 {:#x})",
                regs.rdi, regs.rsi, regs.r12, regs.r9, regs.r10, regs.r13
            ),
        );
        return out;
    }
    let pass = regs.rbx;
    let reached = regs.r8;
    let mut xmm0 = [0u8; 8];
    xmm0.copy_from_slice(&fpu.xmm[0][..8]);
    let sse = u64::from_le_bytes(xmm0);
    if sse != pass {
        problem(
            &mut out,
            format!("xmm0 holds {sse} but the pass counter is {pass}: SSE state lost"),
        );
    }
    if reached > p.pages {
        problem(&mut out, format!("step {reached} beyond {} pages", p.pages));
        return out;
    }
    let mut steps = 0u64;
    let mut prev = None;
    let mut page = 0u64;
    for step in 0..p.pages {
        let gpa = (p.first_page + page) * PAGE;
        let v = m.ram.load_u64(gpa);
        let want = pass + u64::from(step < reached);
        if v != want {
            problem(
                &mut out,
                format!(
                    "page {} (step {step}) holds {v}, expected {want} (pass {pass}, step reached {reached})",
                    gpa / PAGE
                ),
            );
        }
        if prev.is_some_and(|x| x != v) {
            steps += 1;
        }
        prev = Some(v);
        page += p.stride;
        if page >= p.pages {
            page -= p.pages;
        }
    }
    out.pages = p.pages;
    if steps > 1 {
        problem(
            &mut out,
            format!("{steps} steps in the page counters where one is allowed"),
        );
    }
    // Blocks: the k-th of the partition was last written with the largest sequence
    // number below r15 that is k modulo the partition size.
    let written = regs.r15;
    if p.blocks > 0 && written > 0 {
        let Ok(disk) = m.disks.get(0) else {
            problem(&mut out, "the guest writes blocks but has no disk".into());
            return out;
        };
        let mut buf = vec![0u8; disk.block_size() as usize];
        for k in 0..p.blocks.min(written) {
            let want = k + p.blocks * ((written - 1 - k) / p.blocks);
            let b = p.first_block + k;
            if let Err(e) = disk.read(b, &mut buf) {
                problem(&mut out, format!("reading block {b}: {e}"));
                continue;
            }
            let word = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&buf[i * 8..i * 8 + 8]);
                u64::from_le_bytes(a)
            };
            if word(0) != want || word(1) != b {
                problem(
                    &mut out,
                    format!(
                        "block {b} holds sequence {} (block {}), expected {want}",
                        word(0),
                        word(1)
                    ),
                );
            }
            out.blocks += 1;
        }
    }
    out
}
