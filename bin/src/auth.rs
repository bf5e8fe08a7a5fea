//! Who the peers are: `--transport` and the authentication flags shared by `migrate`,
//! `listen` and `demo`, and `ferry keygen`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_core::transport::Transport;
use ferry_transports::{
    Congestion, Fingerprint, Identity, QuicLayout, QuicOptions, TransportOptions,
};

/// Transport and peer authentication.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct PeerArgs {
    /// Transport: `tls` (TLS 1.3, peers pinned by certificate), `quic` (same pinning),
    /// `tcp` (plain, needs `--insecure`), `unix` (a socket path on this host).
    #[arg(long, default_value = "tls")]
    pub transport: String,
    /// Accept plain `tcp`: neither encrypted nor authenticated.
    #[arg(long)]
    pub insecure: bool,
    /// Auth file (TOML: `cert`, `key`, `peers = ["sha256:…"]`), instead of the three flags.
    #[arg(long, conflicts_with_all = ["cert", "key", "peer"])]
    pub auth: Option<PathBuf>,
    /// Our certificate (PEM; `ferry keygen` makes one).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Our private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// A peer's certificate fingerprint to accept (`sha256:` and 64 hex digits); repeat
    /// for several.
    #[arg(long)]
    pub peer: Vec<String>,
    /// QUIC: `connections` (one per channel) or `streams` (N streams on one connection).
    #[arg(long, default_value = "connections")]
    #[serde(default = "default_layout")]
    pub quic_layout: String,
    /// Congestion control of the source's connections (tcp, tls, quic): `cubic`, `newreno`,
    /// or `bbr` (experimental in quinn).
    #[arg(long, default_value = "cubic")]
    #[serde(default = "default_congestion")]
    pub congestion: String,
    /// QUIC flow-control window per connection (at least the link's bandwidth-delay
    /// product).
    #[arg(long, default_value = "32MiB")]
    #[serde(default = "default_window")]
    pub quic_window: String,
}

fn default_layout() -> String {
    "connections".into()
}

fn default_congestion() -> String {
    "cubic".into()
}

fn default_window() -> String {
    "32MiB".into()
}

impl Default for PeerArgs {
    fn default() -> Self {
        Self {
            transport: "tls".into(),
            insecure: false,
            auth: None,
            cert: None,
            key: None,
            peer: Vec::new(),
            quic_layout: default_layout(),
            congestion: default_congestion(),
            quic_window: default_window(),
        }
    }
}

impl PeerArgs {
    /// Makes paths absolute, so the arguments mean the same in another process.
    pub fn absolute(mut self) -> anyhow::Result<Self> {
        let abs = |p: &mut Option<PathBuf>| -> anyhow::Result<()> {
            if let Some(path) = p {
                if path.is_relative() {
                    *path = std::env::current_dir()?.join(&*path);
                }
            }
            Ok(())
        };
        abs(&mut self.auth)?;
        abs(&mut self.cert)?;
        abs(&mut self.key)?;
        Ok(self)
    }

    /// Loads the identity the flags name, if any.
    pub fn identity(&self) -> anyhow::Result<Option<Arc<Identity>>> {
        if let Some(f) = &self.auth {
            let id = Identity::from_file(f)
                .map_err(|e| anyhow::anyhow!("--auth: {}", ferry_transports::error_chain(&e)))?;
            return Ok(Some(Arc::new(id)));
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            if !self.peer.is_empty() {
                anyhow::bail!("--peer: needs --cert and --key too");
            }
            return Ok(None);
        };
        let peers = self
            .peer
            .iter()
            .map(|p| Fingerprint::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
        let id = Identity::load(cert, key, peers).map_err(|e| {
            let flag = match &e {
                ferry_transports::auth::AuthError::NoPeers => "--peer",
                ferry_transports::auth::AuthError::Read { path, .. }
                | ferry_transports::auth::AuthError::Pem { path, .. }
                    if path == key =>
                {
                    "--key"
                }
                _ => "--cert",
            };
            anyhow::anyhow!("{flag}: {}", ferry_transports::error_chain(&e))
        })?;
        Ok(Some(Arc::new(id)))
    }

    /// Builds the transport.
    pub fn transport(&self, io_timeout: Duration) -> anyhow::Result<Box<dyn Transport>> {
        let opts = self.options(io_timeout)?;
        ferry_transports::by_name(&self.transport, &opts)
            .map_err(|e| anyhow::anyhow!("--transport {}: {e}", self.transport))
    }

    /// Checks the settings as [`Self::transport`] would, without building anything (a
    /// QUIC transport starts a runtime): a command validates once, builds once.
    pub fn check(&self, io_timeout: Duration) -> anyhow::Result<()> {
        let opts = self.options(io_timeout)?;
        ferry_transports::check(&self.transport, &opts)
            .map_err(|e| anyhow::anyhow!("--transport {}: {e}", self.transport))
    }

    /// The transport's options from the flags (identities loaded).
    fn options(&self, io_timeout: Duration) -> anyhow::Result<TransportOptions> {
        let identity = if matches!(self.transport.as_str(), "tls" | "quic") {
            self.identity()?
        } else {
            None
        };
        let quic = QuicOptions {
            layout: match self.quic_layout.as_str() {
                "streams" => QuicLayout::Streams,
                "connections" => QuicLayout::Connections,
                o => anyhow::bail!("--quic-layout: {o:?} is not streams or connections"),
            },
            congestion: Congestion::parse(&self.congestion)
                .map_err(|e| anyhow::anyhow!("--congestion: {e}"))?,
            window: crate::units::parse_size(&self.quic_window)
                .map_err(|e| anyhow::anyhow!("--quic-window: {e}"))?,
        };
        Ok(TransportOptions {
            io_timeout,
            identity,
            insecure: self.insecure,
            quic,
        })
    }

    /// The flags that repeat these settings on a `ferry listen` command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--transport".to_string(), self.transport.clone()];
        if self.insecure {
            v.push("--insecure".into());
        }
        let path = |flag: &str, p: &Option<PathBuf>, v: &mut Vec<String>| {
            if let Some(p) = p {
                v.push(flag.into());
                v.push(p.display().to_string());
            }
        };
        path("--auth", &self.auth, &mut v);
        path("--cert", &self.cert, &mut v);
        path("--key", &self.key, &mut v);
        for p in &self.peer {
            v.push("--peer".into());
            v.push(p.clone());
        }
        for (flag, value) in [
            ("--quic-layout", &self.quic_layout),
            ("--congestion", &self.congestion),
            ("--quic-window", &self.quic_window),
        ] {
            v.push(flag.into());
            v.push(value.clone());
        }
        v
    }
}

impl PeerArgs {
    /// For commands that run both ends (`demo`, `bench`): the source's and the
    /// destination's settings. With `tls` and no credentials given, a fresh pair that pins
    /// each other (kept in the returned directory); otherwise the same flags for both.
    #[allow(clippy::type_complexity)]
    pub fn for_both_ends(
        self,
    ) -> anyhow::Result<((PeerArgs, PeerArgs), Option<tempfile::TempDir>)> {
        if matches!(self.transport.as_str(), "tls" | "quic")
            && self.auth.is_none()
            && self.cert.is_none()
        {
            let (s, d, dir) = ephemeral_pair(&self)?;
            return Ok(((s, d), Some(dir)));
        }
        Ok(((self.clone(), self), None))
    }
}

/// Writes `DIR/NAME.crt`, `DIR/NAME.key` (mode 0600) and `DIR/NAME.fingerprint`; returns
/// the fingerprint.
pub fn keygen(dir: &Path, name: &str) -> anyhow::Result<Fingerprint> {
    if name.is_empty() || name.contains('/') {
        anyhow::bail!("--name: {name:?} is not a plain file name");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("--out: creating {}", dir.display()))?;
    let (_, _, fp) = ferry_transports::auth::generate_files(dir, name)
        .map_err(|e| anyhow::anyhow!("--out: {}", ferry_transports::error_chain(&e)))?;
    std::fs::write(dir.join(format!("{name}.fingerprint")), format!("{fp}\n"))?;
    Ok(fp)
}

/// Fresh identities for a source and a destination that pin each other (for `demo` and
/// `bench`, which run both ends): (source args, destination args, the directory).
pub fn ephemeral_pair(
    template: &PeerArgs,
) -> anyhow::Result<(PeerArgs, PeerArgs, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-keys-")
        .tempdir()
        .context("creating a key directory")?;
    let s = keygen(dir.path(), "source")?;
    let d = keygen(dir.path(), "destination")?;
    Ok((
        PeerArgs {
            cert: Some(dir.path().join("source.crt")),
            key: Some(dir.path().join("source.key")),
            peer: vec![d.to_string()],
            ..template.clone()
        },
        PeerArgs {
            cert: Some(dir.path().join("destination.crt")),
            key: Some(dir.path().join("destination.key")),
            peer: vec![s.to_string()],
            ..template.clone()
        },
        dir,
    ))
}
