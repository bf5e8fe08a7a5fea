//! vCPU threads: running the guest, serving its ports (pacing, the block device, progress
//! reports), and pausing it at an instruction boundary.
//!
//! A vCPU thread owns its `VcpuFd` while the guest runs. To pause it, the controller asks
//! and kicks the thread with a signal whose handler only sets `kvm_run.immediate_exit`
//! (installed without `SA_RESTART`), so `KVM_RUN` returns `EINTR` whether the signal came
//! before or during the call. The thread then enters `KVM_RUN` once more with
//! `immediate_exit` set, which completes a pending port-I/O exit and advances RIP, and
//! parks without holding the fd, so the controller can read or write its state.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::Machine;
use crate::layout::{io_page, PAGE};
use crate::oracle::{self, VcpuCheck};
use crate::state::DeviceState;
use crate::workload::Pattern;

/// Steps between two pacing points of the guest program (`test $63, %r8`).
const CHUNK: u64 = 64;
/// Block writes at most per pacing point.
const MAX_BLOCKS_PER_CHUNK: f64 = 16.0;

/// Guest ports.
const PORT_CHUNK: u16 = 0x10;
const PORT_PASS: u16 = 0x11;
const PORT_FAIL: u16 = 0x12;
const PORT_BLOCK_WRITE: u16 = 0x20;
const PORT_BLOCK_READ: u16 = 0x21;
/// KVM_EXIT_DIRTY_RING_FULL (not named by kvm-ioctls).
const EXIT_DIRTY_RING_FULL: u32 = 31;

mod kick {
    //! The signal that kicks a vCPU thread out of `KVM_RUN`.
    use std::cell::Cell;
    use std::sync::Once;

    use kvm_bindings::kvm_run;

    thread_local! {
        static RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    }

    extern "C" fn on_kick(_: libc::c_int) {
        let p = RUN.with(Cell::get);
        if !p.is_null() {
            // SAFETY: `p` is this thread's mapped `kvm_run`, set while its vCPU fd is
            // alive and cleared before the fd can go; a volatile byte store is
            // async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    }

    /// The signal number.
    pub fn signal() -> libc::c_int {
        libc::SIGRTMIN() + 3
    }

    /// Installs the handler once per process, without `SA_RESTART`.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the
            // handler has the plain `sa_handler` signature and touches only a
            // thread-local pointer.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_kick as *const () as usize;
                sa.sa_flags = 0;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(signal(), &sa, std::ptr::null_mut());
            }
        });
    }

    /// Points this thread's handler at its `kvm_run` (null to detach).
    pub fn attach(p: *mut kvm_run) {
        RUN.with(|r| r.set(p));
    }
}

/// Where a vCPU thread stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// No thread yet, or parked: the fd is free.
    Paused,
    /// Running the guest.
    Running,
    /// Asked to pause; not yet parked.
    PauseRequested,
    /// Asked to stop.
    Stopping,
    /// The thread ended (stopped, or the guest faulted).
    Stopped,
}

struct Ctl {
    run: RunState,
    tid: Option<libc::pthread_t>,
    check: CheckState,
}

enum CheckState {
    None,
    Requested,
    Done(VcpuCheck),
}

/// One vCPU.
pub struct Vcpu {
    /// Index.
    pub id: usize,
    /// The KVM vCPU: held by the thread while it runs the guest.
    pub fd: Mutex<VcpuFd>,
    /// The VMM's device state for this vCPU.
    pub dev: Mutex<DeviceState>,
    ctl: Mutex<Ctl>,
    cond: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an exit asked for, handled once the exit's borrow of `kvm_run` ended.
enum Step {
    Go,
    Chunk,
    Write(u64),
    Read(u64),
    Fault(String),
}

enum Outcome {
    Pause,
    Stop,
    Fault(String),
}

/// Pacing of one vCPU: page writes and block writes per second.
struct Pacer {
    due: Instant,
    last: Instant,
    block_tokens: f64,
}

impl Pacer {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            due: now,
            last: now,
            block_tokens: 0.0,
        }
    }
}

fn u32_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u64::from(u32::from_le_bytes(b))
}

impl Vcpu {
    /// A parked vCPU.
    pub fn new(id: usize, fd: VcpuFd, dev: DeviceState) -> Self {
        Self {
            id,
            fd: Mutex::new(fd),
            dev: Mutex::new(dev),
            ctl: Mutex::new(Ctl {
                run: RunState::Paused,
                tid: None,
                check: CheckState::None,
            }),
            cond: Condvar::new(),
            thread: Mutex::new(None),
        }
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        lock(&self.ctl).run
    }

    /// Starts the thread (first time) or lets a parked one run again.
    pub fn start(self: &Arc<Self>, m: &Arc<Machine>) {
        let mut t = lock(&self.thread);
        let mut c = lock(&self.ctl);
        if c.run == RunState::Stopped || c.run == RunState::Stopping {
            return;
        }
        c.run = RunState::Running;
        self.cond.notify_all();
        if t.is_none() {
            let (v, m) = (Arc::clone(self), Arc::clone(m));
            *t = Some(std::thread::spawn(move || v.thread_main(&m)));
        }
    }

    fn kick(c: &Ctl) {
        if let Some(tid) = c.tid {
            // SAFETY: `tid` names a live thread: it is cleared under this lock before
            // the thread exits.
            unsafe { libc::pthread_kill(tid, kick::signal()) };
        }
    }

    /// Asks a running vCPU to pause.
    pub fn request_pause(&self) {
        let mut c = lock(&self.ctl);
        if c.run == RunState::Running {
            c.run = RunState::PauseRequested;
            Self::kick(&c);
            self.cond.notify_all();
        }
    }

    /// Waits until the vCPU is parked or stopped.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.ctl);
        while matches!(c.run, RunState::PauseRequested | RunState::Stopping)
            || (c.run == RunState::Running)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .cond
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Stops the thread for good and joins it.
    pub fn stop(&self) {
        {
            let mut c = lock(&self.ctl);
            if c.run != RunState::Stopped {
                c.run = RunState::Stopping;
                Self::kick(&c);
                self.cond.notify_all();
            }
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        lock(&self.ctl).run = RunState::Stopped;
    }

    /// Asks the vCPU to check its share of the guest at its next pacing point, and waits.
    pub fn check(&self, timeout: Duration) -> Option<VcpuCheck> {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.ctl);
        if !matches!(c.run, RunState::Running) {
            return None;
        }
        c.check = CheckState::Requested;
        self.cond.notify_all();
        loop {
            if let CheckState::Done(_) = c.check {
                if let CheckState::Done(r) = std::mem::replace(&mut c.check, CheckState::None) {
                    return Some(r);
                }
            }
            if matches!(c.run, RunState::Stopped | RunState::Stopping) {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                c.check = CheckState::None;
                return None;
            }
            c = self
                .cond
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Parks while paused; false when the thread must end.
    fn gate(&self) -> bool {
        let mut c = lock(&self.ctl);
        loop {
            match c.run {
                RunState::Running => return true,
                RunState::Stopping | RunState::Stopped => return false,
                RunState::PauseRequested => {
                    c.run = RunState::Paused;
                    self.cond.notify_all();
                }
                RunState::Paused => {}
            }
            c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn thread_main(self: Arc<Self>, m: &Arc<Machine>) {
        kick::install();
        {
            let mut fd = lock(&self.fd);
            kick::attach(fd.get_kvm_run());
        }
        // SAFETY: pthread_self has no preconditions.
        lock(&self.ctl).tid = Some(unsafe { libc::pthread_self() });
        let mut pacer = Pacer::new();
        while self.gate() {
            let mut fd = lock(&self.fd);
            match self.run_loop(m, &mut fd, &mut pacer) {
                Outcome::Pause => {
                    // Complete a pending port-I/O exit: the state saved next is then at
                    // an instruction boundary.
                    fd.set_kvm_immediate_exit(1);
                    let _ = fd.run();
                    fd.set_kvm_immediate_exit(0);
                    drop(fd);
                    let mut c = lock(&self.ctl);
                    if c.run == RunState::PauseRequested {
                        c.run = RunState::Paused;
                    }
                    self.cond.notify_all();
                }
                Outcome::Stop => break,
                Outcome::Fault(msg) => {
                    let msg = format!("vCPU {}: {msg}", self.id);
                    tracing::error!("{msg}");
                    m.set_fault(msg);
                    break;
                }
            }
            // Paused from here on: a fresh pacing window when running again.
            pacer = Pacer::new();
        }
        let mut c = lock(&self.ctl);
        c.tid = None;
        c.run = RunState::Stopped;
        kick::attach(std::ptr::null_mut());
        self.cond.notify_all();
    }

    fn run_loop(&self, m: &Machine, fd: &mut VcpuFd, pacer: &mut Pacer) -> Outcome {
        loop {
            match lock(&self.ctl).run {
                RunState::PauseRequested => return Outcome::Pause,
                RunState::Stopping | RunState::Stopped => return Outcome::Stop,
                _ => {}
            }
            let step = match fd.run() {
                Ok(VcpuExit::IoIn(PORT_CHUNK, data)) => {
                    let blocks = self.chunk(m, pacer);
                    let b = blocks.to_le_bytes();
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&b[..n]);
                    Step::Chunk
                }
                Ok(VcpuExit::IoOut(PORT_PASS, data)) => {
                    let mut d = lock(&self.dev);
                    d.passes = u32_of(data);
                    d.pass_pending = true;
                    Step::Go
                }
                Ok(VcpuExit::IoOut(PORT_BLOCK_WRITE, data)) => Step::Write(u32_of(data)),
                Ok(VcpuExit::IoOut(PORT_BLOCK_READ, data)) => Step::Read(u32_of(data)),
                Ok(VcpuExit::IoOut(PORT_FAIL, data)) => Step::Fault(match u32_of(data) {
                    1 => "the guest's own check failed: the SSE copy of its pass counter was lost".into(),
                    2 => "the guest's own check failed: a block read back does not hold the sequence number written a lap earlier".into(),
                    c => format!("the guest reported failure {c}"),
                }),
                Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                    m.dirty.harvest_rings(&m.vm);
                    Step::Go
                }
                Ok(VcpuExit::Intr) => Step::Go,
                Ok(other) => Step::Fault(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Go,
                Err(e) => Step::Fault(format!("KVM_RUN failed: {e}")),
            };
            match step {
                Step::Go => {}
                Step::Chunk => {
                    self.serve_check(m, fd);
                    if m.workload().pattern == Pattern::Idle {
                        self.idle(m, fd);
                    }
                }
                Step::Write(b) => {
                    if let Err(e) = self.block_write(m, b) {
                        return Outcome::Fault(e);
                    }
                }
                Step::Read(b) => {
                    if let Err(e) = self.block_read(m, b) {
                        return Outcome::Fault(e);
                    }
                }
                Step::Fault(msg) => return Outcome::Fault(msg),
            }
        }
    }

    /// A pacing point: accounts the steps since the last one, waits as the rate asks,
    /// and answers how many blocks to write now.
    fn chunk(&self, m: &Machine, p: &mut Pacer) -> u32 {
        let (counted, has_disk) = {
            let mut d = lock(&self.dev);
            let n = d.part.pages;
            let c = if d.pass_pending {
                d.pass_pending = false;
                let c = n.saturating_sub(d.pos);
                d.pos = 0;
                c
            } else {
                let c = CHUNK.min(n.saturating_sub(d.pos));
                d.pos += c;
                c
            };
            d.page_writes += c;
            (c, d.part.blocks > 0)
        };
        let wl = m.workload();
        if wl.pattern == Pattern::Idle {
            return 0;
        }
        let vcpus = m.vcpu_count().max(1) as f64;
        let now = Instant::now();
        let limit = m.dirty_limit.load(std::sync::atomic::Ordering::Relaxed);
        let rate = match (wl.dirty_rate, limit) {
            (0, l) => l,
            (r, 0) => r,
            (r, l) => r.min(l),
        };
        if rate > 0 {
            let per = rate as f64 / vcpus;
            // No bursts to catch up after a stall (a pause, a slow round).
            p.due = p.due.max(now - Duration::from_millis(50));
            p.due += Duration::from_secs_f64(counted as f64 / per);
            self.sleep_until(p.due);
        }
        if !has_disk {
            return 0;
        }
        let now = Instant::now();
        let mut rate = wl.disk_rate as f64;
        let limit = m.disk_limit();
        if limit > 0 {
            rate = rate.min(limit as f64);
        }
        p.block_tokens = (p.block_tokens + now.duration_since(p.last).as_secs_f64() * rate / vcpus)
            .min(MAX_BLOCKS_PER_CHUNK * 4.0);
        p.last = now;
        let n = p.block_tokens.floor().min(MAX_BLOCKS_PER_CHUNK);
        p.block_tokens -= n;
        n as u32
    }

    /// Sleeps until `due`, waking early for a pause, a stop or a check.
    fn sleep_until(&self, due: Instant) {
        let mut c = lock(&self.ctl);
        loop {
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero()
                || c.run != RunState::Running
                || matches!(c.check, CheckState::Requested)
            {
                return;
            }
            c = self
                .cond
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The idle workload: stays at its pacing point, serving checks, until paused.
    fn idle(&self, m: &Machine, fd: &VcpuFd) {
        loop {
            {
                let mut c = lock(&self.ctl);
                while c.run == RunState::Running && !matches!(c.check, CheckState::Requested) {
                    c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
                }
                if c.run != RunState::Running {
                    return;
                }
            }
            self.serve_check(m, fd);
        }
    }

    fn serve_check(&self, m: &Machine, fd: &VcpuFd) {
        if !matches!(lock(&self.ctl).check, CheckState::Requested) {
            return;
        }
        let dev = *lock(&self.dev);
        let r = oracle::check_vcpu(m, fd, self.id, &dev);
        lock(&self.ctl).check = CheckState::Done(r);
        self.cond.notify_all();
    }

    fn block_in_range(&self, b: u64) -> Result<(), String> {
        let d = lock(&self.dev);
        let p = d.part;
        if b < p.first_block || b >= p.first_block + p.blocks {
            return Err(format!(
                "the guest asked for block {b}, outside its {}..{}",
                p.first_block,
                p.first_block + p.blocks
            ));
        }
        Ok(())
    }

    fn block_write(&self, m: &Machine, b: u64) -> Result<(), String> {
        self.block_in_range(b)?;
        let disk = m.disks.get(0).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; disk.block_size() as usize];
        if !m.ram.read(io_page(self.id), &mut buf) {
            return Err("the I/O page is outside guest memory".into());
        }
        disk.guest_write(b, &buf)
            .map_err(|e| format!("writing block {b}: {e}"))?;
        lock(&self.dev).block_writes += 1;
        Ok(())
    }

    fn block_read(&self, m: &Machine, b: u64) -> Result<(), String> {
        self.block_in_range(b)?;
        let disk = m.disks.get(0).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; disk.block_size() as usize];
        disk.read(b, &mut buf)
            .map_err(|e| format!("reading block {b}: {e}"))?;
        let at = io_page(self.id);
        if !m.ram.write(at, &buf[..PAGE as usize]) {
            return Err("the I/O page is outside guest memory".into());
        }
        // KVM does not see the VMM's writes into guest memory: log them ourselves.
        m.dirty.mark_vmm_write(at / PAGE);
        Ok(())
    }
}
