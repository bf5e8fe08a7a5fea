//! The operator's control of a running migration from another terminal: `ferry status`
//! while it runs, `ferry set` changing its bandwidth cap, `ferry cancel` in each phase.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `ferry run` with `memory` of guest memory and a `disk` disk at `dir/src.img`.
fn guest(dir: &Path, memory: &str, disk: &str, extra: &[&str]) -> (Proc, std::path::PathBuf) {
    let ctl = dir.join("src.sock");
    let child = ferry()
        .args(["run", "--memory", memory, "--disk-size", disk, "--disk"])
        .arg(dir.join("src.img"))
        .arg("--control")
        .arg(&ctl)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&ctl);
    (Proc(child), ctl)
}

fn start_migration(src_ctl: &Path, addr: &str, cap: &str) -> Child {
    spawn_migrate(src_ctl, addr, &["--max-bandwidth", cap])
}

/// The running migration's status, once it is in `phase`.
fn wait_phase(ctl: &Path, phase: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(ctl);
        if s["migration"]["phase"] == phase {
            return s["migration"].clone();
        }
        assert!(Instant::now() < deadline, "never reached {phase}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn request(what: &[&str], ctl: &Path) -> (bool, serde_json::Value) {
    let out = ferry()
        .args(what)
        .args(["--json", "--vm"])
        .arg(ctl)
        .output()
        .unwrap();
    (out.status.success(), json_of(&out))
}

/// Cancelled in storage pre-copy and in memory pre-copy over a 50 Mbit/s cap: the
/// source keeps running and passes its check, the report says `cancelled`, and the
/// destination discards what it received, leaving its directory empty.
#[test]
fn a_migration_is_cancelled_in_each_phase() {
    for (phase, memory, disk, extra) in [
        ("storage", "32MiB", "64MiB", &["--disk-used", "1"][..]),
        ("memory", "64MiB", "4MiB", &["--fill", "random"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, src_ctl) = guest(dir.path(), memory, disk, extra);
        let (mut dst, addr, _dst_ctl) = listen(dir.path(), "10s");
        let (ok, nothing) = request(&["cancel"], &src_ctl);
        assert!(
            !ok && nothing["message"]
                .as_str()
                .unwrap()
                .contains("no migration")
        );
        let mig = start_migration(&src_ctl, &addr, "50Mbit");
        let first = wait_phase(&src_ctl, phase);
        std::thread::sleep(Duration::from_millis(600));
        let second = status(&src_ctl)["migration"].clone();
        // The status advances while the migration runs.
        assert_eq!(second["phase"], phase, "{second}");
        assert!(
            second["bytes_on_wire"].as_u64().unwrap() > first["bytes_on_wire"].as_u64().unwrap(),
            "{first} then {second}"
        );
        let (ok, answer) = request(&["cancel"], &src_ctl);
        assert!(ok, "{phase}: {answer}");
        let out = mig.wait_with_output().unwrap();
        let r = json_of(&out);
        assert_eq!(out.status.code(), Some(1), "{phase}: {r}");
        assert_eq!(r["cancelled"], true, "{phase}: {r}");
        assert_eq!(r["source_resumed"], true, "{phase}: {r}");
        assert_eq!(status(&src_ctl)["state"], "running", "{phase}");
        assert_advancing(&src_ctl, &format!("{phase}: source after the cancel"));
        assert_check_passes(&src_ctl, &format!("{phase}: source after the cancel"));
        // The destination discarded everything and left.
        assert_eq!(
            wait_exit(&mut dst, Duration::from_secs(10)),
            Some(1),
            "{phase}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path().join("dst"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{phase}: the destination left {left:?}");
        stop_and_wait(&mut src, &src_ctl);
    }
}

/// `ferry set --max-bandwidth` changes a running migration's rate on the wire, and bad
/// values are refused naming the flag.
#[test]
fn set_changes_the_rate_of_a_running_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, src_ctl) = guest(dir.path(), "128MiB", "4MiB", &["--fill", "random"]);
    let (mut dst, addr, _dst_ctl) = listen(dir.path(), "10s");
    let mig = start_migration(&src_ctl, &addr, "20Mbit");
    wait_phase(&src_ctl, "memory");
    let bytes = || {
        status(&src_ctl)["migration"]["bytes_on_wire"]
            .as_u64()
            .unwrap()
    };
    let over = |d: Duration| {
        let a = bytes();
        std::thread::sleep(d);
        bytes() - a
    };
    let slow = over(Duration::from_millis(1500));
    let bad = ferry()
        .args(["set", "--max-bandwidth", "fast", "--vm"])
        .arg(&src_ctl)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--max-bandwidth"));
    let (ok, answer) = request(&["set", "--max-bandwidth", "200Mbit"], &src_ctl);
    assert!(ok, "{answer}");
    std::thread::sleep(Duration::from_millis(300));
    let fast = over(Duration::from_millis(1500));
    assert!(
        fast > 3 * slow,
        "{slow} bytes in 1.5 s at 20 Mbit/s, then {fast} at 200 Mbit/s"
    );
    let (ok, _) = request(&["cancel"], &src_ctl);
    assert!(ok);
    let out = mig.wait_with_output().unwrap();
    assert_eq!(json_of(&out)["cancelled"], true);
    assert_eq!(wait_exit(&mut dst, Duration::from_secs(10)), Some(1));
    stop_and_wait(&mut src, &src_ctl);
}
