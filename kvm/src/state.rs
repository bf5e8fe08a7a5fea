//! The versioned state blob of a KVM guest, and saving/restoring a vCPU in the order KVM
//! needs.
//!
//! Layout: `"FERRYKVM"`, then sections `[tag u16][length u32][bytes]`. Kernel structures
//! travel as their exact bytes (checked against their size on decode; KVM validates the
//! values when they are set), the VMM's own device state as little-endian fields.
//! Restore order (as Firecracker's): CPUID, MP state, regs, sregs, FPU, XSAVE, XCRs, debug
//! registers, LAPIC (after sregs: the APIC base), MSRs (after the LAPIC: TSC deadline),
//! vCPU events; then the irqchips and the clock for the VM.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId,
    Msrs,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

use crate::layout::Partition;
use crate::workload::{Pattern, Workload};

/// Format version of the blob.
pub const STATE_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"FERRYKVM";

/// The VMM's per-vCPU device state: where the workload's pacing and accounting stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// The vCPU's share of memory and disk.
    pub part: Partition,
    /// Steps of the current pass already accounted.
    pub pos: u64,
    /// A pass ended and its last chunk is not accounted yet.
    pub pass_pending: bool,
    /// Page writes so far (over the guest's whole life, across migrations).
    pub page_writes: u64,
    /// Block writes so far.
    pub block_writes: u64,
    /// Passes the guest reported.
    pub passes: u64,
}

/// Everything KVM holds for one vCPU, plus the VMM's device state.
#[derive(Default)]
pub struct VcpuState {
    /// CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MP state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended state (AVX and more).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC (with an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// MSRs.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending events (exceptions, interrupts, NMI).
    pub events: kvm_vcpu_events,
    /// The VMM's device state.
    pub dev: DeviceState,
}

/// The whole guest's state.
#[derive(Default)]
pub struct VmState {
    /// Workload settings.
    pub workload: Workload,
    /// Per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The three irqchips (PIC master, PIC slave, IOAPIC), when in-kernel.
    pub irqchips: Vec<kvm_irqchip>,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A failed KVM call while saving or restoring, naming the piece.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StateError {
    /// Which piece of state.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn fail(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

/// Reads the MSRs of `list`; returns them and how many KVM read (it stops at the first
/// it cannot read).
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<(Msrs, usize), StateError> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.get_msrs(&mut msrs).map_err(fail("reading MSRs"))?;
    Ok((msrs, n))
}

/// MSRs to save: KVM's index list minus those this host cannot read (found once).
pub fn readable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let mut list: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(fail("reading the MSR index list"))?
        .as_slice()
        .to_vec();
    loop {
        let (_, n) = read_msrs(vcpu, &list)?;
        if n >= list.len() {
            return Ok(list);
        }
        // `get_msrs` stops at the first MSR it cannot read: drop it and retry.
        list.remove(n);
    }
}

/// Saves one vCPU (paused at an instruction boundary).
pub fn save_vcpu(
    vcpu: &VcpuFd,
    msr_list: &[u32],
    irqchip: bool,
    dev: DeviceState,
) -> Result<VcpuState, StateError> {
    let (msrs, n) = read_msrs(vcpu, msr_list)?;
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(fail("reading CPUID"))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu.get_mp_state().map_err(fail("reading the MP state"))?,
        regs: vcpu.get_regs().map_err(fail("reading registers"))?,
        sregs: vcpu
            .get_sregs()
            .map_err(fail("reading special registers"))?,
        fpu: vcpu.get_fpu().map_err(fail("reading the FPU"))?,
        xsave: vcpu.get_xsave().map_err(fail("reading XSAVE state"))?,
        xcrs: vcpu.get_xcrs().map_err(fail("reading XCRs"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(fail("reading debug registers"))?,
        lapic: if irqchip {
            Some(vcpu.get_lapic().map_err(fail("reading the LAPIC"))?)
        } else {
            None
        },
        msrs: msrs.as_slice()[..n.min(msrs.as_slice().len())].to_vec(),
        events: vcpu
            .get_vcpu_events()
            .map_err(fail("reading vCPU events"))?,
        dev,
    })
}

/// Restores one vCPU, in KVM's order.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError {
        what: "building CPUID",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(fail("setting CPUID"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(fail("setting the MP state"))?;
    vcpu.set_regs(&s.regs).map_err(fail("setting registers"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(fail("setting special registers"))?;
    vcpu.set_fpu(&s.fpu).map_err(fail("setting the FPU"))?;
    // SAFETY: `kvm_xsave` is the legacy 4 KiB area `get_xsave` filled on the source, and
    // no XSAVE2 extension was enabled on this VM, so the kernel reads exactly its size.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(fail("setting XSAVE state"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(fail("setting XCRs"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(fail("setting debug registers"))?;
    if let Some(lapic) = &s.lapic {
        vcpu.set_lapic(lapic).map_err(fail("setting the LAPIC"))?;
    }
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateError {
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(fail("setting MSRs"))?;
    if n != s.msrs.len() {
        return Err(StateError {
            what: "setting MSRs (one was refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(fail("setting vCPU events"))?;
    Ok(())
}

// Section tags.
const T_WORKLOAD: u16 = 1;
const T_CLOCK: u16 = 2;
const T_IRQCHIP: u16 = 3;
const T_VCPU: u16 = 0x100;
const T_CPUID: u16 = 0x101;
const T_MP: u16 = 0x102;
const T_REGS: u16 = 0x103;
const T_SREGS: u16 = 0x104;
const T_FPU: u16 = 0x105;
const T_XSAVE: u16 = 0x106;
const T_XCRS: u16 = 0x107;
const T_DEBUG: u16 = 0x108;
const T_LAPIC: u16 = 0x109;
const T_MSRS: u16 = 0x10a;
const T_EVENTS: u16 = 0x10b;
const T_DEVICE: u16 = 0x10c;
/// Most vCPUs a blob may describe.
const MAX_VCPUS: usize = crate::layout::MAX_VCPUS;

struct Writer(Vec<u8>);

impl Writer {
    fn section(&mut self, tag: u16, bytes: &[u8]) {
        self.0.extend_from_slice(&tag.to_le_bytes());
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b
}

/// Encodes the state.
pub fn encode(s: &VmState) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    let wl = &s.workload;
    w.section(
        T_WORKLOAD,
        &u64s(&[
            u64::from(wl.pattern.code()),
            wl.dirty_rate,
            wl.disk_rate,
            s.vcpus.len() as u64,
        ]),
    );
    w.section(T_CLOCK, s.clock.as_bytes());
    for chip in &s.irqchips {
        w.section(T_IRQCHIP, chip.as_bytes());
    }
    for (i, v) in s.vcpus.iter().enumerate() {
        w.section(T_VCPU, &(i as u32).to_le_bytes());
        w.section(T_CPUID, v.cpuid.as_bytes());
        w.section(T_MP, v.mp_state.as_bytes());
        w.section(T_REGS, v.regs.as_bytes());
        w.section(T_SREGS, v.sregs.as_bytes());
        w.section(T_FPU, &fpu_bytes(&v.fpu));
        w.section(T_XSAVE, v.xsave.as_bytes());
        w.section(T_XCRS, v.xcrs.as_bytes());
        w.section(T_DEBUG, v.debugregs.as_bytes());
        if let Some(l) = &v.lapic {
            w.section(T_LAPIC, l.as_bytes());
        }
        w.section(T_MSRS, v.msrs.as_bytes());
        w.section(T_EVENTS, v.events.as_bytes());
        let d = &v.dev;
        let p = &d.part;
        w.section(
            T_DEVICE,
            &u64s(&[
                p.first_page,
                p.pages,
                p.stride,
                p.first_block,
                p.blocks,
                d.pos,
                u64::from(d.pass_pending),
                d.page_writes,
                d.block_writes,
                d.passes,
            ]),
        );
    }
    ferry_core::envelope::seal(MAGIC, STATE_VERSION, &w.0)
}

/// A bounds-checked reader over hostile bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn section(&mut self) -> Result<Option<(u16, &'a [u8])>, String> {
        if self.b.is_empty() {
            return Ok(None);
        }
        if self.b.len() < 6 {
            return Err("truncated section header".into());
        }
        let tag = u16::from_le_bytes([self.b[0], self.b[1]]);
        let len = u32::from_le_bytes([self.b[2], self.b[3], self.b[4], self.b[5]]) as usize;
        let rest = &self.b[6..];
        if rest.len() < len {
            return Err(format!(
                "section {tag:#x} claims {len} bytes, {} left",
                rest.len()
            ));
        }
        self.b = &rest[len..];
        Ok(Some((tag, &rest[..len])))
    }
}

fn pod<T: FromBytes>(tag: u16, b: &[u8]) -> Result<T, String> {
    T::read_from_bytes(b).map_err(|_| {
        format!(
            "section {tag:#x} has {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )
    })
}

fn pod_vec<T: FromBytes + Clone>(tag: u16, b: &[u8], max: usize) -> Result<Vec<T>, String> {
    let size = std::mem::size_of::<T>();
    if !b.len().is_multiple_of(size) || b.len() / size > max {
        return Err(format!(
            "section {tag:#x}: {} bytes is not a list of at most {max} entries",
            b.len()
        ));
    }
    b.chunks_exact(size).map(|c| pod::<T>(tag, c)).collect()
}

fn read_u64s<const N: usize>(tag: u16, b: &[u8]) -> Result<[u64; N], String> {
    if b.len() != N * 8 {
        return Err(format!(
            "section {tag:#x} has {} bytes, expected {}",
            b.len(),
            N * 8
        ));
    }
    let mut out = [0u64; N];
    for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        *o = u64::from_le_bytes(a);
    }
    Ok(out)
}

fn fpu_from(b: &[u8]) -> Result<kvm_fpu, String> {
    if b.len() != 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4 {
        return Err(format!("FPU section has {} bytes", b.len()));
    }
    let mut f = kvm_fpu::default();
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    for r in f.fpr.iter_mut() {
        r.copy_from_slice(take(16));
    }
    let u16_of = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]);
    f.fcw = u16_of(take(2));
    f.fsw = u16_of(take(2));
    f.ftwx = take(1)[0];
    f.last_opcode = u16_of(take(2));
    let mut a = [0u8; 8];
    a.copy_from_slice(take(8));
    f.last_ip = u64::from_le_bytes(a);
    a.copy_from_slice(take(8));
    f.last_dp = u64::from_le_bytes(a);
    for r in f.xmm.iter_mut() {
        r.copy_from_slice(take(16));
    }
    let m = take(4);
    f.mxcsr = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
    Ok(f)
}

/// Decodes a blob: its envelope (magic, version, length, CRC) first, then every section
/// and length is checked, nothing is trusted.
pub fn decode(bytes: &[u8]) -> Result<VmState, String> {
    let body = ferry_core::envelope::open("KVM state", MAGIC, STATE_VERSION, bytes)
        .map_err(|e| e.to_string())?;
    let mut r = Reader { b: body };
    let mut s = VmState::default();
    let mut declared = None;
    let mut got_clock = false;
    // Per vCPU, the sections seen (bit = tag - T_VCPU): every one is required, each once.
    let mut seen: Vec<u32> = Vec::new();
    while let Some((tag, b)) = r.section()? {
        if (T_CPUID..=T_DEVICE).contains(&tag) {
            if let Some(mask) = seen.last_mut() {
                let bit = 1u32 << (tag - T_VCPU);
                if *mask & bit != 0 {
                    return Err(format!("section {tag:#x} twice for one vCPU"));
                }
                *mask |= bit;
            }
        }
        let cur = s.vcpus.last_mut();
        match (tag, cur) {
            (T_WORKLOAD, _) => {
                let [pattern, dirty_rate, disk_rate, vcpus] = read_u64s::<4>(tag, b)?;
                s.workload = Workload {
                    pattern: Pattern::from_code(pattern)
                        .ok_or_else(|| format!("unknown workload pattern {pattern}"))?,
                    dirty_rate,
                    disk_rate,
                };
                if vcpus == 0 || vcpus as usize > MAX_VCPUS {
                    return Err(format!("{vcpus} vCPUs (1..={MAX_VCPUS})"));
                }
                declared = Some(vcpus as usize);
            }
            (T_CLOCK, _) => {
                s.clock = pod(tag, b)?;
                got_clock = true;
            }
            (T_IRQCHIP, _) => {
                if s.irqchips.len() >= 3 {
                    return Err("more than three irqchips".into());
                }
                s.irqchips.push(pod(tag, b)?);
            }
            (T_VCPU, _) => {
                let id = read_u32(tag, b)? as usize;
                if id != s.vcpus.len() || id >= MAX_VCPUS {
                    return Err(format!("vCPU {id} out of order"));
                }
                s.vcpus.push(VcpuState::default());
                seen.push(0);
            }
            (_, None) => return Err(format!("section {tag:#x} before any vCPU")),
            (T_CPUID, Some(v)) => v.cpuid = pod_vec(tag, b, kvm_bindings::KVM_MAX_CPUID_ENTRIES)?,
            (T_MP, Some(v)) => v.mp_state = pod(tag, b)?,
            (T_REGS, Some(v)) => v.regs = pod(tag, b)?,
            (T_SREGS, Some(v)) => v.sregs = pod(tag, b)?,
            (T_FPU, Some(v)) => v.fpu = fpu_from(b)?,
            (T_XSAVE, Some(v)) => v.xsave = pod(tag, b)?,
            (T_XCRS, Some(v)) => v.xcrs = pod(tag, b)?,
            (T_DEBUG, Some(v)) => v.debugregs = pod(tag, b)?,
            (T_LAPIC, Some(v)) => v.lapic = Some(pod(tag, b)?),
            (T_MSRS, Some(v)) => v.msrs = pod_vec(tag, b, kvm_bindings::KVM_MAX_MSR_ENTRIES)?,
            (T_EVENTS, Some(v)) => v.events = pod(tag, b)?,
            (T_DEVICE, Some(v)) => {
                let [first_page, pages, stride, first_block, blocks, pos, pending, pw, bw, passes] =
                    read_u64s::<10>(tag, b)?;
                if pages == 0 || stride == 0 || (pages > 1 && stride >= pages) || pos > pages {
                    return Err(format!(
                        "device state: {pages} pages, stride {stride}, position {pos}"
                    ));
                }
                v.dev = DeviceState {
                    part: Partition {
                        first_page,
                        pages,
                        stride,
                        first_block,
                        blocks,
                    },
                    pos,
                    pass_pending: pending != 0,
                    page_writes: pw,
                    block_writes: bw,
                    passes,
                };
            }
            (t, _) => return Err(format!("unknown section {t:#x}")),
        }
    }
    let lapic_bit = 1u32 << (T_LAPIC - T_VCPU);
    let all = ((1u32 << (T_DEVICE - T_VCPU + 1)) - 2) & !lapic_bit;
    for (i, mask) in seen.iter().enumerate() {
        if mask & all != all {
            return Err(format!("vCPU {i}'s state is incomplete"));
        }
        if (mask & lapic_bit != 0) == s.irqchips.is_empty() {
            return Err(format!("vCPU {i}: LAPIC state and irqchips disagree"));
        }
    }
    match declared {
        None => Err("no workload section".into()),
        Some(n) if n != s.vcpus.len() => {
            Err(format!("{} vCPU states for {n} vCPUs", s.vcpus.len()))
        }
        Some(_) if !got_clock => Err("no clock section".into()),
        Some(_) => Ok(s),
    }
}

fn read_u32(tag: u16, b: &[u8]) -> Result<u32, String> {
    if b.len() != 4 {
        return Err(format!(
            "section {tag:#x} has {} bytes, expected 4",
            b.len()
        ));
    }
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu() -> VcpuState {
        let mut v = VcpuState::default();
        v.regs.rip = 0x10000;
        v.regs.rbx = 7;
        v.fpu.xmm[0][0] = 7;
        v.fpu.mxcsr = 0x1f80;
        v.msrs = vec![kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        }];
        v.cpuid = vec![kvm_cpuid_entry2::default(); 3];
        v.lapic = Some(kvm_lapic_state::default());
        v.dev = DeviceState {
            part: Partition {
                first_page: 512,
                pages: 100,
                stride: 61,
                first_block: 0,
                blocks: 10,
            },
            pos: 64,
            pass_pending: true,
            page_writes: 1000,
            block_writes: 5,
            passes: 7,
        };
        v
    }

    fn sample() -> VmState {
        VmState {
            workload: Workload {
                pattern: Pattern::Scatter,
                dirty_rate: 5000,
                disk_rate: 100,
            },
            vcpus: vec![vcpu(), vcpu()],
            irqchips: vec![kvm_irqchip::default(); 3],
            clock: kvm_clock_data::default(),
        }
    }

    #[test]
    fn a_blob_round_trips_and_every_corruption_is_caught() {
        let s = sample();
        let blob = encode(&s);
        ferry_core::envelope::assert_every_byte_guarded(&blob, decode);
        let d = decode(&blob).unwrap();
        assert_eq!(d.vcpus.len(), 2);
        assert_eq!(d.workload, s.workload);
        assert_eq!(d.vcpus[1].regs, s.vcpus[1].regs);
        assert_eq!(d.vcpus[1].fpu, s.vcpus[1].fpu);
        assert_eq!(d.vcpus[1].msrs, s.vcpus[1].msrs);
        assert_eq!(d.vcpus[0].dev, s.vcpus[0].dev);
        assert_eq!(d.irqchips.len(), 3);
    }

    #[test]
    fn hostile_blobs_are_errors_not_panics() {
        // A peer can seal anything: the sections inside a valid envelope are hostile too.
        let good = encode(&sample());
        let body = ferry_core::envelope::open("KVM state", MAGIC, STATE_VERSION, &good)
            .unwrap()
            .to_vec();
        let sealed = |b: &[u8]| ferry_core::envelope::seal(MAGIC, STATE_VERSION, b);
        for cut in 0..body.len() {
            let _ = decode(&sealed(&body[..cut]));
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut b = body.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] ^= (x >> 24) as u8 | 1;
            }
            let _ = decode(&sealed(&b));
        }
        assert!(decode(b"FERRYKVM\x01\x00\xff\xff\xff\xff").is_err());
    }
}
