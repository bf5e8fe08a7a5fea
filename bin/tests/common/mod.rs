//! Helpers shared by the `ferry` binary's integration tests: real processes, real
//! loopback sockets, real files.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

pub fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `ferry run` with a 64 MiB guest and a 16 MiB disk in `dir`.
pub fn run_guest(dir: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let ctl = dir.join("src.sock");
    let p = run_guest_at(&dir.join("src.img"), &ctl, extra, &[]);
    (p, ctl)
}

/// Starts `ferry run` with a 64 MiB guest, a 16 MiB disk `disk` and control socket `ctl`,
/// with extra flags and environment.
pub fn run_guest_at(disk: &Path, ctl: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let child = ferry()
        .args(["run", "--memory", "64MiB", "--disk-size", "16MiB", "--disk"])
        .arg(disk)
        .arg("--control")
        .arg(ctl)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(ctl);
    Proc(child)
}

/// Plain TCP: these tests freeze and inspect the frames on the wire.
pub const PLAIN: [&str; 3] = ["--transport", "tcp", "--insecure"];

/// Starts `ferry listen` over plain TCP; returns the process, its address and its control
/// socket.
pub fn listen(dir: &Path, timeout: &str) -> (Proc, String, PathBuf) {
    listen_with(dir, timeout, "127.0.0.1:0", &PLAIN)
}

/// Starts `ferry listen` on `bind` with transport flags `peer`.
pub fn listen_with(
    dir: &Path,
    timeout: &str,
    bind: &str,
    peer: &[&str],
) -> (Proc, String, PathBuf) {
    let ctl = dir.join("dst.sock");
    let (p, addr) = listen_in(&dir.join("dst"), &ctl, timeout, bind, peer, &[]);
    (p, addr, ctl)
}

/// Starts `ferry listen --dir DEST --control CTL` with extra environment `env`; returns
/// the process and the address it listens on.
pub fn listen_in(
    dest: &Path,
    ctl: &Path,
    timeout: &str,
    bind: &str,
    peer: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String) {
    let mut child = ferry()
        .args(["listen", "--bind", bind, "--timeout", timeout, "--dir"])
        .arg(dest)
        .arg("--control")
        .arg(ctl)
        .args(peer)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("ferry: listening on ") {
                let _ = tx.send(a.to_string());
            } else {
                eprintln!("[listen] {line}");
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    (Proc(child), addr)
}

/// `ferry migrate --json --timeout TIMEOUT --vm CTL --to ADDR`.
pub fn migrate_with_timeout(ctl: &Path, to: &str, timeout: &str) -> Output {
    ferry()
        .args(["migrate", "--json", "--timeout", timeout])
        .args(PLAIN)
        .arg("--vm")
        .arg(ctl)
        .args(["--to", to])
        .output()
        .unwrap()
}

/// Starts `ferry migrate --json` of the guest at `ctl` to `to` over plain TCP with `extra`
/// flags, in the background (its report on the child's stdout).
pub fn spawn_migrate(ctl: &Path, to: &str, extra: &[&str]) -> std::process::Child {
    ferry()
        .args(["migrate", "--json"])
        .args(extra)
        .args(PLAIN)
        .arg("--vm")
        .arg(ctl)
        .args(["--to", to])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `ferry migrate --json` of the guest at `ctl` to `to` over plain TCP, which must succeed
/// and verify; returns the report.
pub fn migrate_verified(ctl: &Path, to: &str, extra: &[&str]) -> Value {
    let out = ferry()
        .args(["migrate", "--json"])
        .args(PLAIN)
        .args(extra)
        .arg("--vm")
        .arg(ctl)
        .args(["--to", to])
        .output()
        .unwrap();
    let r = json_of(&out);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["ok"], true);
    assert_eq!(r["verified"], true);
    r
}

/// `ferry migrate --json` of a new 32 MiB guest (8 MiB disk) started here, to `to`, with
/// `--timeout TIMEOUT` and transport flags `peer`.
pub fn migrate_new_guest(to: &str, timeout: &str, peer: &[&str]) -> Output {
    ferry()
        .args([
            "migrate",
            "--json",
            "--memory",
            "32MiB",
            "--disk-size",
            "8MiB",
            "--warmup",
            "200ms",
            "--timeout",
            timeout,
            "--to",
            to,
        ])
        .args(peer)
        .output()
        .unwrap()
}

pub fn status(ctl: &Path) -> Value {
    json_of(
        &ferry()
            .args(["status", "--json", "--vm"])
            .arg(ctl)
            .output()
            .unwrap(),
    )
}

pub fn page_writes(ctl: &Path) -> u64 {
    status(ctl)["progress"]["page_writes"].as_u64().unwrap()
}

pub fn assert_advancing(ctl: &Path, what: &str) {
    let a = page_writes(ctl);
    std::thread::sleep(Duration::from_millis(300));
    let b = page_writes(ctl);
    assert!(b > a, "{what}: workload not advancing ({a} -> {b})");
}

pub fn assert_check_passes(ctl: &Path, what: &str) {
    let out = ferry()
        .args(["check", "--json", "--vm"])
        .arg(ctl)
        .output()
        .unwrap();
    let v = json_of(&out);
    assert!(
        out.status.success() && v["ok"] == true,
        "{what}: self-check failed: {v}"
    );
    assert!(
        v["pages_checked"].as_u64().unwrap() > 0,
        "{what}: nothing checked"
    );
}

/// `ferry stop` of the guest at `ctl`, whose process must then exit cleanly.
pub fn stop_and_wait(p: &mut Proc, ctl: &Path) {
    ferry().args(["stop", "--vm"]).arg(ctl).output().unwrap();
    assert_eq!(wait_exit(p, Duration::from_secs(10)), Some(0));
}

pub fn wait_exit(p: &mut Proc, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `ferry keygen` of `name` in `dir`: (certificate, key, fingerprint).
pub fn keygen(dir: &Path, name: &str) -> (String, String, String) {
    let out = ferry()
        .args(["keygen", "--json", "--out"])
        .arg(dir)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    (s("cert"), s("key"), s("fingerprint"))
}

/// Whether the tests run as root (the effective uid, read from /proc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
