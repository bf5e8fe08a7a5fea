//! Memory post-copy from the command line: the operator's switch of a hybrid migration,
//! the KVM guest in post-copy and hybrid, and the errors an operator gets.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

fn uffd_here() -> bool {
    // What the destination process will do: open userfaultfd for kernel faults too.
    let ok = userfaultfd::UffdBuilder::new()
        .user_mode_only(false)
        .create()
        .is_ok();
    if !ok {
        eprintln!("skipped: userfaultfd is not available to this user");
    }
    ok
}

/// Starts `ferry migrate --json` of the guest at `src_ctl` to `addr` over 100 Mbit/s with
/// `extra` flags, and returns once the source says it is migrating.
fn start_migration(src_ctl: &Path, addr: &str, extra: &[&str]) -> Child {
    let mut flags = vec!["--max-bandwidth", "100Mbit"];
    flags.extend_from_slice(extra);
    let mig = spawn_migrate(src_ctl, addr, &flags);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(src_ctl)["state"] != "migrating" {
        assert!(Instant::now() < deadline, "the migration never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    mig
}

/// `ferry postcopy --vm SOURCE` moves a running hybrid migration to post-copy: the rest
/// of memory moves after the hand-over and the guest verifies there. Asked of a guest
/// that is not migrating, or of a pre-copy migration, it says why not.
#[test]
fn the_operator_switches_a_hybrid_migration_to_postcopy() {
    if !uffd_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut src, src_ctl) = run_guest(dir.path(), &["--fill", "random", "--dirty-rate", "2000"]);
    let (mut dst, addr, dst_ctl) = listen(dir.path(), "10s");
    let refused = ferry()
        .args(["postcopy", "--json", "--vm"])
        .arg(&src_ctl)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        json_of(&refused)["message"]
            .as_str()
            .unwrap()
            .contains("no migration is running"),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    // 64 MiB of random memory over 100 Mbit/s: the first pass alone takes ~5 s.
    let mig = start_migration(&src_ctl, &addr, &["--memory-mode", "hybrid"]);
    std::thread::sleep(Duration::from_millis(300));
    let out = ferry()
        .args(["postcopy", "--json", "--vm"])
        .arg(&src_ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let done = mig.wait_with_output().unwrap();
    let r = json_of(&done);
    assert!(done.status.success(), "{r}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["memory_mode"], "hybrid");
    assert_eq!(r["stop_reason"], "requested", "{r}");
    assert!(r["switch_round"].is_u64(), "{r}");
    let owed = r["pages_postcopy"].as_u64().unwrap();
    assert!(owed > 0, "{r}");
    assert_eq!(
        r["pages_pushed"].as_u64().unwrap() + r["pages_demanded"].as_u64().unwrap(),
        owed,
        "{r}"
    );
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    assert_advancing(&dst_ctl, "destination after post-copy");
    assert_check_passes(&dst_ctl, "destination after post-copy");
    stop_and_wait(&mut dst, &dst_ctl);

    // A pre-copy migration does not switch.
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let (mut src, src_ctl) = run_guest(&again, &["--fill", "random"]);
    let (mut dst, addr, dst_ctl) = listen(&again, "10s");
    let mig = start_migration(&src_ctl, &addr, &[]);
    let out = ferry()
        .args(["postcopy", "--json", "--vm"])
        .arg(&src_ctl)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = json_of(&out)["message"].as_str().unwrap().to_string();
    assert!(msg.contains("--memory-mode precopy"), "{msg}");
    let done = mig.wait_with_output().unwrap();
    assert!(done.status.success());
    assert_eq!(json_of(&done)["pages_postcopy"], 0);
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    stop_and_wait(&mut dst, &dst_ctl);
}

/// The KVM guest migrates in post-copy and in hybrid mode: its vCPUs fault on pages that
/// have not arrived (userfaultfd), and its own check passes on the destination.
#[test]
fn a_kvm_guest_migrates_in_postcopy_and_hybrid() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return;
    }
    if !uffd_here() {
        return;
    }
    for mode in ["postcopy", "hybrid"] {
        let out = ferry()
            .args(["demo", "--backend", "kvm", "--threads", "2"])
            .args([
                "--memory",
                "64MiB",
                "--disk-size",
                "8MiB",
                "--warmup",
                "300ms",
            ])
            .args([
                "--memory-mode",
                mode,
                "--max-bandwidth",
                "400Mbit",
                "--json",
            ])
            .output()
            .unwrap();
        let r = json_of(&out);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["verified"], true, "{mode}");
        assert_eq!(r["oracle"]["ok"], true, "{mode}");
        assert_eq!(r["memory_mode"], mode);
        if mode == "postcopy" {
            assert_eq!(r["pages_postcopy"], 64 * 256, "{r}");
            assert!(r["postcopy_faults"].as_u64().unwrap() > 0, "{r}");
        }
    }
}
