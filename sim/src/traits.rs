//! The engine's guest seams over the sim guest: [`SourceGuest`] and [`DestGuest`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_core::bitmap::Bitmap;
use ferry_core::engine::error_chain;
use ferry_core::guest::{
    DestGuest, FaultFigures, GuestError, GuestLayout, GuestStorage, OracleReport, PullPagesFn,
    SourceGuest, StateBlob, VcpuThrottle,
};

use crate::{state, SimGuest};

impl SimGuest {
    pub(crate) fn current_layout(&self) -> GuestLayout {
        let mut l = self.layout.clone();
        for (dl, d) in l.disks.iter_mut().zip(self.inner.disks.images()) {
            dl.identity = Some(d.identity());
        }
        l
    }
}

impl SourceGuest for SimGuest {
    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn storage(&self) -> Option<&dyn GuestStorage> {
        Some(&self.inner.disks)
    }

    fn limit_disk_writes(&self, blocks_per_second: Option<u64>) {
        // 0 means "no limit" to the disk thread, so a limit is at least one block/s.
        let v = match blocks_per_second {
            None => 0,
            Some(n) => n.max(1),
        };
        self.inner.disk_limit.store(v, Ordering::Relaxed);
    }

    fn throttle_vcpus(&self, t: VcpuThrottle) -> bool {
        // The sim's "vCPUs" are its own pacing: the dirty-limit form.
        let limit = if t.percent == 0 {
            0
        } else {
            t.dirty_pages_per_second.max(1)
        };
        self.inner.dirty_limit.store(limit, Ordering::Relaxed);
        true
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        if !self.inner.tracked.load(Ordering::SeqCst) {
            return Err(GuestError::InvalidState(
                "this guest runs without dirty tracking (a benchmark baseline)".into(),
            ));
        }
        self.inner.page_log.clear();
        Ok(())
    }

    fn stop_dirty_log(&self) {}

    fn fetch_dirty_pages(&self) -> Result<Bitmap, GuestError> {
        Ok(self.inner.page_log.take())
    }

    fn merge_dirty_pages(&self, pages: &Bitmap) {
        self.inner.page_log.merge(pages);
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.page_range(index)?;
        self.inner.mem.read(index, buf);
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        self.inner.ctl.pause().map_err(GuestError::InvalidState)
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.inner.ctl.resume();
        Ok(())
    }

    fn save_state(&self) -> Result<StateBlob, GuestError> {
        if self.started.load(Ordering::SeqCst) && !self.inner.ctl.is_paused() {
            return Err(GuestError::InvalidState(
                "save_state on a running guest".into(),
            ));
        }
        let regs = self
            .inner
            .regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(state::encode(&self.inner.config(), &regs))
    }

    fn handed_over(&self) {
        // Copies left here become the base the next generation starts from.
        self.inner.disks.hand_over();
        self.stop();
    }
}

impl DestGuest for SimGuest {
    fn hold(&self) -> Result<(), GuestError> {
        if DestGuest::owed_pages(self) > 0 {
            // Threads waiting for owed pages cannot park until the pages come: ask them
            // to stop at their next step and do not wait for it.
            self.inner.ctl.request_pause();
            return Ok(());
        }
        SourceGuest::pause(self)
    }

    fn abandon_owed(&self) {
        if let Some(s) = DestGuest::storage(self) {
            s.abandon_owed();
        }
        // A self-check that waits for owed pages gives up now.
        self.inner.abandon_checks();
    }

    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn storage(&self) -> Option<&dyn GuestStorage> {
        Some(&self.inner.disks)
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        SourceGuest::read_page(self, index, buf)
    }

    fn write_page(&self, index: u64, data: &[u8]) -> Result<(), GuestError> {
        self.page_range(index)?;
        self.inner.mem.write(index, data);
        Ok(())
    }

    fn zero_page(&self, index: u64) -> Result<(), GuestError> {
        self.page_range(index)?;
        self.inner.mem.zero(index);
        Ok(())
    }

    fn set_owed_pages(&self, owed: Bitmap, pull: PullPagesFn) -> Result<(), GuestError> {
        self.inner
            .mem
            .set_owed(&owed, pull)
            .map_err(|e| GuestError::Unsupported(error_chain(&e)))
    }

    fn fill_owed_page(&self, index: u64, data: Option<&[u8]>) -> Result<bool, GuestError> {
        self.page_range(index)?;
        self.inner
            .mem
            .postcopy()
            .fill(index, data)
            .map_err(|e| GuestError::Io {
                what: format!("installing page {index}"),
                source: std::io::Error::other(error_chain(&e)),
            })
    }

    fn owed_pages(&self) -> u64 {
        self.inner.mem.postcopy().get().map_or(0, |o| o.owed())
    }

    fn owed_pages_bitmap(&self) -> Option<Bitmap> {
        self.inner.mem.postcopy().get().map(|o| o.owed_bitmap())
    }

    fn fault_figures(&self) -> Option<FaultFigures> {
        self.inner.mem.postcopy().get().map(|o| o.figures())
    }

    fn flush(&self) -> Result<(), GuestError> {
        self.inner.disks.flush(self.started.load(Ordering::SeqCst))
    }

    fn restore_state(&self, blob: &StateBlob) -> Result<(), GuestError> {
        if self.started.load(Ordering::SeqCst) {
            return Err(GuestError::InvalidState(
                "restore into a started guest".into(),
            ));
        }
        // In memory post-copy the header may not be here yet: the self-check reads it.
        if self.inner.header_wrong() {
            return Err(GuestError::BadState(
                "guest memory does not hold a sim guest of this layout".into(),
            ));
        }
        let (cfg, regs) = state::decode(blob).map_err(GuestError::BadState)?;
        let n = usize::from(cfg.threads.max(1));
        if regs.len() != n + 1 {
            return Err(GuestError::BadState(format!(
                "{} register sets for {n} threads",
                regs.len()
            )));
        }
        *self.inner.config.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
        *self.inner.regs.lock().unwrap_or_else(|p| p.into_inner()) = regs.clone();
        for (i, w) in self.inner.live.page_writes.iter().enumerate() {
            w.store(
                regs.get(i).filter(|_| i < n).map_or(0, |r| r.writes),
                Ordering::Relaxed,
            );
        }
        self.inner
            .live
            .block_writes
            .store(regs[n].writes, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self.incoming && !self.started.load(Ordering::SeqCst) {
            // The images continue the source's, one generation on.
            self.inner.disks.adopt_incoming()?;
        }
        self.start();
        Ok(())
    }

    fn self_check(&self) -> Option<OracleReport> {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        let mut c = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
        while c.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Some(OracleReport {
                    ok: false,
                    problems: vec!["self-check did not finish".into()],
                    ..Default::default()
                });
            }
            c = self
                .inner
                .checks_cond
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let cfg = self.inner.config();
        let n = usize::from(cfg.threads.max(1));
        let mut r = OracleReport {
            ok: true,
            ..Default::default()
        };
        for (i, slot) in c.iter().enumerate() {
            if let Some((checked, problems)) = slot {
                if i < n {
                    r.pages_checked += checked;
                } else {
                    r.blocks_checked += checked;
                }
                r.problems.extend(problems.iter().cloned());
            }
        }
        // In memory post-copy the header arrived after the state was restored (unless it
        // never did: the check was abandoned then).
        if self.inner.header_wrong() {
            r.problems
                .push("guest memory does not hold a sim guest of this layout".into());
        }
        r.ok = r.problems.is_empty();
        Some(r)
    }

    fn discard(&self) {
        self.stop();
        self.inner.disks.discard();
    }
}
