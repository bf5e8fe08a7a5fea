//! Guest RAM: one anonymous mapping registered with KVM as one or more memory slots.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::layout::{slots, PAGE};

/// Guest RAM shared by the vCPUs (through KVM) and the VMM's threads.
pub struct GuestRam {
    /// Memory post-copy: the pages still owed and the service of their faults. Declared
    /// first so it unregisters before the mapping goes.
    postcopy: ferry_uffd::PostcopySlot,
    // Declared early so it stops (and joins) before the mapping goes.
    prefault: std::sync::Mutex<Option<ferry_core::prefault::Prefault>>,
    /// A destination's memory: populated a chunk at a time on its first write, the rest
    /// in the background once the guest runs.
    fresh: Option<ferry_core::prefault::FirstWrite>,
    // Kept alive for `base`; accessed only through raw pointers because the guest writes
    // it concurrently.
    _map: memmap2::MmapMut,
    base: *mut u8,
    bytes: u64,
    slots: Vec<(u64, u64)>,
}

// SAFETY: the mapping lives as long as the struct and all access goes through raw pointers
// with bounds checks. Guest writes and VMM reads race by design, as in every VMM: dirty
// logging makes the migration re-send whatever it read while it changed.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `bytes` of zeroed RAM. `incoming` (a destination about to receive it): each
    /// chunk is populated on its first write, zero pages for untouched chunks cost nothing,
    /// and the rest is populated in the background once the guest runs ([`Self::settle`]);
    /// memory no page reached is never allocated before that, so memory post-copy has
    /// nothing to drop for it.
    pub fn new(bytes: u64, incoming: bool) -> std::io::Result<Self> {
        let len = usize::try_from(bytes).map_err(|_| std::io::Error::other("memory too large"))?;
        let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let base = map.as_mut_ptr();
        Ok(Self {
            postcopy: ferry_uffd::PostcopySlot::default(),
            prefault: std::sync::Mutex::new(None),
            fresh: incoming
                .then(|| ferry_core::prefault::FirstWrite::new(bytes / PAGE, PAGE as usize)),
            _map: map,
            base,
            bytes,
            slots: slots(bytes),
        })
    }

    /// Memory post-copy: the `owed` pages arrive after the vCPUs run; a vCPU (through
    /// KVM) or the VMM touching one waits for it, and the first touch asks `pull`.
    pub fn set_owed(
        &self,
        owed: &ferry_core::bitmap::Bitmap,
        pull: ferry_core::guest::PullPagesFn,
    ) -> Result<(), ferry_uffd::UffdError> {
        // Pages arrive through userfaultfd from now on; a background pre-fault would touch
        // owed pages and demand them all.
        if let Some(f) = &self.fresh {
            f.invalidate();
        }
        drop(
            self.prefault
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        // SAFETY: the mapping is this struct's private anonymous one and outlives the
        // registration (field order); owed pages are only written through `fill_owed`.
        unsafe {
            self.postcopy
                .start(self.base, self.pages(), PAGE as usize, owed, pull)
        }
    }

    /// Memory post-copy: the owed pages, their installation and their faults.
    pub fn postcopy(&self) -> &ferry_uffd::PostcopySlot {
        &self.postcopy
    }

    /// The guest is about to run: no page is assumed untouched any more, and what no page
    /// reached is populated in the background (unless pages are owed: post-copy), so the
    /// guest's first touches there do not each fault.
    pub fn settle(&self) {
        let was_fresh = self
            .fresh
            .as_ref()
            .is_some_and(ferry_core::prefault::FirstWrite::invalidate);
        if !was_fresh || self.postcopy.get().is_some() {
            return;
        }
        // SAFETY: `base..base + bytes` is this struct's private anonymous mapping, and the
        // populator is dropped before it (field order).
        let p = unsafe { ferry_core::prefault::Prefault::start(self.base, self.bytes as usize) };
        *self.prefault.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Pages.
    pub fn pages(&self) -> u64 {
        self.bytes / PAGE
    }

    /// The memory slots `(guest-physical address, size)`.
    pub fn slots(&self) -> &[(u64, u64)] {
        &self.slots
    }

    /// (Re-)registers every slot, with or without dirty logging.
    pub fn register(&self, vm: &VmFd, log_dirty: bool) -> Result<(), kvm_ioctls::Error> {
        for (i, &(gpa, size)) in self.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: self.base as u64 + gpa,
            };
            // SAFETY: the region lies inside this mapping, which outlives the VM: the
            // guest type drops the VM fd before the RAM.
            unsafe { vm.set_user_memory_region(region) }?;
        }
        Ok(())
    }

    /// The whole RAM as a mutable slice, for building a guest before any vCPU exists
    /// (`&mut self`: nothing else can reach the RAM meanwhile).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the range is the whole live mapping, and `&mut self` makes this the only
        // access path for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.bytes as usize) }
    }

    fn range(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let end = gpa.checked_add(len as u64)?;
        // SAFETY: `gpa..end` lies within the mapping (checked just before).
        (end <= self.bytes).then(|| unsafe { self.base.add(gpa as usize) })
    }

    /// Copies guest memory at `gpa` into `buf`; false when out of range.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.range(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: `p..p+len` is inside the mapping; `buf` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` into guest memory at `gpa`; false when out of range. The caller
    /// records the write in the VMM's own dirty log where that matters.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(p) = self.range(gpa, data.len()) else {
            return false;
        };
        if let Some(f) = &self.fresh {
            let last = (gpa + data.len().max(1) as u64 - 1) / PAGE;
            for page in gpa / PAGE..=last {
                // SAFETY: `base` is this struct's mapping of `bytes / PAGE` pages.
                unsafe { f.touch(self.base, page) };
            }
        }
        // SAFETY: `p..p+len` is inside the mapping; `data` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }

    /// Fills `len` bytes at `gpa` with zeros; false when out of range.
    pub fn zero(&self, gpa: u64, len: usize) -> bool {
        let Some(p) = self.range(gpa, len) else {
            return false;
        };
        // A whole page of a chunk no page reached is zero already (never allocated).
        if len as u64 == PAGE
            && gpa.is_multiple_of(PAGE)
            && self.fresh.as_ref().is_some_and(|f| f.untouched(gpa / PAGE))
        {
            return true;
        }
        // SAFETY: `p..p+len` is inside the mapping.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        true
    }

    /// Reads the quadword at `gpa` (0 when out of range).
    pub fn load_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b);
        u64::from_le_bytes(b)
    }
}
