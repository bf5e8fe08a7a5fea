//! TUN devices: opened while the thread is inside the namespace the device must live in
//! (a TUN belongs to the namespace current when `/dev/net/tun` was opened).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::ns::Namespace;
use crate::WanError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens TUN device `dev` inside `ns`; the device vanishes when the file is closed.
pub fn open_in(ns: &Namespace, dev: &str) -> Result<File, WanError> {
    if dev.len() >= libc::IFNAMSIZ {
        return Err(WanError::Setup(format!("device name {dev:?} too long")));
    }
    ns.enter(|| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| WanError::Setup(format!("opening /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r != 0 {
            return Err(WanError::Setup(format!(
                "TUNSETIFF {dev}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(f)
    })?
}

/// Waits up to `ms` for `f` to be readable.
pub fn readable(f: &File, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}
