//! A disk image as a local block device, `/dev/nbdN`, through Linux's `nbd` driver: the
//! driver is handed one end of a socket pair by ioctl (no handshake) and Ferry serves the
//! other end with [`crate::nbd::serve_transmission`]. Xen's blkback (a `phy:` disk) or
//! anything else in dom0 then does its I/O through Ferry, which logs every write.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::image::DiskImage;
use crate::nbd::{self, NbdError, WriteLimit};

// The driver's ioctls (`_IO(0xab, n)`, include/uapi/linux/nbd.h).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// How long the device may take to come up after `NBD_DO_IT`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an image could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No `nbd` devices: the module is not loaded.
    #[error("no /dev/nbd devices: load the nbd module (modprobe nbd)")]
    NoDriver,
    /// Every device is in use.
    #[error("all {0} /dev/nbd devices are in use (modprobe nbd nbds_max=N for more)")]
    AllBusy(usize),
    /// A device call failed.
    #[error("{what} {dev}: {source}")]
    Device {
        /// The call.
        what: &'static str,
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device did not come up.
    #[error("{0} did not come up within {READY_TIMEOUT:?}")]
    NotReady(String),
}

/// An image attached as `/dev/nbdN`, served by this process until dropped.
pub struct KernelNbd {
    path: PathBuf,
    dev: Arc<File>,
    driver: Option<JoinHandle<()>>,
    server: Option<JoinHandle<Result<nbd::Served, NbdError>>>,
}

fn ioctl(dev: &File, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the nbd ioctls used here take an integer argument (or none), never a
    // pointer, on a file descriptor we own.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The `nbd` devices present, in number order.
fn devices() -> Vec<String> {
    let mut n: Vec<u32> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("nbd")?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    n.sort_unstable();
    n.into_iter().map(|i| format!("nbd{i}")).collect()
}

impl KernelNbd {
    /// Attaches `image` to the first free `/dev/nbdN` and serves it on two threads (the
    /// driver's `NBD_DO_IT` and Ferry's server); returns once the device is usable.
    pub fn attach(image: Arc<DiskImage>, limit: Arc<WriteLimit>) -> Result<Self, AttachError> {
        let names = devices();
        if names.is_empty() {
            return Err(AttachError::NoDriver);
        }
        for name in &names {
            // A connected device has a server pid.
            if Path::new(&format!("/sys/block/{name}/pid")).exists() {
                continue;
            }
            let path = PathBuf::from(format!("/dev/{name}"));
            let dev_err = |what: &'static str| {
                let dev = path.display().to_string();
                move |source| AttachError::Device { what, dev, source }
            };
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(dev_err("opening"))?;
            let (ours, theirs) = UnixStream::pair().map_err(dev_err("socketpair for"))?;
            // The socket first: it claims the device (EBUSY when another process got it
            // between the check and now), so nothing of another user's device changes.
            match ioctl(&dev, NBD_SET_SOCK, theirs.as_raw_fd() as libc::c_ulong) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => return Err(dev_err("NBD_SET_SOCK")(e)),
            }
            // The driver holds its own reference to the socket now.
            drop(theirs);
            let bs = libc::c_ulong::from(image.block_size());
            let configured = ioctl(&dev, NBD_SET_BLKSIZE, bs)
                .map_err(dev_err("NBD_SET_BLKSIZE"))
                .and_then(|()| {
                    ioctl(&dev, NBD_SET_SIZE_BLOCKS, image.blocks() as libc::c_ulong)
                        .map_err(dev_err("NBD_SET_SIZE_BLOCKS"))
                })
                .and_then(|()| {
                    let flags = libc::c_ulong::from(nbd::TRANSMISSION_FLAGS);
                    ioctl(&dev, NBD_SET_FLAGS, flags).map_err(dev_err("NBD_SET_FLAGS"))
                });
            if let Err(e) = configured {
                let _ = ioctl(&dev, NBD_CLEAR_SOCK, 0);
                return Err(e);
            }
            let dev = Arc::new(dev);
            let server = {
                let image = Arc::clone(&image);
                std::thread::Builder::new()
                    .name(format!("ferry-{name}"))
                    .spawn(move || nbd::serve_transmission(ours, &image, &limit))
                    .map_err(dev_err("starting the server for"))?
            };
            let driver = {
                let dev = Arc::clone(&dev);
                let name = name.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-{name}-do-it"))
                    .spawn(move || {
                        // Blocks until the device is disconnected.
                        if let Err(e) = ioctl(&dev, NBD_DO_IT, 0) {
                            tracing::debug!("NBD_DO_IT {name}: {e}");
                        }
                        let _ = ioctl(&dev, NBD_CLEAR_SOCK, 0);
                    })
                    .map_err(dev_err("starting the driver thread for"))?
            };
            let attached = Self {
                path,
                dev,
                driver: Some(driver),
                server: Some(server),
            };
            let pid = format!("/sys/block/{name}/pid");
            let deadline = Instant::now() + READY_TIMEOUT;
            while !Path::new(&pid).exists() {
                if Instant::now() > deadline {
                    return Err(AttachError::NotReady(attached.path.display().to_string()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return Ok(attached);
        }
        Err(AttachError::AllBusy(names.len()))
    }

    /// The block device, `/dev/nbdN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disconnects the device (its users see I/O errors from now on) and waits for both
    /// threads; returns what the server did.
    pub fn detach(mut self) -> Result<nbd::Served, NbdError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<nbd::Served, NbdError> {
        if let Err(e) = ioctl(&self.dev, NBD_DISCONNECT, 0) {
            tracing::warn!("NBD_DISCONNECT {}: {e}", self.path.display());
        }
        if let Some(d) = self.driver.take() {
            let _ = d.join();
        }
        match self.server.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(NbdError::Io {
                what: "serving the device",
                source: std::io::Error::other("the server thread panicked"),
            }),
            None => Ok(nbd::Served::default()),
        }
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        if self.driver.is_some() {
            if let Err(e) = self.stop() {
                tracing::warn!("{}: {e}", self.path.display());
            }
        }
    }
}
