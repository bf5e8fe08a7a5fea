//! Guest-physical layout of a Ferry KVM guest, and the boot structures the VMM writes:
//! an identity map, a GDT with ring-3 segments, a TSS, the workload code.
//!
//! ```text
//! 0x0000_1000  PML4            0x0000_2000  PDPT (512 GiB reach)
//! 0x0000_8000  GDT             0x0000_9000  TSS
//! 0x0001_0000  workload code   0x0002_0000  one I/O page per vCPU (block buffer)
//! 0x0010_0000  page directories, one per GiB (2 MiB pages, user-accessible)
//! 0x0020_0000  the workload's pages, split between the vCPUs
//! ```

use kvm_bindings::kvm_segment;

/// Page size of guest memory.
pub const PAGE: u64 = 4096;
pub(crate) const PML4: u64 = 0x1000;
pub(crate) const PDPT: u64 = 0x2000;
pub(crate) const GDT: u64 = 0x8000;
pub(crate) const TSS: u64 = 0x9000;
pub(crate) const CODE: u64 = 0x10000;
const CODE_END: u64 = 0x20000;
pub(crate) const IO_PAGES: u64 = 0x20000;
const PDS: u64 = 0x100000;
/// Where the workload's pages start.
pub const WORK: u64 = 0x200000;
/// The smallest guest: the boot area plus 2 MiB of workload pages.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The largest guest the page directories at `PDS` can map.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Most vCPUs (one I/O page each between `IO_PAGES` and `PDS`).
pub const MAX_VCPUS: usize = 64;
/// Largest memory slot: bigger guests get several, as a VMM with RAM split around holes.
pub const SLOT_MAX: u64 = 1 << 30;

/// The ring-3 code and data selectors (GDT entries 3 and 4, RPL 3).
const USER_CS: u16 = 0x18 | 3;
const USER_DS: u16 = 0x20 | 3;

/// The I/O page of vCPU `v`.
pub fn io_page(v: usize) -> u64 {
    IO_PAGES + v as u64 * PAGE
}

/// Memory slots `(guest-physical address, size)` for a guest of `bytes`.
pub fn slots(bytes: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes {
        let size = SLOT_MAX.min(bytes - at);
        out.push((at, size));
        at += size;
    }
    out
}

/// Checks a memory size.
pub fn check_memory(bytes: u64) -> Result<(), String> {
    if !bytes.is_multiple_of(PAGE) {
        return Err(format!("{bytes} bytes is not a multiple of 4 KiB"));
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(format!(
            "{} MiB is outside {} MiB..{} GiB for a KVM guest",
            bytes >> 20,
            MIN_MEMORY >> 20,
            MAX_MEMORY >> 30
        ));
    }
    Ok(())
}

/// One vCPU's share of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Partition {
    /// First page (index, not address).
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Visiting stride (coprime with `pages`).
    pub stride: u64,
    /// First block of the disk.
    pub first_block: u64,
    /// Blocks (0: no disk writes).
    pub blocks: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Splits the workload pages of a `bytes` guest and `blocks` disk blocks between `vcpus`;
/// `scatter` visits pages in a scrambled order (a stride near n/φ, coprime with n).
pub fn partitions(bytes: u64, blocks: u64, vcpus: usize, scatter: bool) -> Vec<Partition> {
    let work = (bytes - WORK) / PAGE;
    let n = vcpus.max(1) as u64;
    (0..n)
        .map(|v| {
            let pages = work / n + if v == n - 1 { work % n } else { 0 };
            let mut stride = 1;
            if scatter && pages > 2 {
                stride = (pages as f64 * 0.618_034) as u64;
                while stride > 1 && gcd(stride, pages) != 1 {
                    stride -= 1;
                }
                stride = stride.max(1);
            }
            let per = blocks / n;
            Partition {
                first_page: WORK / PAGE + v * (work / n),
                pages,
                stride,
                first_block: v * per,
                blocks: per + if v == n - 1 { blocks % n } else { 0 },
            }
        })
        .collect()
}

impl Partition {
    /// The page visited at `step` of a pass.
    pub fn page_at(&self, step: u64) -> u64 {
        self.first_page
            + ((u128::from(step) * u128::from(self.stride)) % u128::from(self.pages)) as u64
    }
}

fn put(mem: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes the page tables, GDT and workload code into fresh guest memory.
pub fn write_boot(mem: &mut [u8], code: &[u8]) -> Result<(), String> {
    if code.len() as u64 > CODE_END - CODE {
        return Err(format!("workload of {} bytes does not fit", code.len()));
    }
    let bytes = mem.len() as u64;
    let gibs = bytes.div_ceil(1 << 30);
    put(mem, PML4, PDPT | 0x7);
    for i in 0..gibs {
        let pd = PDS + i * PAGE;
        put(mem, PDPT + i * 8, pd | 0x7);
        for j in 0..512u64 {
            // Present, writable, user, 2 MiB page.
            put(mem, pd + j * 8, ((i * 512 + j) << 21) | 0x87);
        }
    }
    // Null, ring-0 code and data (unused), ring-3 code (L=1), ring-3 data.
    let gdt = [
        0u64,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        put(mem, GDT + i as u64 * 8, *e);
    }
    mem[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);
    Ok(())
}

/// GDT limit: five descriptors plus the 16-byte TSS descriptor slot.
pub(crate) const GDT_LIMIT: u16 = 5 * 8 + 16 - 1;

fn seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode entered directly at CPL 3: ring-0 code would be emulated on this nested KVM.
pub(crate) fn long_mode_sregs(sregs: &mut kvm_bindings::kvm_sregs) {
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LME | LMA
    sregs.gdt.base = GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.cs = seg(USER_CS, true);
    let data = seg(USER_DS, false);
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
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_every_page_once_and_strides_visit_all() {
        for &(bytes, vcpus) in &[(4u64 << 20, 1usize), (6 << 20, 3), (64 << 20, 4)] {
            let parts = partitions(bytes, 1000, vcpus, true);
            let total: u64 = parts.iter().map(|p| p.pages).sum();
            assert_eq!(total, (bytes - WORK) / PAGE);
            assert_eq!(parts.iter().map(|p| p.blocks).sum::<u64>(), 1000);
            for p in &parts {
                let mut seen = vec![false; p.pages as usize];
                for s in 0..p.pages {
                    let i = (p.page_at(s) - p.first_page) as usize;
                    assert!(!seen[i], "page visited twice");
                    seen[i] = true;
                }
            }
        }
    }

    #[test]
    fn slots_split_at_one_gib() {
        assert_eq!(slots(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(slots((2 << 30) + 4096).len(), 3);
    }
}
