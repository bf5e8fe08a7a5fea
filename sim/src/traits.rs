//! The engine's guest seams over the sim guest: [`SourceGuest`] and [`DestGuest`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_core::bitmap::Bitmap;
use ferry_core::guest::{DestGuest, GuestError, GuestLayout, OracleReport, SourceGuest, StateBlob};

use crate::{gerr, state, DiskImage, SimGuest};

impl SimGuest {
    pub(crate) fn current_layout(&self) -> GuestLayout {
        let mut l = self.layout.clone();
        for (dl, d) in l.disks.iter_mut().zip(&self.inner.disks) {
            dl.identity = Some(d.identity());
        }
        l
    }
}

impl SourceGuest for SimGuest {
    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn written_since(&self, disk: usize, generation: u64) -> Option<Bitmap> {
        self.inner.disks.get(disk)?.written_since(generation)
    }

    fn limit_disk_writes(&self, blocks_per_second: Option<u64>) {
        // 0 means "no limit" to the disk thread, so a limit is at least one block/s.
        let v = match blocks_per_second {
            None => 0,
            Some(n) => n.max(1),
        };
        self.inner.disk_limit.store(v, Ordering::Relaxed);
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
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

    fn start_block_log(&self) -> Result<(), GuestError> {
        for d in &self.inner.disks {
            d.log.clear();
        }
        Ok(())
    }

    fn stop_block_log(&self) {}

    fn fetch_dirty_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        Ok(self.disk(disk)?.log.take())
    }

    fn merge_dirty_blocks(&self, disk: usize, blocks: &Bitmap) {
        if let Ok(d) = self.disk(disk) {
            d.log.merge(blocks);
        }
    }

    fn allocated_blocks(&self, disk: usize) -> Result<Bitmap, GuestError> {
        self.disk(disk)?
            .allocated()
            .map_err(gerr("finding allocated blocks"))
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.page_range(index)?;
        self.inner.mem.read(index, buf);
        Ok(())
    }

    fn read_block(&self, disk: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.disk(disk)?
            .read(index, buf)
            .map_err(gerr("reading a block"))
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
        for d in &self.inner.disks {
            if let Err(e) = d.hand_over() {
                tracing::warn!("{}", ferry_core::engine::error_chain(&e));
            }
        }
        self.stop();
    }
}

impl DestGuest for SimGuest {
    fn layout(&self) -> GuestLayout {
        self.current_layout()
    }

    fn base(&self, disk: usize) -> ferry_core::guest::Base {
        self.inner
            .disks
            .get(disk)
            .map_or(ferry_core::guest::Base::None, DiskImage::base)
    }

    fn set_owed(
        &self,
        disk: usize,
        owed: Bitmap,
        pull: ferry_core::guest::PullFn,
    ) -> Result<(), GuestError> {
        self.disk(disk)?.set_owed(disk, owed, pull);
        Ok(())
    }

    fn fill_owed(&self, disk: usize, index: u64, data: &[u8]) -> Result<bool, GuestError> {
        self.disk(disk)?
            .fill_owed(index, data)
            .map_err(gerr("writing a late block"))
    }

    fn prepare_disk(
        &self,
        disk: usize,
        plan: ferry_core::guest::DiskPlan,
    ) -> Result<(), GuestError> {
        self.disk(disk)?
            .prepare(plan)
            .map_err(gerr("preparing a disk image"))
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

    fn read_block(&self, disk: usize, index: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        SourceGuest::read_block(self, disk, index, buf)
    }

    fn write_block(&self, disk: usize, index: u64, data: &[u8]) -> Result<(), GuestError> {
        self.disk(disk)?
            .write(index, data)
            .map_err(gerr("writing a block"))
    }

    fn zero_block(&self, disk: usize, index: u64) -> Result<(), GuestError> {
        self.disk(disk)?
            .zero(index)
            .map_err(gerr("zeroing a block"))
    }

    fn flush(&self) -> Result<(), GuestError> {
        for d in &self.inner.disks {
            d.flush().map_err(gerr("flushing a disk image"))?;
        }
        // After resuming, record the images' new identity (kept out of the downtime).
        if self.started.load(Ordering::SeqCst) {
            for d in &self.inner.disks {
                d.persist(ferry_core::image::SidecarState::Open)
                    .map_err(|e| GuestError::Io {
                        what: "writing image metadata".into(),
                        source: std::io::Error::other(ferry_core::engine::error_chain(&e)),
                    })?;
            }
        }
        Ok(())
    }

    fn start_writeback(&self) -> Result<(), GuestError> {
        for d in &self.inner.disks {
            d.start_writeback().map_err(gerr("starting write-back"))?;
        }
        Ok(())
    }

    fn restore_state(&self, blob: &StateBlob) -> Result<(), GuestError> {
        if self.started.load(Ordering::SeqCst) {
            return Err(GuestError::InvalidState(
                "restore into a started guest".into(),
            ));
        }
        if !self.inner.header_ok() {
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
            for (d, (id, _)) in self.inner.disks.iter().zip(&self.incoming_disks) {
                if let Some(id) = id {
                    d.adopt(*id).map_err(|e| GuestError::Io {
                        what: "writing image metadata".into(),
                        source: std::io::Error::other(ferry_core::engine::error_chain(&e)),
                    })?;
                }
            }
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
        r.ok = r.problems.is_empty();
        Some(r)
    }

    fn discard(&self) {
        self.stop();
        for (i, d) in self.inner.disks.iter().enumerate() {
            d.retire();
            // Images created for this migration go; a pre-existing one (a base) stays,
            // its metadata already removed by `prepare_disk`, so it is never trusted.
            let created = self.incoming_disks.get(i).is_none_or(|(_, c)| *c);
            if created {
                let _ = std::fs::remove_file(d.path());
                let _ = std::fs::remove_file(ferry_core::image::sidecar_path(d.path()));
            }
        }
    }
}
