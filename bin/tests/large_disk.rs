//! A 16 TiB sparse disk (64 KiB blocks, a few MiB of data) migrates in full, back
//! incrementally, and then hash-compared with its dirty blocks moved in post-copy: every
//! per-disk message travels in parts, and holes are never read.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const TIB16: u64 = 16 << 40;
const BLOCK: u64 = 64 << 10;
/// The sim workload keeps a ledger of 8 bytes per block in guest memory: 2 GiB for 2^28
/// blocks, plus room for its data pages.
const MEMORY: &str = "2304MiB";

/// A directory whose file system holds a sparse file of `TIB16` bytes (tmpfs does; ext4
/// stops 4 KiB short), and the disk size to use there.
fn big_dir() -> (tempfile::TempDir, u64) {
    if let Ok(d) = tempfile::Builder::new()
        .prefix("ferry-16tib-")
        .tempdir_in("/dev/shm")
    {
        let probe = d.path().join("probe");
        let ok = std::fs::File::create(&probe)
            .and_then(|f| f.set_len(TIB16))
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        if ok {
            return (d, TIB16);
        }
    }
    let d = tempfile::tempdir().unwrap();
    eprintln!("note: no file system here holds a 16 TiB file; using 16 TiB - 64 KiB");
    (d, TIB16 - BLOCK)
}

fn migrate(args: &[&str], to: &str) -> (serde_json::Value, Output) {
    let out = ferry()
        .args(["migrate", "--json", "--timeout", "60s", "--to", to])
        .args(PLAIN)
        .args(args)
        .output()
        .unwrap();
    let r = json_of(&out);
    assert!(
        r["ok"] == true && r["verified"] == true,
        "{r}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (r, out)
}

fn listener(dir: &Path, ctl: &Path) -> (Proc, String) {
    listen_in(dir, ctl, "60s", "127.0.0.1:0", &PLAIN, &[])
}

#[test]
fn a_16_tib_sparse_disk_migrates_in_full_incrementally_and_hash_compared_in_post_copy() {
    let (dir, size) = big_dir();
    let d = dir.path();
    let (a, b) = (d.join("a"), d.join("b"));
    let image: PathBuf = a.join("disk0.img");
    std::fs::create_dir_all(&a).unwrap();
    let size_s = size.to_string();
    let guest = [
        "--memory",
        MEMORY,
        "--disk-size",
        &size_s,
        "--block-size",
        "64KiB",
        "--disk-used",
        "0.000002",
        "--disk-rate",
        "2000",
        "--warmup",
        "300ms",
    ];

    // A → B: a full copy of the data blocks only.
    let (b_ctl, a_ctl) = (d.join("b.sock"), d.join("a.sock"));
    let (mut lb, addr_b) = listener(&b, &b_ctl);
    let disk = image.to_str().unwrap();
    let (r, _) = migrate(&[&guest[..], &["--disk", disk]].concat(), &addr_b);
    assert_eq!(r["disk_plans"][0], "full", "{r}");
    assert_eq!(r["disk_bytes"].as_u64().unwrap(), size);
    let full = r["blocks_sent"].as_u64().unwrap();
    eprintln!("16 TiB full copy: {full} blocks sent, {} ms", r["total_ms"]);

    // B → A: the image A handed over is the base; only what was written since moves.
    let (mut la, addr_a) = listener(&a, &a_ctl);
    let (r, _) = migrate(&["--vm", b_ctl.to_str().unwrap()], &addr_a);
    assert_eq!(r["disk_plans"][0], "incremental", "{r}");
    eprintln!(
        "16 TiB incremental back: {} blocks sent, {} ms",
        r["blocks_sent"], r["total_ms"]
    );
    let _ = wait_exit(&mut lb, Duration::from_secs(10));

    // A → B again with B's history gone: hash-compared, the rest in post-copy.
    std::fs::remove_file(b.join("disk0.img.ferry")).unwrap();
    let b2_ctl = d.join("b2.sock");
    let (mut lb2, addr_b2) = listener(&b, &b2_ctl);
    let (r, _) = migrate(
        &[
            "--vm",
            a_ctl.to_str().unwrap(),
            "--storage-mode",
            "postcopy",
        ],
        &addr_b2,
    );
    assert_eq!(r["disk_plans"][0], "hash-compared", "{r}");
    assert_eq!(r["storage_mode"], "postcopy");
    assert!(
        r["blocks_postcopy"].as_u64().unwrap() > 0,
        "nothing moved in post-copy: {r}"
    );
    eprintln!(
        "16 TiB hash-compared + post-copy: {} blocks before, {} after the hand-over, {} ms",
        r["blocks_sent"], r["blocks_postcopy"], r["total_ms"]
    );
    assert_check_passes(&b2_ctl, "destination of the 16 TiB disk");
    let _ = wait_exit(&mut la, Duration::from_secs(10));
    let _ = ferry().args(["stop", "--vm"]).arg(&b2_ctl).output();
    let _ = wait_exit(&mut lb2, Duration::from_secs(10));
}
