//! The KVM guest: a VM running the bundled workload on one or more vCPUs, with a
//! paravirtual block device served from a raw image — and the engine's seams over it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ferry_core::bitmap::Bitmap;
use ferry_core::guest::{
    DestGuest, FaultFigures, GuestError, GuestLayout, GuestStorage, OracleReport, PullPagesFn,
    SourceGuest, StateBlob, VcpuThrottle,
};
use ferry_disk::content::{random_bytes, read_image, Fill};
use ferry_disk::{DiskSpec, GuestDisks};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::dirty::{DirtyLog, DirtyMode};
use crate::layout::{self, io_page, Partition, PAGE, WORK};
use crate::memory::GuestRam;
use crate::state::{self, DeviceState, VmState, STATE_VERSION};
use crate::vcpu::{RunState, Vcpu};
use crate::workload::{Pattern, Workload};
use crate::{KvmError, BACKEND, WORKLOAD};

/// How long a vCPU may take to reach a pause or a pacing point.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Kvm { what, source }
}

fn gio(what: &str, e: impl std::fmt::Display) -> GuestError {
    GuestError::Io {
        what: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Settings of a new KVM guest.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs (each runs the workload over its own share of memory and disk).
    pub vcpus: usize,
    /// The workload.
    pub workload: Workload,
    /// The disk, if any (4 KiB blocks).
    pub disk: Option<DiskSpec>,
    /// Initial content of the workload's pages (the counters start at 0 regardless).
    pub fill: Fill,
    /// Seed of random content.
    pub seed: u64,
    /// Dirty-page tracking.
    pub dirty_mode: DirtyMode,
}

/// Everything the vCPU threads share.
pub struct Machine {
    vcpus: RwLock<Vec<Arc<Vcpu>>>,
    pub(crate) dirty: DirtyLog,
    pub(crate) vm: VmFd,
    kvm: Kvm,
    pub(crate) disks: GuestDisks,
    workload: Mutex<Workload>,
    disk_limit: AtomicU64,
    /// Memory auto-converge: page writes per second allowed over all vCPUs (0 = none).
    pub(crate) dirty_limit: AtomicU64,
    fault: Mutex<Option<String>>,
    irqchip: bool,
    msr_list: OnceLock<Vec<u32>>,
    // Last: the VM fd (above) goes before the memory it maps.
    pub(crate) ram: GuestRam,
}

impl Machine {
    fn new(
        memory: u64,
        mode: DirtyMode,
        disks: GuestDisks,
        populate: bool,
    ) -> Result<Self, KvmError> {
        crate::available()?;
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("creating a VM"))?;
        // An in-kernel irqchip gives each vCPU a LAPIC (saved and restored like any VMM's).
        let irqchip = match vm.create_irq_chip() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("no in-kernel irqchip ({e}): LAPIC and irqchip state not kept");
                false
            }
        };
        let ram = GuestRam::new(memory, populate).map_err(|source| KvmError::Io {
            what: format!("mapping {} MiB of guest memory", memory >> 20),
            source,
        })?;
        let dirty = DirtyLog::new(mode, ram.slots(), ram.pages());
        dirty.prepare_vm(&kvm, &vm).map_err(KvmError::Config)?;
        ram.register(&vm, false)
            .map_err(kvm_err("registering guest memory"))?;
        Ok(Self {
            vcpus: RwLock::new(Vec::new()),
            dirty,
            vm,
            kvm,
            disks,
            workload: Mutex::new(Workload::default()),
            disk_limit: AtomicU64::new(0),
            dirty_limit: AtomicU64::new(0),
            fault: Mutex::new(None),
            irqchip,
            msr_list: OnceLock::new(),
            ram,
        })
    }

    fn add_vcpu(&self, id: usize, dev: DeviceState) -> Result<Arc<Vcpu>, KvmError> {
        let fd = self
            .vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("creating a vCPU"))?;
        self.dirty.add_vcpu(&fd).map_err(KvmError::Config)?;
        let v = Arc::new(Vcpu::new(id, fd, dev));
        self.vcpus
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&v));
        Ok(v)
    }

    pub(crate) fn vcpus(&self) -> Vec<Arc<Vcpu>> {
        self.vcpus.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn vcpu_count(&self) -> usize {
        self.vcpus.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub(crate) fn workload(&self) -> Workload {
        *self.workload.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn disk_limit(&self) -> u64 {
        self.disk_limit.load(Ordering::Relaxed)
    }

    pub(crate) fn set_fault(&self, msg: String) {
        self.fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(msg);
    }

    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn msr_list(&self, fd: &VcpuFd) -> Result<&[u32], state::StateError> {
        if let Some(l) = self.msr_list.get() {
            return Ok(l);
        }
        let l = state::readable_msrs(&self.kvm, fd)?;
        Ok(self.msr_list.get_or_init(|| l))
    }
}

/// Puts a fresh vCPU at the workload's entry in 64-bit mode, ring 3.
fn boot_vcpu(kvm: &Kvm, fd: &VcpuFd, id: usize, p: &Partition) -> Result<(), KvmError> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reading CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
    let mut sregs = fd.get_sregs().map_err(kvm_err("reading sregs"))?;
    layout::long_mode_sregs(&mut sregs);
    fd.set_sregs(&sregs).map_err(kvm_err("setting sregs"))?;
    let mut fpu = fd.get_fpu().map_err(kvm_err("reading the FPU"))?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    fd.set_fpu(&fpu).map_err(kvm_err("setting the FPU"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: layout::CODE,
        rflags: 0x2 | (3 << 12), // IOPL 3: port I/O from ring 3
        rdi: p.first_page * PAGE,
        rsi: p.pages,
        r12: p.stride,
        r9: p.first_block,
        r10: p.blocks,
        r13: io_page(id),
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("setting regs"))?;
    // With an in-kernel LAPIC, vCPUs other than 0 wait for INIT/SIPI: start them all.
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err("making the vCPU runnable"))?;
    Ok(())
}

/// Workload progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmStats {
    /// Page writes so far (the guest's whole life).
    pub page_writes: u64,
    /// Block writes so far.
    pub block_writes: u64,
    /// Passes completed by the slowest vCPU.
    pub passes: u64,
    /// Whether the vCPUs run.
    pub running: bool,
}

/// A KVM guest.
pub struct KvmGuest {
    m: Arc<Machine>,
    layout: GuestLayout,
    started: AtomicBool,
    incoming: bool,
    last_pause: Mutex<Option<Duration>>,
}

impl KvmGuest {
    /// Creates a guest; it does not run until [`KvmGuest::start`].
    pub fn create(cfg: &KvmConfig) -> Result<Self, KvmError> {
        crate::available()?;
        layout::check_memory(cfg.memory).map_err(|e| KvmError::Config(format!("memory: {e}")))?;
        if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
            return Err(KvmError::Config(format!(
                "{} vCPUs (1..={})",
                cfg.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if let Some(d) = &cfg.disk {
            if d.block_size as u64 != PAGE {
                return Err(KvmError::Config(
                    "the block device uses 4 KiB blocks".into(),
                ));
            }
        }
        let disks = GuestDisks::open_live(cfg.disk.as_slice()).map_err(KvmError::Guest)?;
        let blocks = disks.images().first().map_or(0, |d| d.blocks());
        let mut m = Machine::new(cfg.memory, cfg.dirty_mode, disks, true)?;
        let mem = m.ram.as_mut_slice();
        layout::write_boot(mem, WORKLOAD).map_err(KvmError::Config)?;
        fill(&mut mem[WORK as usize..], &cfg.fill, cfg.seed)?;
        *m.workload.lock().unwrap_or_else(|p| p.into_inner()) = cfg.workload;
        let parts = layout::partitions(
            cfg.memory,
            blocks,
            cfg.vcpus,
            cfg.workload.pattern == Pattern::Scatter,
        );
        for (id, p) in parts.iter().enumerate() {
            let v = m.add_vcpu(
                id,
                DeviceState {
                    part: *p,
                    ..Default::default()
                },
            )?;
            let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
            boot_vcpu(&m.kvm, &fd, id, p)?;
        }
        let layout = GuestLayout {
            backend: BACKEND.into(),
            page_size: PAGE as u32,
            pages: cfg.memory / PAGE,
            disks: m.disks.layouts(),
        };
        Ok(Self {
            m: Arc::new(m),
            layout,
            started: AtomicBool::new(false),
            incoming: false,
            last_pause: Mutex::new(None),
        })
    }

    /// An empty guest to receive `layout` into, with disk images in `dir`.
    pub fn incoming(layout: &GuestLayout, dir: &Path, mode: DirtyMode) -> Result<Self, GuestError> {
        if layout.backend != BACKEND {
            return Err(GuestError::Unsupported(format!(
                "backend {:?} (this is the {BACKEND:?} backend)",
                layout.backend
            )));
        }
        if u64::from(layout.page_size) != PAGE {
            return Err(GuestError::Unsupported(format!(
                "page size {}",
                layout.page_size
            )));
        }
        let memory = layout
            .pages
            .checked_mul(PAGE)
            .ok_or_else(|| GuestError::Unsupported("memory size overflows".into()))?;
        layout::check_memory(memory).map_err(GuestError::Unsupported)?;
        if layout.disks.len() > 1 || layout.disks.iter().any(|d| u64::from(d.block_size) != PAGE) {
            return Err(GuestError::Unsupported(
                "the KVM guest has at most one disk of 4 KiB blocks".into(),
            ));
        }
        let disks = GuestDisks::incoming(&layout.disks, dir)?;
        let m = Machine::new(memory, mode, disks, true).map_err(KvmError::into_guest)?;
        let layout = GuestLayout {
            disks: m.disks.layouts(),
            ..layout.clone()
        };
        Ok(Self {
            m: Arc::new(m),
            layout,
            started: AtomicBool::new(false),
            incoming: true,
            last_pause: Mutex::new(None),
        })
    }

    /// Starts (or resumes) the vCPUs.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        for v in self.m.vcpus() {
            v.start(&self.m);
        }
    }

    /// Stops the vCPUs for good and closes the images' metadata.
    pub fn stop(&self) {
        for v in self.m.vcpus() {
            v.stop();
        }
        if self.started.load(Ordering::SeqCst) {
            self.m.disks.close();
        }
    }

    /// Workload progress.
    pub fn stats(&self) -> KvmStats {
        let vcpus = self.m.vcpus();
        let mut s = KvmStats {
            passes: u64::MAX,
            running: !vcpus.is_empty(),
            ..Default::default()
        };
        for v in &vcpus {
            let d = *v.dev.lock().unwrap_or_else(|p| p.into_inner());
            s.page_writes += d.page_writes;
            s.block_writes += d.block_writes;
            s.passes = s.passes.min(d.passes);
            s.running &= v.state() == RunState::Running;
        }
        if vcpus.is_empty() {
            s.passes = 0;
        }
        s
    }

    /// The workload settings.
    pub fn workload(&self) -> Workload {
        self.m.workload()
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.m.vcpu_count()
    }

    /// How dirty pages are tracked.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.m.dirty.mode()
    }

    /// A fault that stopped a vCPU (the guest's own check failing, an unexpected exit).
    pub fn fault(&self) -> Option<String> {
        self.m.fault()
    }

    /// How long the last pause took (request to every vCPU parked).
    pub fn last_pause(&self) -> Option<Duration> {
        *self.last_pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disk image paths.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        self.m.disks.paths()
    }

    /// Checks every vCPU's share of memory and disk at its next pacing point, while the
    /// guest runs.
    pub fn check_now(&self) -> Result<OracleReport, GuestError> {
        let mut r = OracleReport {
            ok: true,
            ..Default::default()
        };
        if let Some(f) = self.m.fault() {
            r.problems.push(f);
        }
        for v in self.m.vcpus() {
            match v.check(CHECK_TIMEOUT) {
                Some(c) => {
                    r.pages_checked += c.pages;
                    r.blocks_checked += c.blocks;
                    r.problems.extend(c.problems);
                }
                None => r.problems.push(format!(
                    "vCPU {} did not reach a pacing point to be checked (it is {:?})",
                    v.id,
                    v.state()
                )),
            }
        }
        r.ok = r.problems.is_empty();
        Ok(r)
    }

    /// Reads guest memory at `gpa` (tests and tools).
    pub fn peek(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.m.ram.read(gpa, buf)
    }

    fn page(&self, index: u64) -> Result<u64, GuestError> {
        if index >= self.layout.pages {
            return Err(GuestError::OutOfRange {
                what: "page",
                index,
                limit: self.layout.pages,
            });
        }
        Ok(index * PAGE)
    }

    fn current_layout(&self) -> GuestLayout {
        GuestLayout {
            disks: self.m.disks.layouts(),
            ..self.layout.clone()
        }
    }

    fn save(&self) -> Result<VmState, GuestError> {
        let mut s = VmState {
            workload: self.m.workload(),
            ..Default::default()
        };
        for v in self.m.vcpus() {
            if matches!(v.state(), RunState::Running | RunState::PauseRequested) {
                return Err(GuestError::InvalidState(
                    "save_state on a running guest".into(),
                ));
            }
            let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
            let dev = *v.dev.lock().unwrap_or_else(|p| p.into_inner());
            let msrs = self
                .m
                .msr_list(&fd)
                .map_err(|e| gio("saving vCPU state", e))?;
            s.vcpus.push(
                state::save_vcpu(&fd, msrs, self.m.irqchip, dev)
                    .map_err(|e| gio("saving vCPU state", e))?,
            );
        }
        if self.m.irqchip {
            for chip_id in 0..3 {
                let mut chip = kvm_bindings::kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.m
                    .vm
                    .get_irqchip(&mut chip)
                    .map_err(|e| gio("saving the irqchips", e))?;
                s.irqchips.push(chip);
            }
        }
        s.clock = self
            .m
            .vm
            .get_clock()
            .map_err(|e| gio("saving the clock", e))?;
        Ok(s)
    }

    fn restore(&self, s: &VmState) -> Result<(), GuestError> {
        let pages = self.layout.pages;
        let blocks = self.m.disks.images().first().map_or(0, |d| d.blocks());
        for (i, v) in s.vcpus.iter().enumerate() {
            let p = v.dev.part;
            if p.first_page < WORK / PAGE
                || p.first_page.checked_add(p.pages).is_none_or(|e| e > pages)
                || p.first_block
                    .checked_add(p.blocks)
                    .is_none_or(|e| e > blocks)
            {
                return Err(GuestError::BadState(format!(
                    "vCPU {i}'s partition (pages {}+{}, blocks {}+{}) does not fit this guest",
                    p.first_page, p.pages, p.first_block, p.blocks
                )));
            }
        }
        if !s.irqchips.is_empty() && (!self.m.irqchip || s.irqchips.len() != 3) {
            return Err(GuestError::Unsupported(
                "the source had an in-kernel irqchip, this host has none".into(),
            ));
        }
        *self.m.workload.lock().unwrap_or_else(|p| p.into_inner()) = s.workload;
        for (i, vs) in s.vcpus.iter().enumerate() {
            let v = self.m.add_vcpu(i, vs.dev).map_err(KvmError::into_guest)?;
            let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
            state::restore_vcpu(&fd, vs).map_err(|e| GuestError::BadState(e.to_string()))?;
        }
        for chip in &s.irqchips {
            self.m
                .vm
                .set_irqchip(chip)
                .map_err(|e| GuestError::BadState(format!("setting an irqchip: {e}")))?;
        }
        let mut clock = s.clock;
        // KVM_SET_CLOCK accepts only the REALTIME flag; the others describe the source.
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.m
            .vm
            .set_clock(&clock)
            .map_err(|e| GuestError::BadState(format!("setting the clock: {e}")))?;
        Ok(())
    }
}

/// Fills the workload's pages and zeroes each page's counter.
fn fill(work: &mut [u8], fill: &Fill, seed: u64) -> Result<(), KvmError> {
    let ps = PAGE as usize;
    match fill {
        Fill::Zero => {}
        Fill::Random => {
            for (i, page) in work.chunks_mut(ps).enumerate() {
                random_bytes(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), page);
            }
        }
        Fill::File(path) => {
            let image = read_image(path, work.len() as u64)
                .map_err(|e| KvmError::Config(format!("--fill: {e}")))?;
            let image_pages = (image.len() / ps).max(1);
            for (i, page) in work.chunks_mut(ps).enumerate() {
                let src = &image[(i % image_pages) * ps..];
                let n = src.len().min(ps);
                page[..n].copy_from_slice(&src[..n]);
                page[n..].fill(0);
            }
        }
    }
    for page in work.chunks_mut(ps) {
        page[..8].fill(0);
    }
    Ok(())
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SourceGuest for KvmGuest {
    fn storage(&self) -> Option<&dyn GuestStorage> {
        Some(&self.m.disks)
    }

    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.m
            .ram
            .register(&self.m.vm, true)
            .map_err(|e| gio("starting dirty logging", e))?;
        self.m.dirty.reset(&self.m.vm);
        Ok(())
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.m.ram.register(&self.m.vm, false) {
            tracing::warn!("stopping dirty logging: {e}");
        }
    }

    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError> {
        self.m
            .dirty
            .fetch(&self.m.vm)
            .map_err(|e| gio("fetching the dirty log", e))
    }

    fn merge_dirty_pages(&self, pages: &Bitmap) {
        self.m.dirty.merge_back(pages);
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let gpa = self.page(index)?;
        self.m.ram.read(gpa, buf);
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        let t = Instant::now();
        let vcpus = self.m.vcpus();
        for v in &vcpus {
            v.request_pause();
        }
        for v in &vcpus {
            if !v.wait_paused(PAUSE_TIMEOUT) {
                return Err(GuestError::InvalidState(format!(
                    "vCPU {} did not pause within {PAUSE_TIMEOUT:?}",
                    v.id
                )));
            }
        }
        *self.last_pause.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.elapsed());
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.start();
        Ok(())
    }

    fn save_state(&self) -> Result<StateBlob, GuestError> {
        let s = self.save()?;
        Ok(StateBlob {
            version: STATE_VERSION,
            bytes: state::encode(&s),
        })
    }

    fn handed_over(&self) {
        self.m.disks.hand_over();
        self.stop();
    }

    fn limit_disk_writes(&self, blocks_per_second: Option<u64>) {
        self.m
            .disk_limit
            .store(blocks_per_second.map_or(0, |n| n.max(1)), Ordering::Relaxed);
    }

    fn throttle_vcpus(&self, t: VcpuThrottle) -> bool {
        // The vCPUs stop at every pacing point (64 pages); holding them there long
        // enough keeps their dirtying to the limit, as QEMU's dirty-limit does with its
        // dirty ring.
        let limit = if t.percent == 0 {
            0
        } else {
            t.dirty_pages_per_second.max(1)
        };
        self.m.dirty_limit.store(limit, Ordering::Relaxed);
        true
    }
}

impl DestGuest for KvmGuest {
    fn hold(&self) -> Result<(), GuestError> {
        if DestGuest::owed_pages(self) > 0 {
            // A vCPU waiting for an owed page stops at its next exit once the page came.
            for v in self.m.vcpus() {
                v.request_pause();
            }
            return Ok(());
        }
        SourceGuest::pause(self)
    }

    fn storage(&self) -> Option<&dyn GuestStorage> {
        Some(&self.m.disks)
    }

    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        SourceGuest::read_page(self, index, buf)
    }

    fn write_page(&self, index: u64, data: &[u8]) -> Result<(), GuestError> {
        let gpa = self.page(index)?;
        self.m.ram.write(gpa, data);
        Ok(())
    }

    fn zero_page(&self, index: u64) -> Result<(), GuestError> {
        let gpa = self.page(index)?;
        self.m.ram.zero(gpa, PAGE as usize);
        Ok(())
    }

    fn set_owed_pages(&self, owed: Bitmap, pull: PullPagesFn) -> Result<(), GuestError> {
        self.m
            .ram
            .set_owed(&owed, pull)
            .map_err(|e| GuestError::Unsupported(ferry_core::engine::error_chain(&e)))
    }

    fn fill_owed_page(&self, index: u64, data: Option<&[u8]>) -> Result<bool, GuestError> {
        self.page(index)?;
        self.m.ram.postcopy().fill(index, data).map_err(|e| {
            gio(
                &format!("installing page {index}"),
                ferry_core::engine::error_chain(&e),
            )
        })
    }

    fn owed_pages(&self) -> u64 {
        self.m.ram.postcopy().get().map_or(0, |o| o.owed())
    }

    fn owed_pages_bitmap(&self) -> Option<Bitmap> {
        self.m.ram.postcopy().get().map(|o| o.owed_bitmap())
    }

    fn fault_figures(&self) -> Option<FaultFigures> {
        self.m.ram.postcopy().get().map(|o| o.figures())
    }

    fn flush(&self) -> Result<(), GuestError> {
        self.m.disks.flush(self.started.load(Ordering::SeqCst))
    }

    fn restore_state(&self, blob: &StateBlob) -> Result<(), GuestError> {
        if self.started.load(Ordering::SeqCst) || self.m.vcpu_count() > 0 {
            return Err(GuestError::InvalidState(
                "restore into a guest that already has vCPUs".into(),
            ));
        }
        if blob.version != STATE_VERSION {
            return Err(GuestError::BadState(format!(
                "KVM state version {} (this Ferry reads {STATE_VERSION})",
                blob.version
            )));
        }
        let s = state::decode(&blob.bytes).map_err(GuestError::BadState)?;
        self.restore(&s)
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self.incoming && !self.started.load(Ordering::SeqCst) {
            self.m.disks.adopt_incoming()?;
        }
        self.m.ram.settle();
        self.start();
        Ok(())
    }

    fn self_check(&self) -> Option<OracleReport> {
        Some(self.check_now().unwrap_or_else(|e| OracleReport {
            ok: false,
            problems: vec![e.to_string()],
            ..Default::default()
        }))
    }

    fn discard(&self) {
        self.stop();
        self.m.disks.discard();
    }
}
