//! A Xen guest's disks, served by Ferry in dom0: every image is attached as `/dev/nbdN`
//! through Linux's nbd driver (see `ferry_disk::kernel_nbd`) and given to the domain as a
//! `phy:` disk, so blkback's I/O for the guest goes through Ferry, which marks the block
//! log (the migration in progress) and the generation log (incremental migration back) on
//! every write — the block back-end of the paper, in user space.

use std::sync::{Arc, Mutex};

use ferry_core::guest::GuestError;
use ferry_disk::kernel_nbd::KernelNbd;
use ferry_disk::nbd::WriteLimit;
use ferry_disk::GuestDisks;

use crate::XenError;

/// The guest's disks and the devices serving them.
pub struct ServedDisks {
    /// The images and their logs.
    pub disks: GuestDisks,
    devices: Mutex<Vec<KernelNbd>>,
    limit: Arc<WriteLimit>,
    /// The xl `disk = [...]` the domain is created with.
    spec: String,
}

impl ServedDisks {
    /// Attaches every image of `disks` to a free `/dev/nbdN`.
    pub fn serve(disks: GuestDisks) -> Result<Self, XenError> {
        if disks.images().len() > 26 {
            return Err(XenError::Unsupported(
                "at most 26 disks (xvda..xvdz)".into(),
            ));
        }
        let limit = Arc::new(WriteLimit::default());
        let mut devices = Vec::new();
        let mut targets = Vec::new();
        for (i, img) in disks.images().iter().enumerate() {
            let dev = KernelNbd::attach(Arc::clone(img), Arc::clone(&limit)).map_err(|e| {
                XenError::Unavailable(format!("serving {}: {e}", img.path().display()))
            })?;
            // xvda, xvdb, ...: the same virtual devices on every host.
            let vdev = format!("xvd{}", char::from(b'a' + i as u8));
            targets.push(format!("'phy:{},{vdev},w'", dev.path().display()));
            devices.push(dev);
        }
        Ok(Self {
            disks,
            devices: Mutex::new(devices),
            limit,
            spec: format!("disk=[{}]", targets.join(",")),
        })
    }

    /// The `xl create` override that gives the domain these disks.
    pub fn xl_override(&self) -> &str {
        &self.spec
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.disks.images().is_empty()
    }

    /// Caps the guest's disk writes (blocks per second).
    pub fn limit_writes(&self, blocks_per_second: Option<u64>) {
        self.limit.set(blocks_per_second);
    }

    /// Disconnects every device (the domain using them must be gone) and waits until
    /// every write it sent is in the image.
    pub fn detach(&self) {
        let devices = std::mem::take(&mut *self.devices.lock().unwrap_or_else(|p| p.into_inner()));
        for d in devices {
            let path = d.path().display().to_string();
            match d.detach() {
                Ok(s) => tracing::debug!("{path}: {s:?}"),
                Err(e) => tracing::warn!("{path}: {e}"),
            }
        }
    }

    /// The source handed over: the images stop here and become the base of an
    /// incremental migration back.
    pub fn hand_over(&self) {
        self.detach();
        self.disks.hand_over();
    }

    /// The guest stopped here for good: images closed, history trusted later.
    pub fn close(&self) {
        self.detach();
        self.disks.close();
    }

    /// A received guest is thrown away.
    pub fn discard(&self) {
        self.detach();
        self.disks.discard();
    }

    /// The received guest starts here.
    pub fn adopt(&self) -> Result<(), GuestError> {
        self.disks.adopt_incoming()
    }
}
