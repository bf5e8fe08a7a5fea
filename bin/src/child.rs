//! A destination `ferry listen` in a child process on this machine (for `demo` and
//! `bench`): a real second process, as a real second host would be.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running destination process.
pub struct Destination {
    child: Child,
    /// Address it listens on.
    pub addr: String,
    /// Its control socket.
    pub control: PathBuf,
    _dir: tempfile::TempDir,
}

impl Destination {
    /// Starts `ferry listen` on a free loopback port with a control socket, and waits until
    /// it is listening. Its stderr is forwarded, prefixed.
    pub fn spawn(timeout: &str, peer: &crate::auth::PeerArgs) -> anyhow::Result<Self> {
        Self::spawn_at(timeout, peer, None, "127.0.0.1:0")
    }

    /// Like [`Destination::spawn`], inside network namespace `netns` (via `ip netns exec`)
    /// and bound to `bind`.
    pub fn spawn_at(
        timeout: &str,
        peer: &crate::auth::PeerArgs,
        netns: Option<&str>,
        bind: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-dest-")
            .tempdir()
            .context("creating the destination's directory")?;
        let control = dir.path().join("control.sock");
        let exe = std::env::current_exe().context("finding the ferry executable")?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(["listen", "--bind", bind, "--timeout", timeout, "--dir"])
            .arg(dir.path().join("images"))
            .arg("--control")
            .arg(&control)
            .args(peer.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the destination process")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(addr) = line.strip_prefix("ferry: listening on ") {
                        let _ = tx.send(addr.trim().to_string());
                        sent = true;
                        continue;
                    }
                }
                eprintln!("  [destination] {line}");
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) if !control.exists() => {
                let _ = child.kill();
                anyhow::bail!(
                    "the destination did not create its control socket (listening on {a})"
                );
            }
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                anyhow::bail!("the destination process did not start listening");
            }
        };
        Ok(Self {
            child,
            addr,
            control,
            _dir: dir,
        })
    }

    /// Waits until the destination hosts a running guest; returns its status.
    pub fn wait_running(&self) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = crate::host::request(&self.control, &crate::host::Request::Status, |_| {})?;
            if s.get("state").and_then(|v| v.as_str()) == Some("running") {
                return Ok(s);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the destination did not start running the guest (state {})",
                    s["state"]
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (up to 10 s), then kills it.
    pub fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
