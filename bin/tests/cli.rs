//! The `ferry` binary as a user runs it: real processes, real loopback sockets, real files.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn two_process_migration_keeps_the_guest_running_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, src_ctl) = run_guest(dir.path(), &[]);
    let (mut dst, addr, dst_ctl) = listen(dir.path(), "10s");
    assert_eq!(status(&dst_ctl)["state"], "listening");
    assert_advancing(&src_ctl, "source before");
    let r = migrate_verified(&src_ctl, &addr, &["--codec", "lz4"]);
    for key in [
        "transport",
        "channels",
        "codec",
        "memory_bytes",
        "disk_bytes",
        "total_ms",
        "downtime_ms",
        "bytes_on_wire",
        "pages_sent",
        "blocks_sent",
        "rounds",
    ] {
        assert!(!r[key].is_null(), "report lacks {key}");
    }
    assert!(r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["phase"] == "storage"));
    // The source process is done; the destination runs the guest and stays correct.
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    assert_eq!(status(&dst_ctl)["state"], "running");
    assert_advancing(&dst_ctl, "destination after");
    assert_check_passes(&dst_ctl, "destination after");
    let img = dir.path().join("dst").join("src.img");
    assert_eq!(std::fs::metadata(img).unwrap().len(), 16 << 20);
    stop_and_wait(&mut dst, &dst_ctl);
}

#[test]
fn killing_the_destination_mid_precopy_resumes_the_source() {
    killing_the_destination_mid_precopy_resumes(&[]);
}

#[test]
fn killing_the_destination_mid_precopy_resumes_the_kvm_source() {
    if kvm_here() {
        killing_the_destination_mid_precopy_resumes(&KVM);
    }
}

fn killing_the_destination_mid_precopy_resumes(backend: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec!["--fill", "random"];
    extra.extend_from_slice(backend);
    let (_src, src_ctl) = run_guest(dir.path(), &extra);
    let (mut dst, addr, _dst_ctl) = listen(dir.path(), "10s");
    // 64 MiB at 16 MiB/s: pre-copy takes seconds, plenty of time to kill the peer in it.
    let mig = ferry()
        .args(["migrate", "--json", "--max-bandwidth", "16MiB/s"])
        .args(PLAIN)
        .arg("--vm")
        .arg(&src_ctl)
        .args(["--to", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(status(&src_ctl)["state"], "migrating");
    dst.0.kill().unwrap();
    let out = mig.wait_with_output().unwrap();
    let r = json_of(&out);
    assert!(!out.status.success());
    assert_eq!(r["ok"], false);
    assert_eq!(r["source_resumed"], true);
    assert!(r["error"].as_str().unwrap().len() > 5, "{r}");
    assert_eq!(status(&src_ctl)["state"], "running");
    assert_advancing(&src_ctl, "source after a failed migration");
    assert_check_passes(&src_ctl, "source after a failed migration");
}

/// A KVM guest with two vCPUs, each with its share of memory and disk.
const KVM: [&str; 6] = [
    "--backend",
    "kvm",
    "--threads",
    "2",
    "--dirty-rate",
    "20000",
];

fn kvm_here() -> bool {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm cannot be opened here");
        return false;
    }
    true
}

/// A running KVM guest moves between two processes over TCP while it dirties memory and
/// disk; the destination's check (one step in the page counters, the SSE copy, an
/// unbroken block sequence) passes, and the guest keeps running and passing for seconds.
#[test]
fn a_running_kvm_guest_migrates_live_between_two_processes() {
    if !kvm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut src, src_ctl) = run_guest(dir.path(), &KVM);
    let (mut dst, addr, dst_ctl) = listen(dir.path(), "10s");
    assert_eq!(status(&src_ctl)["backend"], "kvm");
    assert_advancing(&src_ctl, "KVM source before");
    // A link of 200 MiB/s: the guest dirties pages faster than a round takes, so pre-copy
    // needs several rounds.
    let r = migrate_verified(&src_ctl, &addr, &["--max-bandwidth", "200MiB/s"]);
    assert_eq!(r["oracle"]["ok"], true, "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    let memory_rounds = rounds.iter().filter(|x| x["phase"] == "memory").count();
    assert!(
        memory_rounds >= 2,
        "only {memory_rounds} memory rounds: {r}"
    );
    assert!(rounds
        .iter()
        .any(|x| x["phase"] == "storage" && x["blocks"].as_u64().unwrap() > 0));
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    let st = status(&dst_ctl);
    assert_eq!(st["state"], "running");
    assert_eq!(st["backend"], "kvm");
    assert_eq!(st["workload"]["vcpus"], 2);
    // It keeps running, and correct, for a few seconds.
    for i in 0..4 {
        assert_advancing(&dst_ctl, &format!("KVM destination, {i} s after"));
        assert_check_passes(&dst_ctl, &format!("KVM destination, {i} s after"));
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(
        status(&dst_ctl)["progress"]["block_writes"]
            .as_u64()
            .unwrap()
            > 0
    );
    stop_and_wait(&mut dst, &dst_ctl);
}

/// The KVM guest goes through the same engine as the sim guest: every transport and
/// codec works for it unchanged.
#[test]
fn kvm_demo_runs_over_each_transport_with_codecs() {
    if !kvm_here() {
        return;
    }
    for (transport, codec) in [
        ("tls", "auto"),
        ("quic", "dedup,xor-delta,lz4"),
        ("unix", "zstd"),
    ] {
        let out = ferry()
            .args([
                "demo",
                "--backend",
                "kvm",
                "--memory",
                "64MiB",
                "--disk-size",
                "16MiB",
            ])
            .args(["--warmup", "300ms", "--fill", "random", "--json"])
            .args([
                "--transport",
                transport,
                "--codec",
                codec,
                "--verify",
                "full",
            ])
            .output()
            .unwrap();
        let r = json_of(&out);
        assert!(
            out.status.success(),
            "{transport}/{codec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(r["verified"], true, "{transport}/{codec}");
        assert_eq!(r["oracle"]["ok"], true, "{transport}/{codec}");
        assert_eq!(
            r["destination_after"]["advancing"], true,
            "{transport}/{codec}"
        );
    }
}

/// A TCP forwarder whose link can be frozen (nothing moves, nothing closes), like a
/// network that stopped.
struct FreezableLink {
    addr: String,
    frozen: Arc<AtomicBool>,
}

/// When a direction of the link freezes.
#[derive(Clone, Copy)]
enum Limit {
    Never,
    /// After this many bytes.
    Bytes(u64),
    /// At the first frame of this message type (16-byte headers, type at byte 2, body
    /// length at 4..8): nothing of that frame gets through.
    AtType(u8),
}

/// Frame tracking for [`Limit::AtType`]: bytes before the first frame (the channel
/// preamble one way, the listener's one-byte answer the other), header bytes held back,
/// body bytes left.
struct FrameScan {
    lead: usize,
    header: Vec<u8>,
    body_left: usize,
}

impl FrameScan {
    /// The bytes of `buf` to forward, and whether the link must freeze now.
    fn forward(&mut self, buf: &[u8], stop_at: u8) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            if self.lead > 0 {
                let n = self.lead.min(buf.len() - i);
                out.extend_from_slice(&buf[i..i + n]);
                self.lead -= n;
                i += n;
                continue;
            }
            if self.body_left > 0 {
                let n = self.body_left.min(buf.len() - i);
                out.extend_from_slice(&buf[i..i + n]);
                self.body_left -= n;
                i += n;
                continue;
            }
            self.header.push(buf[i]);
            i += 1;
            if self.header.len() == 16 {
                if self.header[2] == stop_at {
                    return (out, true);
                }
                let h = &self.header;
                self.body_left = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
                out.append(&mut self.header);
            }
        }
        (out, false)
    }
}

impl FreezableLink {
    /// Forwards to `target`; freezes both directions when either direction passes its limit.
    fn start(target: String, fwd: Limit, back: Limit) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let d = TcpStream::connect(&target).unwrap();
                for (mut from, mut to, limit, lead) in [
                    (c.try_clone().unwrap(), d.try_clone().unwrap(), fwd, 20),
                    (d, c, back, 1),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16 << 10];
                        let mut total = 0u64;
                        let mut scan = FrameScan {
                            lead,
                            header: Vec::new(),
                            body_left: 0,
                        };
                        loop {
                            if f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Re-check after the read: it may have blocked across the freeze.
                            if f.load(Ordering::SeqCst) {
                                continue; // what crossed the line is lost: the network died
                            }
                            let (pass, freeze) = match limit {
                                Limit::Never => (buf[..n].to_vec(), false),
                                Limit::Bytes(max) => {
                                    let k = (max.saturating_sub(total) as usize).min(n);
                                    (buf[..k].to_vec(), k < n)
                                }
                                Limit::AtType(t) => scan.forward(&buf[..n], t),
                            };
                            total += n as u64;
                            if to.write_all(&pass).is_err() {
                                return;
                            }
                            if freeze {
                                f.store(true, Ordering::SeqCst);
                            }
                        }
                    });
                }
            }
        });
        Self { addr, frozen }
    }
}

#[test]
fn network_stopping_mid_precopy_resumes_the_source_and_discards_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, src_ctl) = run_guest(dir.path(), &["--fill", "random"]);
    let (mut dst, addr, _dst_ctl) = listen(dir.path(), "2s");
    let link = FreezableLink::start(addr, Limit::Bytes(30 << 20), Limit::Never);
    let out = migrate_with_timeout(&src_ctl, &link.addr, "2s");
    assert!(link.frozen.load(Ordering::SeqCst), "the link never froze");
    let r = json_of(&out);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["source_resumed"], true);
    assert_advancing(&src_ctl, "source");
    assert_check_passes(&src_ctl, "source");
    // The destination gave up on its own and kept nothing.
    assert_eq!(wait_exit(&mut dst, Duration::from_secs(15)), Some(1));
    assert!(!dir.path().join("dst").join("src.img").exists());
}

#[test]
fn network_dying_right_after_verified_leaves_one_running_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, src_ctl) = run_guest(dir.path(), &[]);
    let (_dst, addr, dst_ctl) = listen(dir.path(), "2s");
    // Everything flows until the destination's `verified` (message type 9).
    let link = FreezableLink::start(addr, Limit::Never, Limit::AtType(9));
    let out = migrate_with_timeout(&src_ctl, &link.addr, "2s");
    let r = json_of(&out);
    assert!(link.frozen.load(Ordering::SeqCst));
    // The source never saw `verified`: it still owns the guest and runs it.
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["source_resumed"], true);
    assert_advancing(&src_ctl, "source");
    // The destination acknowledged, so it can neither run nor drop the guest on its own:
    // it holds it paused, in doubt, for an operator.
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&dst_ctl)["state"] != "in-doubt" {
        assert!(
            Instant::now() < deadline,
            "destination never went in doubt: {}",
            status(&dst_ctl)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = page_writes(&dst_ctl);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(page_writes(&dst_ctl), a, "an in-doubt guest must not run");
    let out = ferry()
        .args(["discard", "--vm"])
        .arg(&dst_ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_check_passes(&src_ctl, "source");
}

#[test]
fn bad_input_names_the_flag() {
    for (args, flag) in [
        (&["demo", "--memory", "12parsecs"][..], "--memory"),
        (
            &[
                "migrate",
                "--to",
                "127.0.0.1:1",
                "--recover",
                "--transport",
                "tcp",
                "--insecure",
            ][..],
            "--disk",
        ),
        (
            &[
                "migrate",
                "--to",
                "127.0.0.1:1",
                "--recover",
                "--disk",
                "/tmp/x.img",
                "--migration-id",
                "abc",
                "--transport",
                "tcp",
                "--insecure",
            ][..],
            "--migration-id",
        ),
        (&["demo", "--codec", "lz5"][..], "--codec"),
        (&["demo", "--codec", "lz4,xor-delta"][..], "--codec"),
        (&["demo", "--codec", "zstd:99"][..], "--codec"),
        (&["demo", "--codec", "auto,lz4"][..], "--codec"),
        (&["demo", "--xor-cache", "lots"][..], "--xor-cache"),
        (&["bench", "codecs", "--codec", "dedup:1"][..], "--codec"),
        (&["demo", "--max-bandwidth", "fast"][..], "--max-bandwidth"),
        (&["demo", "--workload", "busy"][..], "--workload"),
        (&["demo", "--backend", "xen"][..], "--backend"),
        (
            &["demo", "--domain-config", "/etc/hostname"][..],
            "--domain-config",
        ),
        (
            &[
                "run",
                "--backend",
                "xen",
                "--domain-config",
                "/no/such.cfg",
                "--control",
                "/tmp/x.sock",
            ][..],
            "--domain-config",
        ),
        (
            &[
                "run",
                "--backend",
                "xen",
                "--domain",
                "d",
                "--disk",
                "/tmp/d.img",
                "--control",
                "/tmp/x.sock",
            ][..],
            "--disk",
        ),
        (&["demo", "--dirty-log", "rings"][..], "--dirty-log"),
        (
            &["demo", "--backend", "kvm", "--workload", "hotspot"][..],
            "--workload",
        ),
        (
            &["demo", "--backend", "kvm", "--memory", "1MiB"][..],
            "--memory",
        ),
        (&["demo", "--fill", "/no/such/file"][..], "--fill"),
        (&["status", "--vm", "/no/such/socket"][..], "--vm"),
        (
            &["migrate", "--to", "127.0.0.1:9", "--transport", "tcp"][..],
            "--insecure",
        ),
        (&["migrate", "--to", "127.0.0.1:9"][..], "--cert"),
        (
            &["migrate", "--to", "127.0.0.1:9", "--transport", "quic2"][..],
            "--transport",
        ),
        (
            &[
                "migrate",
                "--to",
                "x:9",
                "--cert",
                "/no/c",
                "--key",
                "/no/k",
                "--peer",
                "sha256:00",
            ][..],
            "--peer",
        ),
        (
            &[
                "migrate",
                "--to",
                "x:9",
                "--cert",
                "/no/c",
                "--key",
                "/no/k",
                "--peer",
                &"ab".repeat(32),
            ][..],
            "--cert",
        ),
        (&["keygen", "--out", "/tmp", "--name", "a/b"][..], "--name"),
        (&["wan", "--profile", "mars"][..], "--profile"),
        (&["wan", "--loss", "150%"][..], "--loss"),
        (&["wan", "--rtt", "soon"][..], "--rtt"),
        (
            &["bench", "matrix", "--transports", "pigeon"][..],
            "--transports",
        ),
        (&["bench", "matrix", "--profiles", "moon"][..], "--profiles"),
        (&["bench", "matrix", "--codecs", "lz4;lz5"][..], "--codecs"),
    ] {
        let out = ferry().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(flag),
            "{args:?}: error does not name {flag}: {err}"
        );
    }
    // A fault switch that does not parse is refused before anything starts.
    let out = ferry()
        .args(["demo", "--memory", "32MiB"])
        .env("FERRY_FAULT", "source:commit:explode")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("FERRY_FAULT") && err.contains("explode"),
        "{err}"
    );
}

/// `ferry migrate` of a new 32 MiB guest started here, to `to`, with transport flags.
fn migrate_new(to: &str, peer: &[&str]) -> Output {
    migrate_new_guest(to, "5s", peer)
}

#[test]
fn tls_admits_only_the_pinned_source_and_nothing_is_written_for_strangers() {
    pinned_peers_only("tls", "speaks TLS");
}

#[test]
fn quic_admits_only_the_pinned_source_and_nothing_is_written_for_strangers() {
    // Plain TCP finds no TCP listener on QUIC's UDP port.
    pinned_peers_only("quic", "connect");
}

fn pinned_peers_only(transport: &str, plaintext_error: &str) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (sc, sk, sfp) = keygen(&keys, "src");
    let (dc, dk, dfp) = keygen(&keys, "dst");
    let (xc, xk, xfp) = keygen(&keys, "stranger");
    let t = ["--transport", transport];
    let (mut dst, addr, dst_ctl) = listen_with(
        dir.path(),
        "10s",
        "127.0.0.1:0",
        &[&t[..], &["--cert", &dc, "--key", &dk, "--peer", &sfp]].concat(),
    );
    let refused = [
        // A source the destination never pinned.
        (
            [&t[..], &["--cert", &xc, "--key", &xk, "--peer", &dfp]].concat(),
            "refused our certificate",
        ),
        // The right source pinning the wrong destination.
        (
            [&t[..], &["--cert", &sc, "--key", &sk, "--peer", &xfp]].concat(),
            "not the pinned one",
        ),
        // Plaintext.
        (vec!["--transport", "tcp", "--insecure"], plaintext_error),
    ];
    for (flags, why) in &refused {
        let out = migrate_new(&addr, flags);
        let r = json_of(&out);
        assert_eq!(r["ok"], false, "{flags:?} was let in: {r}");
        assert_eq!(r["source_resumed"], true, "{r}");
        let err = r["error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{flags:?}: {err}");
    }
    // Nothing was received, so nothing was written; the destination still waits.
    let written: Vec<_> = std::fs::read_dir(dir.path().join("dst"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
    assert_eq!(status(&dst_ctl)["state"], "listening");
    let out = migrate_new(
        &addr,
        &[&t[..], &["--cert", &sc, "--key", &sk, "--peer", &dfp]].concat(),
    );
    let r = json_of(&out);
    assert!(r["ok"] == true && r["verified"] == true, "{r}");
    assert_eq!(r["transport"], transport);
    assert_check_passes(&dst_ctl, "destination");
    let _ = ferry().args(["stop", "--vm"]).arg(&dst_ctl).output();
    let _ = wait_exit(&mut dst, Duration::from_secs(10));
}

#[test]
fn a_unix_socket_carries_a_migration_on_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ferry.sock");
    let sock = sock.to_str().unwrap();
    let (mut dst, addr, dst_ctl) = listen_with(dir.path(), "10s", sock, &["--transport", "unix"]);
    assert_eq!(addr, sock);
    let out = migrate_new(&addr, &["--transport", "unix", "--codec", "lz4"]);
    let r = json_of(&out);
    assert!(r["ok"] == true && r["verified"] == true, "{r}");
    assert_eq!(r["transport"], "unix");
    assert_check_passes(&dst_ctl, "destination");
    let _ = ferry().args(["stop", "--vm"]).arg(&dst_ctl).output();
    let _ = wait_exit(&mut dst, Duration::from_secs(10));
}

/// `ferry bench qemu` says what is missing when QEMU is not installed, and otherwise runs
/// both tools on the same memory and reports both.
#[test]
fn bench_qemu_names_a_missing_qemu_and_compares_both_tools() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("mem.img");
    let mut content = vec![0u8; 8 << 20];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 4096 % 7) as u8;
    }
    std::fs::write(&image, &content).unwrap();
    let out = ferry()
        .args(["bench", "qemu", "--qemu", "/nonexistent/qemu", "--fill"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--qemu") && err.contains("apt-get install qemu-system-x86"),
        "{err}"
    );
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped the comparison: qemu-system-x86_64 is not installed");
        return;
    }
    let v = bench_qemu_32mib(&image, &["--codec", "raw", "--qemu-compression", "none"]);
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    for r in rows {
        assert!(r["total_ms"].as_f64().unwrap() > 0.0, "{r}");
        // 32 MiB of which 6/7 are not zero crossed the link uncompressed.
        assert!(r["wire_bytes"].as_f64().unwrap() > 20e6, "{r}");
    }
    assert_eq!(rows[0]["tool"], "qemu");
    assert_eq!(rows[1]["tool"], "ferry");

    // One shaped link both tools see: neither can beat bytes over the rate.
    if !is_root() || std::process::Command::new("tc").arg("-V").output().is_err() {
        eprintln!("skipped the shaped comparison: needs root and iproute2's tc");
        return;
    }
    let v = bench_qemu_32mib(
        &image,
        &[
            "--codec",
            "zstd",
            "--qemu-compression",
            "zstd",
            "--shape",
            "200Mbit",
        ],
    );
    assert!(v["link"].as_str().unwrap().contains("shaped"), "{v}");
    for r in v["results"].as_array().unwrap() {
        let (ms, wire) = (
            r["total_ms"].as_f64().unwrap(),
            r["wire_bytes"].as_f64().unwrap(),
        );
        let floor_ms = wire * 8.0 / 200e6 * 1e3;
        assert!(wire > 1e5, "{r}");
        assert!(
            ms >= 0.8 * floor_ms,
            "{ms} ms for {wire} bytes at 200 Mbit/s: {r}"
        );
    }
}

/// `ferry bench qemu --json` of one run each on 32 MiB of `image`, with `extra` flags.
fn bench_qemu_32mib(image: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = ferry()
        .args([
            "bench", "qemu", "--json", "--memory", "32MiB", "--repeat", "1",
        ])
        .args(extra)
        .arg("--fill")
        .arg(image)
        .output()
        .unwrap();
    json_of(&out)
}

#[test]
fn bench_throughput_and_overhead_report_what_they_measure() {
    let out = ferry()
        .args([
            "bench",
            "throughput",
            "--json",
            "--memory",
            "64MiB",
            "--repeat",
            "1",
            "--transport",
            "tcp",
            "--transport",
            "tls",
        ])
        .output()
        .unwrap();
    let v = json_of(&out);
    let rows = v["transports"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert!(v["tcp_memory_mbps"].as_f64().unwrap() > 0.0, "{v}");
    for r in rows {
        let whole = r["whole_mbps"].as_f64().unwrap();
        let first = r["first_pass_mbps"].as_f64().unwrap();
        let outside = r["outside_rounds_share"].as_f64().unwrap();
        // The whole migration includes the first pass, so it cannot be faster.
        assert!(whole > 0.0 && whole <= first * 1.05, "{r}");
        assert!((0.0..1.0).contains(&outside), "{r}");
    }

    let out = ferry()
        .args([
            "bench", "overhead", "--json", "--memory", "32MiB", "--window", "300ms", "--repeat",
            "1",
        ])
        .output()
        .unwrap();
    let v = json_of(&out);
    let rows = v["results"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["setting"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["untracked", "tracked", "migrating"], "{v}");
    // Tests run in parallel on few cores: the figures are checked for sense, not size.
    for r in rows {
        assert!(r["writes_per_s"].as_f64().unwrap() > 1e5, "{r}");
        let q = r["ratio_to_untracked"].as_f64().unwrap();
        assert!(q > 0.0 && q < 5.0, "{r}");
    }
    // A bad value names its flag.
    let out = ferry()
        .args(["bench", "overhead", "--harvest", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--harvest"));
}
