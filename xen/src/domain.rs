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
use ferry_core::guest::{DestGuest, GuestError, GuestLayout, GuestStorage, SourceGuest, StateBlob};

use crate::ctrl::{Mapping, Xc, PAGE, PFN_XTAB};
use crate::disks::ServedDisks;
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

/// First gfn above 4 GiB.
const HIGH: u64 = 1 << 20;

/// The gfns a migration carries, in order: `0..low_end`, then `HIGH..high_end` (empty
/// unless the domain has RAM above 4 GiB). Page *i* is the *i*-th of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemMap {
    low_end: u64,
    high_end: u64,
}

impl MemMap {
    /// Scans the physmap of `dom` for RAM: below the special pages, and above 4 GiB when
    /// the domain reaches there. Long holes stop the low scan once the pages found account
    /// for the domain's memory (scanning a million gfns costs seconds under TCG). The map
    /// is every gfn from 0 (and from 4 GiB) to the last RAM gfn found: a running guest may
    /// have swapped a RAM page for something Xen maps (Linux puts shared_info there),
    /// which its freshly created target still has as RAM. Such gfns read as zero on the
    /// source.
    pub fn scan(xc: &Xc, dom: u32) -> Result<Self, XenError> {
        let info = xc.info(dom)?;
        let max = xc.max_gpfn(dom)?;
        let mut found = 0u64;
        // The end (last RAM gfn + 1) of the range scanned.
        let mut scan = |from: u64, to: u64, stop_early: bool| -> Result<u64, XenError> {
            let (mut g, mut end_of_ram, mut empty_chunks) = (from, from, 0);
            while g < to {
                let end = (g + 1024).min(to);
                let chunk: Vec<u64> = (g..end).collect();
                let types = xc.pfn_types(dom, &chunk)?;
                let ram = chunk.iter().zip(&types).filter(|(_, t)| **t != PFN_XTAB);
                let before = found;
                for (g, _) in ram {
                    found += 1;
                    end_of_ram = g + 1;
                }
                empty_chunks = if found == before { empty_chunks + 1 } else { 0 };
                // Allow for the special pages and a few more that nr_pages counts.
                if stop_early && empty_chunks >= 4 && found + 64 >= info.nr_pages {
                    break;
                }
                g = end;
            }
            Ok(end_of_ram)
        };
        let low_end = scan(0, (max + 1).min(*SPECIAL.start()), true)?;
        let high_end = if max >= HIGH {
            scan(HIGH, max + 1, false)?
        } else {
            HIGH
        };
        if found == 0 {
            return Err(XenError::NoDomain(format!("{dom} has no RAM")));
        }
        Ok(Self { low_end, high_end })
    }

    /// Pages carried.
    pub fn pages(&self) -> u64 {
        self.low_end + (self.high_end - HIGH)
    }

    /// The gfn of page `i` (`i < pages()`).
    pub fn gfn(&self, i: u64) -> u64 {
        if i < self.low_end {
            i
        } else {
            HIGH + (i - self.low_end)
        }
    }

    /// The page carrying `gfn`, if any.
    pub fn index(&self, gfn: u64) -> Option<u64> {
        if gfn < self.low_end {
            Some(gfn)
        } else if (HIGH..self.high_end).contains(&gfn) {
            Some(self.low_end + (gfn - HIGH))
        } else {
            None
        }
    }

    /// One past the highest gfn carried (the size of a dirty bitmap).
    pub fn top(&self) -> u64 {
        if self.high_end > HIGH {
            self.high_end
        } else {
            self.low_end
        }
    }

    /// A digest of the map (both sides must have the same).
    pub fn digest(&self) -> u64 {
        self.low_end.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.high_end
    }
}

/// The mappings of windows of `WINDOW` pages, oldest evicted first.
struct Windows {
    map: HashMap<u64, Arc<Mapping>>,
    order: VecDeque<u64>,
}

/// A Xen domain, source or destination.
pub struct XenGuest {
    xc: Arc<Xc>,
    dom: u32,
    mem: MemMap,
    windows: Mutex<Windows>,
    /// Bits merged back after a failed send.
    pending: Mutex<Option<Bitmap>>,
    /// A destination: pages are mapped writable, and the domain is destroyed when
    /// discarded.
    dest: bool,
    /// How the source is to be stopped for the last copy (`None`: decided then).
    stop: Option<StopMode>,
    /// How it was stopped, until resumed.
    stopped: Mutex<Option<StopMode>>,
    /// Disks Ferry serves to the domain (none for a domain with its own).
    disks: Option<ServedDisks>,
    /// A destination whose guest was resumed here.
    running: std::sync::atomic::AtomicBool,
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
    fn new(
        xc: Arc<Xc>,
        dom: u32,
        write: bool,
        disks: Option<ServedDisks>,
    ) -> Result<Self, XenError> {
        let info = xc.info(dom)?;
        if !info.hvm {
            return Err(XenError::Unsupported(format!(
                "domain {dom} is PV: log-dirty needs shadow paging, which Debian's Xen lacks; use a PVH or HVM guest"
            )));
        }
        let mem = MemMap::scan(&xc, dom)?;
        Ok(Self {
            xc,
            dom,
            mem,
            windows: Mutex::new(Windows {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            pending: Mutex::new(None),
            dest: write,
            stop: None,
            stopped: Mutex::new(None),
            disks: disks.filter(|d| !d.is_empty()),
            running: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A running domain to migrate away, with the disks Ferry serves it (if any).
    /// `stop`: how to stop it for the last copy; `None` chooses, when the copy starts,
    /// [`StopMode::Suspend`] if the guest advertises `control/feature-suspend` (Linux does
    /// at boot, not again when resumed in a new domain) or has served disks,
    /// [`StopMode::Pause`] otherwise. A guest with served disks must suspend itself:
    /// paused, its blkback would go on completing requests into a ring page already
    /// copied (a guest that cannot suspend fails the migration safely, resumed).
    pub fn source(
        dom: u32,
        stop: Option<StopMode>,
        disks: Option<ServedDisks>,
    ) -> Result<Self, XenError> {
        let mut g = Self::new(Arc::new(Xc::open()?), dom, false, disks)?;
        if g.disks.is_some() && stop == Some(StopMode::Pause) {
            return Err(XenError::Unsupported(
                "a guest with disks is stopped by suspending itself, not a pause: its block requests in flight would be lost".into(),
            ));
        }
        g.stop = stop;
        Ok(g)
    }

    /// How the source will be stopped for the last copy (decided now when `auto`).
    pub fn stop_mode(&self) -> StopMode {
        self.stop.unwrap_or_else(|| {
            let feature = format!("/local/domain/{}/control/feature-suspend", self.dom);
            if self.disks.is_some()
                || xenstore(&["xenstore-read", &feature]).as_deref() == Some("1")
            {
                StopMode::Suspend
            } else {
                StopMode::Pause
            }
        })
    }

    /// Destroys the domain through the toolstack (which also removes its devices and
    /// releases their back-ends), or through libxenctrl when that fails.
    fn destroy(&self) {
        let xl = std::process::Command::new("xl")
            .args(["destroy", &self.dom.to_string()])
            .output();
        if !xl.is_ok_and(|o| o.status.success()) {
            if let Err(e) = self.xc.destroy(self.dom) {
                tracing::warn!("destroying domain {}: {e}", self.dom);
            }
        }
    }

    /// Stops the guest for good on this host: a domain whose disks this process serves
    /// is shut down (destroyed after 15 s) and its images closed; a domain with disks
    /// of its own is left to the toolstack.
    pub fn shut_down(&self) {
        let Some(d) = &self.disks else { return };
        let _ = std::process::Command::new("xl")
            .args(["shutdown", &self.dom.to_string()])
            .output();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while self.xc.info(self.dom).is_ok_and(|i| !i.shutdown)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.destroy();
        d.close();
    }

    /// Disk image paths.
    pub fn disk_paths(&self) -> Vec<std::path::PathBuf> {
        self.disks
            .as_ref()
            .map_or_else(Vec::new, |d| d.disks.paths())
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
    pub fn destination(
        dom: u32,
        layout: &GuestLayout,
        disks: Option<ServedDisks>,
    ) -> Result<Self, XenError> {
        match Self::checked_destination(dom, layout, disks.as_ref()) {
            Ok(mut g) => {
                g.disks = disks.filter(|d| !d.is_empty());
                Ok(g)
            }
            Err(e) => {
                // Images created for this guest go with it.
                if let Some(d) = disks {
                    d.discard();
                }
                Err(e)
            }
        }
    }

    /// The destination, without its disks yet, once the layout fits the domain.
    fn checked_destination(
        dom: u32,
        layout: &GuestLayout,
        disks: Option<&ServedDisks>,
    ) -> Result<Self, XenError> {
        if layout.backend != BACKEND || u64::from(layout.page_size) != PAGE as u64 {
            return Err(XenError::Unsupported(format!(
                "a {} guest with {}-byte pages",
                layout.backend, layout.page_size
            )));
        }
        let served = disks.map_or(0, |d| d.disks.images().len());
        if served != layout.disks.len() {
            return Err(XenError::Unsupported(format!(
                "the guest has {} disks, {served} are served here",
                layout.disks.len()
            )));
        }
        let g = Self::new(Arc::new(Xc::open()?), dom, true, None)?;
        if g.mem.pages() != layout.pages {
            return Err(XenError::Unsupported(format!(
                "the target domain has {} RAM pages, the source {}: create it from the same configuration",
                g.mem.pages(),
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
        let first = w * WINDOW;
        let last = (first + WINDOW).min(self.mem.pages());
        let gfns: Vec<u64> = (first..last).map(|i| self.mem.gfn(i)).collect();
        let gfns = &gfns[..];
        let mut m = self.xc.map(self.dom, gfns, self.dest)?;
        if self.dest && m.errors.iter().any(|e| *e != 0) {
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
        if index >= self.mem.pages() {
            return Err(GuestError::OutOfRange {
                what: "page",
                index,
                limit: self.mem.pages(),
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
                    self.mem.gfn(index),
                    self.dom
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
        let top = self.mem.top();
        let words = self.xc.dirty_bitmap(self.dom, top, clean)?;
        let mut out = Bitmap::new(self.mem.pages());
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let gfn = w as u64 * 64 + b;
                if let Some(i) = self.mem.index(gfn) {
                    out.set(i);
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
            pages: self.mem.pages(),
            tsc: self.xc.tsc_info(self.dom)?,
            params,
            hvm_context: self.xc.hvm_context(self.dom)?,
        })
    }

    /// Loads a state saved by [`XenGuest::state`] into this (paused) domain.
    pub fn load_state(&self, s: &XenState) -> Result<(), XenError> {
        if s.memmap_digest != self.mem.digest() || s.pages != self.mem.pages() {
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

    fn running_here(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The disks this process serves the domain, as the engine drives them.
    fn served_disks(&self) -> Option<&dyn GuestStorage> {
        self.disks.as_ref().map(|d| &d.disks as &dyn GuestStorage)
    }

    fn take_pending(&self) -> Option<Bitmap> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl SourceGuest for XenGuest {
    fn storage(&self) -> Option<&dyn GuestStorage> {
        self.served_disks()
    }

    fn layout(&self) -> GuestLayout {
        GuestLayout {
            backend: BACKEND.into(),
            page_size: PAGE as u32,
            pages: self.mem.pages(),
            disks: self
                .disks
                .as_ref()
                .map_or_else(Vec::new, |d| d.disks.layouts()),
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

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.read(index, buf)
    }

    fn pause(&self) -> Result<(), GuestError> {
        let mode = self.stop_mode();
        match mode {
            StopMode::Pause => self.xc.pause(self.dom).map_err(gerr)?,
            StopMode::Suspend => self.suspend().map_err(gerr)?,
        }
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(mode);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match stopped {
            None => Ok(()),
            Some(StopMode::Pause) => self.xc.unpause(self.dom).map_err(gerr),
            Some(StopMode::Suspend) => {
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
        // As `xl migrate` does: the domain now lives on the destination. Its disks stop
        // here once blkback let go of them, and become the base for a migration back.
        self.destroy();
        if let Some(d) = &self.disks {
            d.hand_over();
        }
    }

    fn limit_disk_writes(&self, blocks_per_second: Option<u64>) {
        if let Some(d) = &self.disks {
            d.limit_writes(blocks_per_second);
        }
    }
}

impl DestGuest for XenGuest {
    fn hold(&self) -> Result<(), GuestError> {
        SourceGuest::pause(self)
    }

    fn storage(&self) -> Option<&dyn GuestStorage> {
        self.served_disks()
    }

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

    fn flush(&self) -> Result<(), GuestError> {
        match &self.disks {
            // `live` once the received guest runs (its identity recorded then).
            Some(d) => d.disks.flush(self.running_here()),
            None => Ok(()),
        }
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
        if let Some(d) = &self.disks {
            if !self.running_here() {
                d.adopt()?;
            }
        }
        self.xc.unpause(self.dom).map_err(gerr)?;
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self) {
        if self.dest {
            self.destroy();
            if let Some(d) = &self.disks {
                d.discard();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_gfns_map_both_ways_across_the_4_gib_gap() {
        let m = MemMap {
            low_end: 0x10,
            high_end: HIGH + 3,
        };
        assert_eq!(m.pages(), 0x13);
        assert_eq!(m.top(), HIGH + 3);
        for i in 0..m.pages() {
            assert_eq!(m.index(m.gfn(i)), Some(i));
        }
        assert_eq!(m.gfn(0x10), HIGH);
        assert_eq!(m.index(0x10), None);
        assert_eq!(m.index(HIGH + 3), None);
        let low = MemMap {
            low_end: 0x10000,
            high_end: HIGH,
        };
        assert_eq!((low.pages(), low.top()), (0x10000, 0x10000));
        assert_eq!(low.index(HIGH), None);
        assert_ne!(low.digest(), m.digest());
    }
}
