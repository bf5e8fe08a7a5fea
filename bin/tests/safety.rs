//! The safety rule as a user meets it: no VM and no block is ever lost, with real
//! processes, real loopback sockets and real files.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

/// Two guests whose disks have the same name and size, two listeners sharing one `--dir`:
/// the second migration must not take the first guest's live image as its base.
#[test]
fn two_listeners_in_one_directory_never_share_a_live_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["a", "b", "shared"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let (a_ctl, b_ctl) = (d.join("a.sock"), d.join("b.sock"));
    let _a = run_guest_at(&d.join("a/disk0.img"), &a_ctl, &[], &[]);
    let mut b = run_guest_at(&d.join("b/disk0.img"), &b_ctl, &[], &[]);
    let (l1_ctl, l2_ctl) = (d.join("l1.sock"), d.join("l2.sock"));
    let shared = d.join("shared");
    let (_l1, addr1) = listen_in(&shared, &l1_ctl, "10s", "127.0.0.1:0", &PLAIN, &[]);
    let (mut l2, addr2) = listen_in(&shared, &l2_ctl, "10s", "127.0.0.1:0", &PLAIN, &[]);

    migrate_verified(&a_ctl, &addr1, &[]);
    assert_eq!(status(&l1_ctl)["state"], "running");
    let image = shared.join("disk0.img");
    let before = std::fs::metadata(&image).unwrap().modified().unwrap();

    let out = migrate_with_timeout(&b_ctl, &addr2, "5s");
    let r = json_of(&out);
    assert!(
        !out.status.success(),
        "the clashing migration must fail: {r}"
    );
    let err = r["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("disk0.img") && err.contains("in use"),
        "the error names the file in use: {err}"
    );
    assert_eq!(r["source_resumed"], true);
    // The refused listener gave up; the second guest still runs where it was.
    assert_eq!(
        wait_exit(&mut l2, std::time::Duration::from_secs(10)),
        Some(1)
    );
    assert_advancing(&b_ctl, "second guest after the refusal");
    assert_check_passes(&b_ctl, "second guest after the refusal");
    // The first guest's disk was not touched by the refused migration.
    assert_check_passes(&l1_ctl, "first guest after the refusal");
    assert_eq!(status(&l1_ctl)["state"], "running");
    assert!(std::fs::metadata(&image).unwrap().modified().unwrap() >= before);
    stop_and_wait(&mut b, &b_ctl);
}

/// The control socket steers the whole VM: it is private to its owner, takes bounded
/// requests, and `--control` never replaces anything but a socket.
#[test]
fn the_control_socket_is_private_and_bounded() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A regular file named by --control is refused and left as it was.
    let precious = d.join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let out = ferry()
        .args(["run", "--memory", "16MiB", "--no-disk", "--control"])
        .arg(&precious)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--control") && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

    let ctl = d.join("guest.sock");
    let mut guest = run_guest_at(&d.join("g.img"), &ctl, &[], &[]);
    let meta = std::fs::symlink_metadata(&ctl).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.mode() & 0o777,
        0o600,
        "the socket is private to its owner"
    );

    // A request longer than the limit is refused without being parsed.
    let mut c = UnixStream::connect(&ctl).unwrap();
    c.write_all(&vec![b'x'; 100 << 10]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    BufReader::new(&c).read_line(&mut answer).unwrap();
    assert!(answer.contains("longer than 64 KiB"), "{answer}");

    // Another user cannot reach it (as root here: a child of uid 65534).
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        // The directory lets anyone in: only the socket's own mode keeps them out.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = ferry()
            .args(["status", "--vm"])
            .arg(&ctl)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "another uid reached the guest: {err}"
        );
        assert!(err.contains("Permission denied"), "{err}");
    } else {
        eprintln!("skipped the other-uid check: not root");
    }
    assert_eq!(status(&ctl)["state"], "running");
    stop_and_wait(&mut guest, &ctl);
}

/// Strangers cannot hold a listener: hundreds of idle connections, and a destination whose
/// process has run out of file descriptors, still take a pinned migration that verifies.
#[test]
fn a_flooded_listener_out_of_descriptors_still_takes_a_pinned_migration() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (sc, sk, sfp) = keygen(&keys, "src");
    let (dc, dk, dfp) = keygen(&keys, "dst");
    let tls = ["--transport", "tls"];
    let (mut dst, addr, dst_ctl) = listen_with(
        dir.path(),
        "10s",
        "127.0.0.1:0",
        &[&tls[..], &["--cert", &dc, "--key", &dk, "--peer", &sfp]].concat(),
    );
    // First almost no descriptors beyond those it uses: the flood exhausts them, so
    // accept() fails with EMFILE and the listener must survive it.
    let in_use = std::fs::read_dir(format!("/proc/{}/fd", dst.0.id()))
        .unwrap()
        .count() as u64;
    let set_limit = |n: u64| {
        let limit = libc::rlimit {
            rlim_cur: n,
            rlim_max: 4096,
        };
        // SAFETY: prlimit reads `limit` and writes nothing (old is null).
        let r = unsafe {
            libc::prlimit(
                dst.0.id() as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set_limit(in_use + 6);
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() >= 100, "only {} connections opened", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    // Then room for a guest; the flood stays.
    let limit = in_use + 48;
    set_limit(limit);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = migrate_new_guest(
        &addr,
        "20s",
        &[&tls[..], &["--cert", &sc, "--key", &sk, "--peer", &dfp]].concat(),
    );
    let r = json_of(&out);
    assert!(
        r["ok"] == true && r["verified"] == true,
        "{r} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{} idle connections, {} descriptors: the pinned migration verified {:?} after it started",
        idle.len(),
        limit,
        started.elapsed()
    );
    drop(idle);
    assert_check_passes(&dst_ctl, "destination");
    let _ = ferry().args(["stop", "--vm"]).arg(&dst_ctl).output();
    let _ = wait_exit(&mut dst, Duration::from_secs(10));
}
