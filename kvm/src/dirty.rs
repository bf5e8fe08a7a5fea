//! KVM dirty-page tracking, two ways: the per-slot bitmap (`KVM_GET_DIRTY_LOG`) or the
//! per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING`), plus the pages the VMM itself wrote
//! into guest memory, which KVM never sees.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use ferry_core::bitmap::{Bitmap, DirtyBitmap};
use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::layout::PAGE;

/// Entries per vCPU dirty ring (16 B each: 256 KiB per vCPU). At the ~40 k faults/s this
/// nested KVM allows under logging, a ring fills in about 0.4 s.
pub const RING_ENTRIES: u32 = 16384;
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;

/// How dirty pages are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// One bitmap per memory slot, fetched and cleared with `KVM_GET_DIRTY_LOG`.
    #[default]
    Bitmap,
    /// One ring of dirty guest frames per vCPU, harvested and reset.
    Ring,
}

impl DirtyMode {
    /// Parses `bitmap` or `ring`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "bitmap" => Ok(Self::Bitmap),
            "ring" => Ok(Self::Ring),
            _ => Err(format!("unknown dirty log {s:?} (use bitmap or ring)")),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::Ring => "ring",
        }
    }
}

/// One vCPU's mapped dirty ring.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// Next entry to harvest (kept across harvests: KVM fills the ring in order).
    next: u32,
}

// SAFETY: the mapping belongs to this struct; entries are accessed only under the
// `DirtyLog::rings` mutex, with atomic access to the flags KVM shares.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd) -> std::io::Result<Self> {
        let len = RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * PAGE as libc::off_t;
        // SAFETY: maps the vCPU fd's dirty ring area as the KVM API documents; the result
        // is checked before use and unmapped in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            entries: p.cast(),
            count: RING_ENTRIES,
            next: 0,
        })
    }

    /// Moves every published entry into `out` (via `gfn_to_page`) and marks it for reset.
    fn harvest(&mut self, mut mark: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.next % self.count) as usize;
            // SAFETY: `i < count`, inside the mapping.
            let e = unsafe { self.entries.add(i) };
            // SAFETY: `flags` is the first field, a naturally aligned u32 KVM publishes
            // with release semantics; read it atomically with acquire.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is published (acquire above), so slot and offset are set.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            mark(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the area mapped in `Ring::map`.
        unsafe { libc::munmap(self.entries.cast(), len) };
    }
}

/// Dirty-page tracking of one guest.
pub struct DirtyLog {
    mode: DirtyMode,
    /// First page of every memory slot.
    slot_pages: Vec<(u64, u64)>,
    /// Pages written by the VMM, pages harvested from a full ring between fetches, and
    /// pages merged back after a failed send.
    extra: DirtyBitmap,
    rings: Mutex<Vec<Ring>>,
}

impl DirtyLog {
    /// Tracking for `slots` (`(gpa, size)`) of a guest of `pages`.
    pub fn new(mode: DirtyMode, slots: &[(u64, u64)], pages: u64) -> Self {
        Self {
            mode,
            slot_pages: slots.iter().map(|&(g, s)| (g / PAGE, s / PAGE)).collect(),
            extra: DirtyBitmap::new(pages),
            rings: Mutex::new(Vec::new()),
        }
    }

    /// The mode.
    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// Ring mode: enables the capability on a VM that has no vCPU yet.
    pub fn prepare_vm(&self, kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> Result<(), String> {
        if self.mode != DirtyMode::Ring {
            return Ok(());
        }
        let max = kvm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing);
        let bytes = RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>();
        if max <= 0 || (max as usize) < bytes {
            return Err(format!(
                "this KVM has no dirty ring of {RING_ENTRIES} entries (KVM_CAP_DIRTY_LOG_RING = {max}); use --dirty-log bitmap"
            ));
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
            args: [bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| format!("enabling the dirty ring: {e}"))
    }

    /// Ring mode: maps a new vCPU's ring.
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<(), String> {
        if self.mode != DirtyMode::Ring {
            return Ok(());
        }
        let ring = Ring::map(vcpu).map_err(|e| format!("mapping the dirty ring: {e}"))?;
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ring);
        Ok(())
    }

    /// Records a page the VMM wrote into guest memory.
    pub fn mark_vmm_write(&self, page: u64) {
        if page < self.extra.len() {
            self.extra.set(page);
        }
    }

    /// Forgets everything logged so far (logging just (re)started).
    pub fn reset(&self, vm: &VmFd) {
        let _ = self.fetch(vm);
        self.extra.clear();
    }

    /// Ring mode: harvests every ring into the pending set and lets KVM reuse the entries
    /// (called by a vCPU whose ring is full, and by [`DirtyLog::fetch`]).
    pub fn harvest_rings(&self, vm: &VmFd) -> u64 {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0u64;
        for r in rings.iter_mut() {
            n += u64::from(r.harvest(|slot, offset| {
                // The low 16 bits name the slot (the high ones the address space: 0).
                if let Some(&(first, pages)) = self.slot_pages.get((slot & 0xffff) as usize) {
                    if offset < pages {
                        self.extra.set(first + offset);
                    }
                }
            }));
        }
        if n > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is a live VM fd.
            unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
        }
        n
    }

    /// Fetch-and-clear of everything dirtied since the last fetch.
    pub fn fetch(&self, vm: &VmFd) -> Result<Bitmap, kvm_ioctls::Error> {
        let mut out = Bitmap::new(self.extra.len());
        match self.mode {
            DirtyMode::Bitmap => {
                for (slot, &(first, pages)) in self.slot_pages.iter().enumerate() {
                    let words = vm.get_dirty_log(slot as u32, (pages * PAGE) as usize)?;
                    for (w, &word) in words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let b = bits.trailing_zeros() as u64;
                            bits &= bits - 1;
                            let page = first + w as u64 * 64 + b;
                            if page < out.len() {
                                out.set(page);
                            }
                        }
                    }
                }
            }
            DirtyMode::Ring => {
                self.harvest_rings(vm);
            }
        }
        out.merge(&self.extra.take());
        Ok(out)
    }

    /// Puts bits back after a failed send.
    pub fn merge_back(&self, pages: &Bitmap) {
        self.extra.merge(pages);
    }
}
