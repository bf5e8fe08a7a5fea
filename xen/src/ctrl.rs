//! A safe wrapper over the few libxenctrl and libxenforeignmemory calls Ferry needs.
//!
//! Every call returns a typed error naming the call and the domain; pointers handed to
//! the libraries point into buffers this module owns for the call's duration.

use std::ffi::c_void;
use std::sync::Arc;

use xenctrl_sys as xc;

use crate::XenError;

// Not in xenctrl-sys 0.2's bindings: declared from Xen 4.17's libraries.
#[link(name = "xenforeignmemory")]
unsafe extern "C" {
    fn xenforeignmemory_map(
        fmem: *mut xc::xenforeignmemory_handle,
        dom: u32,
        prot: libc::c_int,
        pages: usize,
        arr: *const xc::xen_pfn_t,
        err: *mut libc::c_int,
    ) -> *mut c_void;
    fn xenforeignmemory_unmap(
        fmem: *mut xc::xenforeignmemory_handle,
        addr: *mut c_void,
        pages: usize,
    ) -> libc::c_int;
}

#[link(name = "xenguest")]
unsafe extern "C" {
    fn xc_domain_resume(xch: *mut xc::xc_interface, domid: u32, fast: libc::c_int) -> libc::c_int;
}

unsafe extern "C" {
    fn xc_get_pfn_type_batch(
        xch: *mut xc::xc_interface,
        dom: u32,
        num: libc::c_uint,
        arr: *mut xc::xen_pfn_t,
    ) -> libc::c_int;
}

/// Page size of x86 Xen guests.
pub const PAGE: usize = 4096;
/// The type of a gfn with nothing behind it (a hole, or Xen's own).
pub const PFN_XTAB: u64 = xc::XEN_DOMCTL_PFINFO_XTAB as u64;
const PFN_TYPE_MASK: u64 = xc::XEN_DOMCTL_PFINFO_LTAB_MASK as u64;

fn os(call: &'static str, dom: u32) -> XenError {
    XenError::Call {
        call,
        dom,
        source: std::io::Error::last_os_error(),
    }
}

/// What Ferry needs to know of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomInfo {
    /// Domain id.
    pub domid: u32,
    /// HVM or PVH (hardware-assisted paging: log-dirty works on Debian's Xen).
    pub hvm: bool,
    /// Paused by the toolstack or us.
    pub paused: bool,
    /// Shut down (reason in `shutdown_reason`).
    pub shutdown: bool,
    /// Being destroyed.
    pub dying: bool,
    /// Why, when shut down (2 = suspend).
    pub shutdown_reason: u32,
    /// Pages the domain holds.
    pub nr_pages: u64,
    /// Highest vCPU id.
    pub max_vcpu_id: u32,
}

fn dom_info(i: &xc::xc_dominfo_t) -> DomInfo {
    DomInfo {
        domid: i.domid,
        hvm: i.hvm() != 0,
        paused: i.paused() != 0,
        shutdown: i.shutdown() != 0,
        dying: i.dying() != 0,
        shutdown_reason: i.shutdown_reason,
        nr_pages: i.nr_pages,
        max_vcpu_id: i.max_vcpu_id,
    }
}

/// An open control interface (and its foreign-memory handle).
pub struct Xc {
    xch: *mut xc::xc_interface,
}

// SAFETY: libxenctrl handles opened without XC_OPENFLAG_NON_REENTRANT may be used from
// several threads (the library locks internally); the foreign-memory handle likewise.
unsafe impl Send for Xc {}
// SAFETY: see `Send`.
unsafe impl Sync for Xc {}

impl Xc {
    /// Opens `/dev/xen/privcmd` through libxenctrl (dom0, root).
    pub fn open() -> Result<Self, XenError> {
        // SAFETY: null loggers select libxenctrl's default; flags 0.
        let xch = unsafe { xc::xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if xch.is_null() {
            return Err(XenError::Unavailable(format!(
                "xc_interface_open: {} (run in dom0 as root, with the privcmd driver loaded)",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { xch })
    }

    /// Every domain but dom0 (at most 256).
    pub fn domains(&self) -> Result<Vec<DomInfo>, XenError> {
        let mut all = vec![xc::xc_dominfo_t::default(); 256];
        // SAFETY: `all` holds room for the 256 entries asked for.
        let n = unsafe { xc::xc_domain_getinfo(self.xch, 1, all.len() as u32, all.as_mut_ptr()) };
        if n < 0 {
            return Err(os("xc_domain_getinfo", 1));
        }
        Ok(all[..n as usize].iter().map(dom_info).collect())
    }

    /// The domain's info.
    pub fn info(&self, dom: u32) -> Result<DomInfo, XenError> {
        let mut i = xc::xc_dominfo_t::default();
        // SAFETY: one `xc_dominfo_t` for one domain.
        let n = unsafe { xc::xc_domain_getinfo(self.xch, dom, 1, &mut i) };
        if n != 1 || i.domid != dom {
            return Err(XenError::NoDomain(dom.to_string()));
        }
        Ok(dom_info(&i))
    }

    /// The highest gfn the domain has.
    pub fn max_gpfn(&self, dom: u32) -> Result<u64, XenError> {
        let mut g: xc::xen_pfn_t = 0;
        // SAFETY: one out value.
        if unsafe { xc::xc_domain_maximum_gpfn(self.xch, dom, &mut g) } < 0 {
            return Err(os("xc_domain_maximum_gpfn", dom));
        }
        Ok(g)
    }

    /// The type of every gfn in `gfns` (`PFN_XTAB`: nothing there).
    pub fn pfn_types(&self, dom: u32, gfns: &[u64]) -> Result<Vec<u64>, XenError> {
        let mut out = Vec::with_capacity(gfns.len());
        for chunk in gfns.chunks(1024) {
            let mut arr: Vec<xc::xen_pfn_t> = chunk.to_vec();
            // SAFETY: `arr` holds `len` entries, rewritten in place with their types.
            let r = unsafe {
                xc_get_pfn_type_batch(self.xch, dom, arr.len() as libc::c_uint, arr.as_mut_ptr())
            };
            if r != 0 {
                return Err(os("xc_get_pfn_type_batch", dom));
            }
            out.extend(arr.iter().map(|t| t & PFN_TYPE_MASK));
        }
        Ok(out)
    }

    fn shadow(&self, dom: u32, op: u32, call: &'static str) -> Result<(), XenError> {
        // SAFETY: no bitmap in 4.17's xc_shadow_control; `mb` may be null.
        if unsafe { xc::xc_shadow_control(self.xch, dom, op, std::ptr::null_mut(), 0) } < 0 {
            return Err(os(call, dom));
        }
        Ok(())
    }

    /// Turns log-dirty mode on (PVH/HVM: hardware-assisted paging).
    pub fn logdirty_on(&self, dom: u32) -> Result<(), XenError> {
        self.shadow(
            dom,
            xc::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
            "ENABLE_LOGDIRTY",
        )
    }

    /// Turns log-dirty mode off.
    pub fn logdirty_off(&self, dom: u32) -> Result<(), XenError> {
        self.shadow(dom, xc::XEN_DOMCTL_SHADOW_OP_OFF, "SHADOW_OP_OFF")
    }

    /// The dirty bitmap of gfns `0..pages`: `clean` fetches and clears (CLEAN), otherwise
    /// only looks (PEEK). Returns 64-bit words, bit `g` = gfn `g`.
    pub fn dirty_bitmap(&self, dom: u32, pages: u64, clean: bool) -> Result<Vec<u64>, XenError> {
        let bytes = pages.div_ceil(8) as usize;
        let nr = bytes.div_ceil(PAGE).max(1);
        let mut hb = xc::xc_hypercall_buffer_t {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            ubuf: std::ptr::null_mut(),
            sz: 0,
        };
        // SAFETY: allocates `nr` hypercall-safe pages owned by `hb`, freed below.
        let p = unsafe { xc::xc__hypercall_buffer_alloc_pages(self.xch, &mut hb, nr as i32) };
        if p.is_null() {
            return Err(os("xc_hypercall_buffer_alloc_pages", dom));
        }
        let op = if clean {
            xc::XEN_DOMCTL_SHADOW_OP_CLEAN
        } else {
            xc::XEN_DOMCTL_SHADOW_OP_PEEK
        };
        // SAFETY: the buffer holds `nr` pages ≥ `pages` bits; stats may be null.
        let r = unsafe {
            xc::xc_logdirty_control(
                self.xch,
                dom,
                op,
                &mut hb,
                pages as libc::c_ulong,
                0,
                std::ptr::null_mut(),
            )
        };
        let result = if r < 0 {
            Err(os(
                if clean {
                    "logdirty CLEAN"
                } else {
                    "logdirty PEEK"
                },
                dom,
            ))
        } else {
            let mut words = vec![0u64; bytes.div_ceil(8)];
            // SAFETY: `p` holds at least `bytes` bytes (`nr` pages), `words` as many.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.cast::<u8>(),
                    words.as_mut_ptr().cast::<u8>(),
                    bytes,
                )
            };
            Ok(words)
        };
        // SAFETY: frees exactly what was allocated above.
        unsafe { xc::xc__hypercall_buffer_free_pages(self.xch, &mut hb, nr as i32) };
        result
    }

    /// Maps `gfns` of `dom` (read-only unless `write`); gfns that cannot be mapped are
    /// reported per page in the mapping's `errors`.
    pub fn map(self: &Arc<Self>, dom: u32, gfns: &[u64], write: bool) -> Result<Mapping, XenError> {
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let mut errors = vec![0 as libc::c_int; gfns.len()];
        // SAFETY: the handle belongs to `xch`, which outlives the mapping (borrowed).
        let fmem = unsafe { xc::xc_interface_fmem_handle(self.xch) };
        // SAFETY: `gfns` and `errors` hold `len` entries each.
        let addr = unsafe {
            xenforeignmemory_map(
                fmem,
                dom,
                prot,
                gfns.len(),
                gfns.as_ptr(),
                errors.as_mut_ptr(),
            )
        };
        if addr.is_null() {
            return Err(os("xenforeignmemory_map", dom));
        }
        Ok(Mapping {
            xc: Arc::clone(self),
            addr: addr.cast(),
            pages: gfns.len(),
            errors,
        })
    }

    /// Gives `dom` pages at `gfns` (where a target lacks RAM the source has).
    pub fn populate(&self, dom: u32, gfns: &[u64]) -> Result<(), XenError> {
        let mut arr: Vec<xc::xen_pfn_t> = gfns.to_vec();
        // SAFETY: `arr` holds `len` extents of order 0.
        let r = unsafe {
            xc::xc_domain_populate_physmap_exact(
                self.xch,
                dom,
                arr.len() as libc::c_ulong,
                0,
                0,
                arr.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(os("xc_domain_populate_physmap_exact", dom));
        }
        Ok(())
    }

    /// Pauses the domain.
    pub fn pause(&self, dom: u32) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        if unsafe { xc::xc_domain_pause(self.xch, dom) } != 0 {
            return Err(os("xc_domain_pause", dom));
        }
        Ok(())
    }

    /// Unpauses the domain.
    pub fn unpause(&self, dom: u32) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        if unsafe { xc::xc_domain_unpause(self.xch, dom) } != 0 {
            return Err(os("xc_domain_unpause", dom));
        }
        Ok(())
    }

    /// Resumes a domain that suspended itself, in place (`fast`: the guest sees its
    /// suspend cancelled and carries on with its devices as they were).
    pub fn resume_suspended(&self, dom: u32) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        if unsafe { xc_domain_resume(self.xch, dom, 1) } != 0 {
            return Err(os("xc_domain_resume", dom));
        }
        Ok(())
    }

    /// Destroys the domain.
    pub fn destroy(&self, dom: u32) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        if unsafe { xc::xc_domain_destroy(self.xch, dom) } != 0 {
            return Err(os("xc_domain_destroy", dom));
        }
        Ok(())
    }

    /// The HVM context (all vCPUs and the platform devices), as Xen's save records.
    pub fn hvm_context(&self, dom: u32) -> Result<Vec<u8>, XenError> {
        // SAFETY: a null buffer asks for the size.
        let size = unsafe { xc::xc_domain_hvm_getcontext(self.xch, dom, std::ptr::null_mut(), 0) };
        if size <= 0 {
            return Err(os("xc_domain_hvm_getcontext (size)", dom));
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` holds `size` bytes.
        let n =
            unsafe { xc::xc_domain_hvm_getcontext(self.xch, dom, buf.as_mut_ptr(), size as u32) };
        if n < 0 {
            return Err(os("xc_domain_hvm_getcontext", dom));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Loads an HVM context (Xen checks every record).
    pub fn set_hvm_context(&self, dom: u32, ctx: &[u8]) -> Result<(), XenError> {
        let mut buf = ctx.to_vec();
        // SAFETY: `buf` holds `len` bytes; Xen only reads it.
        if unsafe {
            xc::xc_domain_hvm_setcontext(self.xch, dom, buf.as_mut_ptr(), buf.len() as u32)
        } != 0
        {
            return Err(os("xc_domain_hvm_setcontext", dom));
        }
        Ok(())
    }

    /// Reads an HVM param.
    pub fn hvm_param(&self, dom: u32, param: u32) -> Result<u64, XenError> {
        let mut v = 0u64;
        // SAFETY: one out value.
        if unsafe { xc::xc_hvm_param_get(self.xch, dom, param, &mut v) } != 0 {
            return Err(os("xc_hvm_param_get", dom));
        }
        Ok(v)
    }

    /// Sets an HVM param.
    pub fn set_hvm_param(&self, dom: u32, param: u32, v: u64) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        if unsafe { xc::xc_hvm_param_set(self.xch, dom, param, v) } != 0 {
            return Err(os("xc_hvm_param_set", dom));
        }
        Ok(())
    }

    /// The TSC mode, elapsed time, frequency and incarnation.
    pub fn tsc_info(&self, dom: u32) -> Result<[u64; 4], XenError> {
        let (mut mode, mut nsec, mut khz, mut inc) = (0u32, 0u64, 0u32, 0u32);
        // SAFETY: four out values.
        if unsafe {
            xc::xc_domain_get_tsc_info(self.xch, dom, &mut mode, &mut nsec, &mut khz, &mut inc)
        } != 0
        {
            return Err(os("xc_domain_get_tsc_info", dom));
        }
        Ok([u64::from(mode), nsec, u64::from(khz), u64::from(inc)])
    }

    /// Sets what [`Xc::tsc_info`] read on the source.
    pub fn set_tsc_info(&self, dom: u32, t: [u64; 4]) -> Result<(), XenError> {
        // SAFETY: plain call on an open handle.
        let r = unsafe {
            xc::xc_domain_set_tsc_info(self.xch, dom, t[0] as u32, t[1], t[2] as u32, t[3] as u32)
        };
        if r != 0 {
            return Err(os("xc_domain_set_tsc_info", dom));
        }
        Ok(())
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: closes the handle opened in `open`; every mapping holds an `Arc` of
        // `self`, so none is left.
        unsafe { xc::xc_interface_close(self.xch) };
    }
}

/// Foreign pages mapped into this process (keeping the interface open while they are).
pub struct Mapping {
    xc: Arc<Xc>,
    addr: *mut u8,
    pages: usize,
    /// Per page: 0, or the errno that kept it from being mapped.
    pub errors: Vec<libc::c_int>,
}

// SAFETY: the mapping is plain memory; access goes through bounds-checked copies.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Copies page `i` of the mapping into `buf` (one page); false if it is not mapped.
    pub fn read(&self, i: usize, buf: &mut [u8]) -> bool {
        if i >= self.pages || self.errors[i] != 0 || buf.len() != PAGE {
            return false;
        }
        // SAFETY: page `i` lies inside the mapping and was mapped (no error).
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(i * PAGE), buf.as_mut_ptr(), PAGE) };
        true
    }

    /// Copies `data` (one page) into page `i`; false if it is not mapped.
    pub fn write(&self, i: usize, data: &[u8]) -> bool {
        if i >= self.pages || self.errors[i] != 0 || data.len() != PAGE {
            return false;
        }
        // SAFETY: page `i` lies inside a writable mapping and was mapped (no error).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(i * PAGE), PAGE) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `Xc::map` mapped, with the same handle.
        unsafe {
            let fmem = xc::xc_interface_fmem_handle(self.xc.xch);
            xenforeignmemory_unmap(fmem, self.addr.cast(), self.pages);
        }
    }
}
