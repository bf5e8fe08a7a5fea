//! Creating the VM, its memory and the vCPU's long-mode state.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest-physical layout (identity mapped).
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000; // 4 PDs for 4 GiB of 2 MiB pages: 0x3000..0x7000
const GDT: u64 = 0x8000;
const TSS: u64 = 0x9000;
const CODE: u64 = 0x10000;
const STACK_TOP: u64 = 0x80000;
/// Where the workload's pages start.
pub const WORK: u64 = 0x200000;

/// A VM error.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn fail(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM with one vCPU running the workload over `pages` pages.
pub struct Vm {
    /// The KVM VM.
    pub vm: VmFd,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Guest memory.
    pub mem: memmap2::MmapMut,
}

fn seg(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Vm {
    /// Creates a VM of `memory` bytes running the workload over the pages from [`WORK`].
    pub fn new(memory: usize) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(fail("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(fail("creating a VM"))?;
        let mut mem = memmap2::MmapMut::map_anon(memory)
            .map_err(|e| VmError::Other(format!("mapping guest memory: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory as u64,
            userspace_addr: mem.as_mut_ptr() as u64,
        };
        // SAFETY: the region maps `mem`, which lives as long as the VM (both in `Vm`).
        unsafe { vm.set_user_memory_region(region) }.map_err(fail("mapping memory"))?;
        let put = |mem: &mut memmap2::MmapMut, at: u64, v: u64| {
            mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        };
        // Identity map of 4 GiB in 2 MiB pages, user-accessible (U/S) and writable.
        put(&mut mem, PML4, PDPT | 0x7);
        for i in 0..4u64 {
            put(&mut mem, PDPT + i * 8, (PD + i * 0x1000) | 0x7);
            for j in 0..512u64 {
                put(
                    &mut mem,
                    PD + i * 0x1000 + j * 8,
                    ((i * 512 + j) << 21) | 0x87,
                );
            }
        }
        // GDT: null, ring-0 code/data (unused), ring-3 code, ring-3 data, TSS (16 bytes).
        let gdt = [
            0u64,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
        ];
        for (i, e) in gdt.iter().enumerate() {
            put(&mut mem, GDT + i as u64 * 8, *e);
        }
        mem[CODE as usize..CODE as usize + crate::WORKLOAD.len()].copy_from_slice(crate::WORKLOAD);
        let vcpu = vm.create_vcpu(0).map_err(fail("creating a vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(fail("reading CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(fail("setting CPUID"))?;
        let mut sregs = vcpu.get_sregs().map_err(fail("reading sregs"))?;
        sregs.cr3 = PML4;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
        sregs.cr0 = 0x8005_0033;
        sregs.efer = 0x500; // LME | LMA
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (gdt.len() * 8 + 16 - 1) as u16;
        sregs.cs = seg(0x18 | 3, 3, true);
        let data = seg(0x20 | 3, 3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.ss = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        vcpu.set_sregs(&sregs).map_err(fail("setting sregs"))?;
        let mut fpu = vcpu.get_fpu().map_err(fail("reading the FPU"))?;
        fpu.fcw = 0x37f;
        fpu.mxcsr = 0x1f80;
        vcpu.set_fpu(&fpu).map_err(fail("setting the FPU"))?;
        let mut regs = vcpu.get_regs().map_err(fail("reading regs"))?;
        regs.rip = CODE;
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2 | (3 << 12); // IOPL 3: OUT from ring 3
        regs.rdi = WORK;
        regs.rsi = ((memory as u64).saturating_sub(WORK)) / 4096;
        vcpu.set_regs(&regs).map_err(fail("setting regs"))?;
        Ok(Self { vm, vcpu, mem })
    }

    /// Runs until the workload has reported `passes` passes; returns the last pass number.
    pub fn run_passes(&mut self, passes: u32) -> Result<u32, VmError> {
        loop {
            match self.vcpu.run().map_err(fail("running the vCPU"))? {
                VcpuExit::IoOut(0x10, data) => {
                    let mut b = [0u8; 4];
                    b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    let pass = u32::from_le_bytes(b);
                    if pass >= passes {
                        return Ok(pass);
                    }
                }
                other => return Err(VmError::Other(format!("unexpected exit {other:?}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_runs_in_ring_3_and_advances_every_page() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no /dev/kvm");
            return;
        }
        let mut vm = Vm::new(16 << 20).unwrap();
        assert_eq!(vm.run_passes(3).unwrap(), 3);
        let pages = ((16u64 << 20) - WORK) / 4096;
        for p in 0..pages {
            let at = (WORK + p * 4096) as usize;
            let v = u64::from_le_bytes(vm.mem[at..at + 8].try_into().unwrap());
            assert_eq!(v, 3, "page {p}");
        }
    }
}
