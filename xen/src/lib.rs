//! Ferry's Xen backend: a Xen domain (PVH or HVM) as the engine's source or destination
//! guest, over libxenctrl and libxenforeignmemory.
//!
//! Built only with the `xen` feature (it links `xenctrl-sys`, GPL-3.0-only, and needs
//! Debian's `libxen-dev` 4.17 and `libclang-dev` for bindgen). Without it this crate is a
//! stub that says so, and no other part of Ferry depends on it by default.
//!
//! - [`ctrl`]: the libxenctrl calls (log-dirty, dirty bitmaps, foreign mapping, pause,
//!   HVM context and params, TSC info).
//! - [`domain`]: [`domain::XenGuest`], the source and destination seams.
//! - [`disks`]: the guest's disks served by Ferry through `/dev/nbdN` to blkback.
//! - [`state`]: the versioned state blob.
//! - [`probe`]: the backend's smoke checks on a live domain.
//! - [`watch`]: the guest's service interruption as the hypervisor sees it (any tool).

#[cfg(feature = "xen")]
pub mod ctrl;
#[cfg(feature = "xen")]
pub mod disks;
#[cfg(feature = "xen")]
pub mod domain;
#[cfg(feature = "xen")]
pub mod probe;
pub mod state;
#[cfg(feature = "xen")]
pub mod watch;

/// Backend name in the handshake.
pub const BACKEND: &str = "xen";

/// An error of the Xen backend.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// This build has no Xen support, or Xen cannot be used here.
    #[error("Xen is not available: {0}")]
    Unavailable(String),
    /// A libxenctrl call failed.
    #[error("{call} (domain {dom}): {source}")]
    Call {
        /// The call.
        call: &'static str,
        /// The domain.
        dom: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such domain.
    #[error("no domain {0}")]
    NoDomain(String),
    /// The domain cannot be handled this way.
    #[error("{0}")]
    Unsupported(String),
}

/// Whether this build can drive Xen.
pub fn built_with_xen() -> bool {
    cfg!(feature = "xen")
}

/// Finds a domain's id from its name (through `xl domid`) or a number.
pub fn resolve_domain(name: &str) -> Result<u32, XenError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let out = std::process::Command::new("xl")
        .args(["domid", name])
        .output()
        .map_err(|e| XenError::Unavailable(format!("running xl domid: {e}")))?;
    if !out.status.success() {
        return Err(XenError::NoDomain(format!(
            "{name:?} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| XenError::NoDomain(name.to_string()))
}

/// Creates a domain from `config` with `xl create` (`paused`: `-p`, to receive a guest
/// into), optionally renamed (so a copy can be received on the source's own host) and
/// with an extra `KEY=VALUE` setting (the disks Ferry serves), and returns its id.
pub fn create_domain(
    config: &std::path::Path,
    name: Option<&str>,
    setting: Option<&str>,
    paused: bool,
) -> Result<u32, XenError> {
    // `xl create` fails now and then while another guest boots on a slow (emulated) host;
    // a failed create leaves nothing behind, so it is tried three times.
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let mut cmd = std::process::Command::new("xl");
        cmd.arg("create");
        if paused {
            cmd.arg("-p");
        }
        cmd.arg(config);
        if let Some(n) = name {
            cmd.arg(format!("name=\"{n}\""));
        }
        cmd.args(setting);
        let out = cmd
            .output()
            .map_err(|e| XenError::Unavailable(format!("running xl create: {e}")))?;
        if out.status.success() {
            last.clear();
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        tracing::warn!("xl create {} failed: {last}", config.display());
    }
    if !last.is_empty() {
        return Err(XenError::Unsupported(format!(
            "xl create {}: {last}",
            config.display()
        )));
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => config_name(config)?,
    };
    resolve_domain(&name)
}

/// The `name = "..."` of an xl configuration file.
pub fn config_name(config: &std::path::Path) -> Result<String, XenError> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| XenError::Unsupported(format!("--domain-config {}: {e}", config.display())))?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "name")
        .map(|(_, v)| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            XenError::Unsupported(format!(
                "--domain-config {}: no name = \"...\"",
                config.display()
            ))
        })
}
