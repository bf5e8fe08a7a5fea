//! Network namespaces: created and configured with `ip` (iproute2), entered per thread
//! with `setns(2)`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use crate::WanError;

/// A named network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Namespace {
    /// Its name (`ip netns exec NAME ...`).
    pub name: String,
}

/// Runs an iproute2 tool (`ip`, `tc`); its error output becomes the error.
fn iproute2(tool: &str, args: &[&str]) -> Result<(), WanError> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        WanError::Setup(format!(
            "running {tool} {}: {e} (is iproute2 installed?)",
            args.join(" ")
        ))
    })?;
    if !out.status.success() {
        return Err(WanError::Setup(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), WanError> {
    iproute2("ip", args)
}

/// Deletes namespaces `ferry-*-a`/`-b` whose tag carries the process id of a process that
/// no longer runs (left by a run that was killed before it could clean up).
pub fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(tag) = name
            .strip_prefix("ferry-")
            .and_then(|t| t.strip_suffix("-a").or_else(|| t.strip_suffix("-b")))
        else {
            continue;
        };
        let pid: String = tag.chars().filter(char::is_ascii_digit).collect();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Namespace {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Self, WanError> {
        // A namespace left by a killed run is replaced.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Gives `dev` (in this namespace) an address and MTU, and brings it up.
    pub fn configure(&self, dev: &str, cidr: &str, mtu: u32) -> Result<(), WanError> {
        ip(&["-n", &self.name, "addr", "add", cidr, "dev", dev])?;
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            dev,
            "mtu",
            &mtu.to_string(),
            "up",
        ])
    }

    /// Shapes this namespace's loopback to `bytes_per_s` with a `tbf` qdisc: every
    /// connection inside the namespace then shares one link of that rate (no delay or
    /// loss; see `wan-notes`), which both sides of a local comparison see alike.
    pub fn shape_loopback(&self, bytes_per_s: u64) -> Result<(), WanError> {
        let bits = bytes_per_s.saturating_mul(8).to_string();
        // The bucket holds at least two of loopback's 64 KiB packets (a smaller one never
        // passes them) and 20 ms at the rate.
        let burst = (bytes_per_s / 50).max(128 << 10).to_string();
        let args = [
            "-n", &self.name, "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", &bits,
            "burst", &burst, "latency", "200ms",
        ];
        let out = Command::new("tc")
            .args(args)
            .output()
            .map_err(|e| WanError::Setup(format!("running tc: {e} (is iproute2 installed?)")))?;
        if !out.status.success() {
            return Err(WanError::Setup(format!(
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Runs `f` on the calling thread inside this namespace, then returns to the original.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T, WanError> {
        let here = File::open("/proc/thread-self/ns/net")
            .map_err(|e| WanError::Setup(format!("opening this thread's namespace: {e}")))?;
        let there = File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| WanError::Setup(format!("opening namespace {}: {e}", self.name)))?;
        setns(&there)?;
        let out = f();
        setns(&here)?;
        Ok(out)
    }

    /// Moves the calling thread into this namespace for good (for worker threads).
    pub fn join(&self) -> Result<(), WanError> {
        let there = File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| WanError::Setup(format!("opening namespace {}: {e}", self.name)))?;
        setns(&there)
    }
}

fn setns(f: &File) -> Result<(), WanError> {
    // SAFETY: setns with a valid namespace fd only changes this thread's namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(WanError::Setup(format!(
            "setns: {} (needs root)",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
