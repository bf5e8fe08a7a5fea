//! A Xen domain as the engine's source or destination guest.
//!
//! Pages are the domain's RAM gfns in ascending order (holes, Xen's own pages and the
//! special pages below 4 GiB — xenstore and console rings, ioreq pages — are not
//! carried: the destination domain, created by the toolstack from the same configuration,
//! has its own, already connected to its xenstored and xenconsoled). Both sides derive
//! the same list from their domain's physmap; the state blob carries a digest of it and
//! the destination refuses a list that differs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use ferry_core::bitmap::Bitmap;
use ferry_core::guest::{DestGuest, GuestError, GuestLayout, SourceGuest, StateBlob};

use crate::ctrl::{Mapping, Xc, PAGE, PFN_XTAB};
use crate::state::{self, XenState, STATE_VERSION};
use crate::{XenError, BACKEND};

/// First and last gfn of the special pages libxl puts below 4 GiB.
const SPECIAL: std::ops::RangeInclusive<u64> = 0xfeff0..=0xfefff;
/// Gfns mapped per foreign mapping.
const WINDOW: u64 = 256;
/// Mappings kept (WINDOW pages each): 64 MiB of guest memory.
const MAX_WINDOWS: usize = 64;
/// HVM params carried with the context (those libxenguest's HVM stream carries that a
/// freshly created domain of the same configuration may not already have).
const PARAMS: [u32; 4] = [
    xenctrl_sys::HVM_PARAM_IDENT_PT,
    xenctrl_sys::HVM_PARAM_VM86_TSS_SIZED,
    xenctrl_sys::HVM_PARAM_TIMER_MODE,
    xenctrl_sys::HVM_PARAM_VIRIDIAN,
];

fn gerr(e: XenError) -> GuestError {
    match e {
        XenError::Call { call, dom, source } => GuestError::Io {
            what: format!("{call} (domain {dom})"),
            source,
        },
        e => GuestError::Unsupported(e.to_string()),
    }
}

/// The gfns a migration carries, in order: the domain's RAM ranges (see [`MemMap::scan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemMap {
    /// Page index → gfn.
    pub gfns: Vec<u64>,
}

impl MemMap {
    /// Scans the physmap of `dom` for RAM: below the special pages, and above 4 GiB when
    /// the domain reaches there. Long holes stop the low scan once the pages found account
    /// for the domain's memory (scanning a million gfns costs seconds under TCG). The
    /// result is every gfn from 0 (and from 4 GiB) to the last RAM gfn found.
    pub fn scan(xc: &Xc, dom: u32) -> Result<Self, XenError> {
        let info = xc.info(dom)?;
        let max = xc.max_gpfn(dom)?;
        let mut gfns = Vec::new();
        let mut scan = |from: u64, to: u64, stop_early: bool| -> Result<(), XenError> {
            let mut g = from;
            let mut empty_chunks = 0;
            while g < to {
                let end = (g + 1024).min(to);
                let chunk: Vec<u64> = (g..end).collect();
                let types = xc.pfn_types(dom, &chunk)?;
                let before = gfns.len();
                gfns.extend(
                    chunk
                        .iter()
                        .zip(&types)
                        .filter(|(_, t)| **t != PFN_XTAB)
                        .map(|(g, _)| *g),
                );
                empty_chunks = if gfns.len() == before {
                    empty_chunks + 1
                } else {
                    0
                };
                // Allow for the special pages and a few more that nr_pages counts.
                if stop_early && empty_chunks >= 4 && gfns.len() as u64 + 64 >= info.nr_pages {
                    break;
                }
                g = end;
            }
            Ok(())
        };
        scan(0, (max + 1).min(*SPECIAL.start()), true)?;
        if max >= 1 << 20 {
            scan(1 << 20, max + 1, false)?;
        }
        if gfns.is_empty() {
            return Err(XenError::NoDomain(format!("{dom} has no RAM")));
        }
        // Carry whole ranges, from 0 (and from 4 GiB) to the last RAM gfn: a running guest
        // may have swapped a RAM page for something Xen maps (Linux puts shared_info
        // there), which its freshly created target still has as RAM. Such gfns read as
        // zero on the source.
        let low_end = gfns
            .iter()
            .filter(|g| **g < 1 << 20)
            .max()
            .map_or(0, |g| g + 1);
        let high_end = gfns.iter().filter(|g| **g >= 1 << 20).max().map(|g| g + 1);
        let mut all: Vec<u64> = (0..low_end).collect();
        if let Some(end) = high_end {
            all.extend(1 << 20..end);
        }
        Ok(Self { gfns: all })
    }

    /// A digest of the list (both sides must have the same).
    pub fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for g in &self.gfns {
            h ^= *g;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// The mappings of windows of `WINDOW` pages, oldest evicted first.
struct Windows {
    write: bool,
    map: HashMap<u64, Arc<Mapping>>,
    order: VecDeque<u64>,
}

/// A Xen domain, source or destination.
pub struct XenGuest {
    xc: Arc<Xc>,
    dom: u32,
    mem: MemMap,
    /// gfn → page index (u32::MAX: not carried).
    index_of: Vec<u32>,
    windows: Mutex<Windows>,
    /// Bits merged back after a failed send.
    pending: Mutex<Option<Bitmap>>,
    /// The destination domain is destroyed when discarded.
    destroy_on_discard: bool,
    /// How the source is stopped for the last copy.
    stop: StopMode,
}

/// How a source domain is stopped for the last copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `xc_domain_pause`: enough for a guest without PV devices (all its state is in
    /// memory and the HVM context).
    Pause,
    /// Ask the guest to suspend itself (xenstore `control/shutdown = suspend`) and wait
    /// until it has: a guest with PV devices (a Linux PVH guest) then reconnects its rings
    /// and event channels when it finds itself resumed in a new domain, as after Xen's own
    /// migration. Chosen when the guest advertises `control/feature-suspend`.
    Suspend,
}

impl StopMode {
    /// Parses `pause`, `suspend` or `auto` (`None`).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "auto" => Ok(None),
            "pause" => Ok(Some(Self::Pause)),
            "suspend" => Ok(Some(Self::Suspend)),
            _ => Err(format!(
                "unknown stop mode {s:?} (use auto, pause or suspend)"
            )),
        }
    }
}

/// SHUTDOWN_suspend in Xen's sched.h.
const SHUTDOWN_SUSPEND: u32 = 2;
/// How long a guest may take to suspend itself.
const SUSPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn xenstore(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl XenGuest {
    fn new(xc: Arc<Xc>, dom: u32, write: bool) -> Result<Self, XenError> {
        let info = xc.info(dom)?;
        if !info.hvm {
            return Err(XenError::Unsupported(format!(
                "domain {dom} is PV: log-dirty needs shadow paging, which Debian's Xen lacks; use a PVH or HVM guest"
            )));
        }
        let mem = MemMap::scan(&xc, dom)?;
        let top = mem.gfns.last().copied().unwrap_or(0);
        let mut index_of = vec![u32::MAX; top as usize + 1];
        for (i, g) in mem.gfns.iter().enumerate() {
            index_of[*g as usize] = i as u32;
        }
        Ok(Self {
            xc,
            dom,
            mem,
            index_of,
            windows: Mutex::new(Windows {
                write,
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            pending: Mutex::new(None),
            destroy_on_discard: write,
            stop: StopMode::Pause,
        })
    }

    /// A running domain to migrate away.
    /// `stop`: how to stop it for the last copy; `None` chooses [`StopMode::Suspend`]
    /// when the guest advertises `control/feature-suspend` (Linux does at boot; not again
    /// after a migration by another tool), [`StopMode::Pause`] otherwise.
    pub fn source(dom: u32, stop: Option<StopMode>) -> Result<Self, XenError> {
        let mut g = Self::new(Arc::new(Xc::open()?), dom, false)?;
        g.stop = stop.unwrap_or_else(|| {
            let feature = format!("/local/domain/{dom}/control/feature-suspend");
            if xenstore(&["xenstore-read", &feature]).as_deref() == Some("1") {
                StopMode::Suspend
            } else {
                StopMode::Pause
            }
        });
        Ok(g)
    }

    /// How the source will be stopped for the last copy.
    pub fn stop_mode(&self) -> StopMode {
        self.stop
    }

    /// Asks the guest to suspend itself and waits until Xen reports it suspended.
    fn suspend(&self) -> Result<(), XenError> {
        let node = format!("/local/domain/{}/control/shutdown", self.dom);
        if xenstore(&["xenstore-write", &node, "suspend"]).is_none() {
            return Err(XenError::Unavailable(format!(
                "xenstore-write {node} failed"
            )));
        }
        let deadline = std::time::Instant::now() + SUSPEND_TIMEOUT;
        loop {
            let i = self.xc.info(self.dom)?;
            if i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let _ = xenstore(&["xenstore-write", &node, ""]);
                return Err(XenError::Unsupported(format!(
                    "domain {} did not suspend within {SUSPEND_TIMEOUT:?}",
                    self.dom
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A paused domain, created by the toolstack from the source's configuration, to
    /// receive `layout` into.
    pub fn destination(dom: u32, layout: &GuestLayout) -> Result<Self, XenError> {
        if layout.backend != BACKEND || u64::from(layout.page_size) != PAGE as u64 {
            return Err(XenError::Unsupported(format!(
                "a {} guest with {}-byte pages",
                layout.backend, layout.page_size
            )));
        }
        if !layout.disks.is_empty() {
            return Err(XenError::Unsupported(
                "disks of Xen guests are not migrated by this backend yet".into(),
            ));
        }
        let g = Self::new(Arc::new(Xc::open()?), dom, true)?;
        if g.mem.gfns.len() as u64 != layout.pages {
            return Err(XenError::Unsupported(format!(
                "the target domain has {} RAM pages, the source {}: create it from the same configuration",
                g.mem.gfns.len(),
                layout.pages
            )));
        }
        Ok(g)
    }

    /// The domain id.
    pub fn domid(&self) -> u32 {
        self.dom
    }

    /// The RAM map.
    pub fn memmap(&self) -> &MemMap {
        &self.mem
    }

    /// The control interface.
    pub fn xc(&self) -> &Arc<Xc> {
        &self.xc
    }

    fn window(&self, w: u64) -> Result<Arc<Mapping>, XenError> {
        let mut ws = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = ws.map.get(&w) {
            return Ok(Arc::clone(m));
        }
        let first = (w * WINDOW) as usize;
        let last = (first + WINDOW as usize).min(self.mem.gfns.len());
        let gfns = &self.mem.gfns[first..last];
        let mut m = self.xc.map(self.dom, gfns, ws.write)?;
        if ws.write && m.errors.iter().any(|e| *e != 0) {
            // The target lacks some of these pages: give it them, then map again.
            let missing: Vec<u64> = gfns
                .iter()
                .zip(&m.errors)
                .filter(|(_, e)| **e != 0)
                .map(|(g, _)| *g)
                .collect();
            drop(m);
            self.xc.populate(self.dom, &missing)?;
            m = self.xc.map(self.dom, gfns, true)?;
        }
        let m = Arc::new(m);
        if ws.order.len() >= MAX_WINDOWS {
            if let Some(old) = ws.order.pop_front() {
                ws.map.remove(&old);
            }
        }
        ws.order.push_back(w);
        ws.map.insert(w, Arc::clone(&m));
        Ok(m)
    }

    fn page_range(&self, index: u64) -> Result<(), GuestError> {
        if index >= self.mem.gfns.len() as u64 {
            return Err(GuestError::OutOfRange {
                what: "page",
                index,
                limit: self.mem.gfns.len() as u64,
            });
        }
        Ok(())
    }

    /// Runs `f` on page `index`'s slot in its window; `f` says whether it was mapped.
    fn with_page(
        &self,
        index: u64,
        f: impl FnOnce(&Mapping, usize) -> bool,
    ) -> Result<(), GuestError> {
        self.page_range(index)?;
        let m = self.window(index / WINDOW).map_err(gerr)?;
        let slot = (index % WINDOW) as usize;
        if !f(&m, slot) {
            return Err(GuestError::Io {
                what: format!(
                    "gfn {:#x} of domain {} is not mapped",
                    self.mem.gfns[index as usize], self.dom
                ),
                source: std::io::Error::from_raw_os_error(m.errors[slot].abs()),
            });
        }
        Ok(())
    }

    fn read(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.with_page(index, |m, slot| {
            // A gfn with no RAM behind it (see `MemMap::scan`) reads as zero.
            if m.errors[slot] != 0 {
                buf.fill(0);
                return true;
            }
            m.read(slot, buf)
        })
    }

    /// The dirty pages (as page indexes); `clean` clears Xen's log.
    pub fn dirty(&self, clean: bool) -> Result<Bitmap, XenError> {
        let top = self.index_of.len() as u64;
        let words = self.xc.dirty_bitmap(self.dom, top, clean)?;
        let mut out = Bitmap::new(self.mem.gfns.len() as u64);
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let gfn = w as u64 * 64 + b;
                if let Some(&i) = self.index_of.get(gfn as usize) {
                    if i != u32::MAX {
                        out.set(u64::from(i));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The domain's state: HVM context, carried params, TSC info, RAM map digest.
    pub fn state(&self) -> Result<XenState, XenError> {
        let mut params = Vec::new();
        for p in PARAMS {
            if let Ok(v) = self.xc.hvm_param(self.dom, p) {
                params.push((p, v));
            }
        }
        Ok(XenState {
            memmap_digest: self.mem.digest(),
            pages: self.mem.gfns.len() as u64,
            tsc: self.xc.tsc_info(self.dom)?,
            params,
            hvm_context: self.xc.hvm_context(self.dom)?,
        })
    }

    /// Loads a state saved by [`XenGuest::state`] into this (paused) domain.
    pub fn load_state(&self, s: &XenState) -> Result<(), XenError> {
        if s.memmap_digest != self.mem.digest() || s.pages != self.mem.gfns.len() as u64 {
            return Err(XenError::Unsupported(
                "the source's RAM map differs from this domain's".into(),
            ));
        }
        self.xc.set_tsc_info(self.dom, s.tsc)?;
        self.xc.set_hvm_context(self.dom, &s.hvm_context)?;
        for &(p, v) in &s.params {
            if self.xc.hvm_param(self.dom, p).ok() != Some(v) {
                if let Err(e) = self.xc.set_hvm_param(self.dom, p, v) {
                    tracing::warn!("HVM param {p} = {v:#x} not set: {e}");
                }
            }
        }
        Ok(())
    }

    fn take_pending(&self) -> Option<Bitmap> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl SourceGuest for XenGuest {
    fn layout(&self) -> GuestLayout {
        GuestLayout {
            backend: BACKEND.into(),
            page_size: PAGE as u32,
            pages: self.mem.gfns.len() as u64,
            disks: Vec::new(),
        }
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.xc.logdirty_on(self.dom).map_err(gerr)?;
        // Start from a clean log.
        self.dirty(true).map_err(gerr)?;
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.xc.logdirty_off(self.dom) {
            tracing::warn!("{e}");
        }
    }

    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError> {
        let mut b = self.dirty(true).map_err(gerr)?;
        if let Some(p) = self.take_pending() {
            b.merge(&p);
        }
        Ok(b)
    }

    fn merge_dirty_pages(&self, pages: &Bitmap) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match p.as_mut() {
            Some(b) => b.merge(pages),
            None => *p = Some(pages.clone()),
        }
    }

    fn start_block_log(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn stop_block_log(&self) {}

    fn fetch_dirty_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        Err(GuestError::OutOfRange {
            what: "disk",
            index: disk as u64,
            limit: 0,
        })
    }

    fn merge_dirty_blocks(&self, _disk: usize, _blocks: &Bitmap) {}

    fn allocated_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        self.fetch_dirty_blocks(disk)
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.read(index, buf)
    }

    fn read_block(&self, disk: usize, _index: u64, _buf: &mut [u8]) -> Result<(), GuestError> {
        self.fetch_dirty_blocks(disk).map(|_| ())
    }

    fn pause(&self) -> Result<(), GuestError> {
        match self.stop {
            StopMode::Pause => self.xc.pause(self.dom).map_err(gerr),
            StopMode::Suspend => self.suspend().map_err(gerr),
        }
    }

    fn resume(&self) -> Result<(), GuestError> {
        match self.stop {
            StopMode::Pause => self.xc.unpause(self.dom).map_err(gerr),
            StopMode::Suspend => {
                let i = self.xc.info(self.dom).map_err(gerr)?;
                if i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND {
                    // Cancel the suspend: the guest carries on in this domain.
                    self.xc.resume_suspended(self.dom).map_err(gerr)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn save_state(&self) -> Result<StateBlob, GuestError> {
        let s = self.state().map_err(gerr)?;
        Ok(StateBlob {
            version: STATE_VERSION,
            bytes: state::encode(&s),
        })
    }

    fn handed_over(&self) {
        // As `xl migrate` does: the domain now lives on the destination.
        if let Err(e) = self.xc.destroy(self.dom) {
            tracing::warn!("destroying the migrated-away domain: {e}");
        }
    }
}

impl DestGuest for XenGuest {
    fn layout(&self) -> GuestLayout {
        SourceGuest::layout(self)
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.read(index, buf)
    }

    fn write_page(&self, index: u64, data: &[u8]) -> Result<(), GuestError> {
        self.with_page(index, |m, slot| m.write(slot, data))
    }

    fn zero_page(&self, index: u64) -> Result<(), GuestError> {
        self.write_page(index, &[0u8; PAGE])
    }

    fn read_block(&self, disk: usize, _index: u64, _buf: &mut [u8]) -> Result<(), GuestError> {
        Err(GuestError::OutOfRange {
            what: "disk",
            index: disk as u64,
            limit: 0,
        })
    }

    fn write_block(&self, disk: usize, index: u64, _data: &[u8]) -> Result<(), GuestError> {
        DestGuest::read_block(self, disk, index, &mut [])
    }

    fn zero_block(&self, disk: usize, index: u64) -> Result<(), GuestError> {
        DestGuest::read_block(self, disk, index, &mut [])
    }

    fn flush(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn restore_state(&self, blob: &StateBlob) -> Result<(), GuestError> {
        if blob.version != STATE_VERSION {
            return Err(GuestError::BadState(format!(
                "Xen state version {} (this Ferry reads {STATE_VERSION})",
                blob.version
            )));
        }
        let s = state::decode(&blob.bytes).map_err(GuestError::BadState)?;
        self.load_state(&s).map_err(gerr)
    }

    fn resume(&self) -> Result<(), GuestError> {
        // Drop our mappings of the guest before it runs.
        {
            let mut ws = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            ws.map.clear();
            ws.order.clear();
        }
        self.xc.unpause(self.dom).map_err(gerr)
    }

    fn discard(&self) {
        if self.destroy_on_discard {
            if let Err(e) = self.xc.destroy(self.dom) {
                tracing::warn!("destroying the received domain: {e}");
            }
        }
    }
}
