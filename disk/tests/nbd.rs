//! The NBD block back-end: real sockets, real image files, QEMU's own NBD client where it
//! is installed, and hostile input.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command as Process;
use std::sync::Arc;

use ferry_disk::nbd::{self, Command, NbdError, Request, WriteLimit, REPLY_MAGIC};
use ferry_disk::DiskImage;
use proptest::prelude::*;

const BS: u32 = 4096;

fn image(dir: &tempfile::TempDir, blocks: u64) -> Arc<DiskImage> {
    let (img, created) =
        DiskImage::open_or_create(&dir.path().join("d.img"), BS, blocks).expect("create image");
    assert!(created);
    Arc::new(img)
}

/// Serves `img` on one end of a socket pair (transmission only, as the kernel driver
/// talks) and returns the other end plus the server thread.
fn served(
    img: &Arc<DiskImage>,
) -> (
    UnixStream,
    std::thread::JoinHandle<Result<nbd::Served, NbdError>>,
) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let img = Arc::clone(img);
    let t = std::thread::spawn(move || nbd::serve_transmission(b, &img, &WriteLimit::default()));
    (a, t)
}

fn send(s: &mut UnixStream, command: Command, cookie: u64, offset: u64, len: u32, data: &[u8]) {
    let r = Request {
        command,
        flags: 0,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).expect("send header");
    s.write_all(data).expect("send data");
}

/// Reads a simple reply: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).expect("reply");
    assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), REPLY_MAGIC);
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

#[test]
fn guest_writes_through_nbd_land_in_the_image_and_mark_exactly_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 64);
    let (mut c, t) = served(&img);
    // Two whole blocks at block 3, then 100 bytes straddling blocks 9 and 10.
    let whole: Vec<u8> = (0..2 * BS).map(|i| (i % 251) as u8).collect();
    send(&mut c, Command::Write, 1, 3 * u64::from(BS), 2 * BS, &whole);
    assert_eq!(reply(&mut c), (0, 1));
    let part = [0xabu8; 100];
    send(
        &mut c,
        Command::Write,
        2,
        10 * u64::from(BS) - 50,
        100,
        &part,
    );
    assert_eq!(reply(&mut c), (0, 2));
    send(&mut c, Command::Flush, 3, 0, 0, &[]);
    assert_eq!(reply(&mut c), (0, 3));
    // Read back across the partial write: 50 bytes of 0xab each side of the boundary.
    send(&mut c, Command::Read, 4, 10 * u64::from(BS) - 60, 120, &[]);
    assert_eq!(reply(&mut c), (0, 4));
    let mut got = [0u8; 120];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got[..10], &[0u8; 10]);
    assert_eq!(&got[10..110], &[0xabu8; 100]);
    assert_eq!(&got[110..], &[0u8; 10]);
    send(&mut c, Command::Disconnect, 5, 0, 0, &[]);
    let s = t.join().unwrap().expect("clean disconnect");
    assert_eq!((s.reads, s.writes, s.flushes, s.errors), (1, 2, 1, 0));
    // The image holds the data, and the logs name exactly blocks 3, 4, 9 and 10.
    let mut b = vec![0u8; BS as usize];
    img.read(4, &mut b).unwrap();
    assert_eq!(&b[..], &whole[BS as usize..]);
    let logged: Vec<u64> = img.log.take().iter_ones().collect();
    assert_eq!(logged, vec![3, 4, 9, 10]);
    let gen: Vec<u64> = img.gen_log.take().iter_ones().collect();
    assert_eq!(gen, vec![3, 4, 9, 10]);
}

#[test]
fn bad_requests_get_errors_or_end_the_connection_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 8);
    let size = 8 * u64::from(BS);
    let (mut c, t) = served(&img);
    // Out of range, and an offset that overflows: EINVAL, payload consumed, still served.
    send(&mut c, Command::Write, 1, size - 10, 20, &[1u8; 20]);
    assert_eq!(reply(&mut c), (22, 1));
    send(&mut c, Command::Read, 2, u64::MAX - 5, 10, &[]);
    assert_eq!(reply(&mut c), (22, 2));
    // Not offered: trim and write-zeroes.
    send(&mut c, Command::Trim, 3, 0, 4096, &[]);
    assert_eq!(reply(&mut c), (22, 3));
    send(&mut c, Command::WriteZeroes, 4, 0, 4096, &[]);
    assert_eq!(reply(&mut c), (22, 4));
    // Nothing was written.
    assert!(img.log.take().none());
    // A read larger than the limit ends the connection.
    send(&mut c, Command::Read, 5, 0, nbd::MAX_REQUEST + 1, &[]);
    assert!(matches!(t.join().unwrap(), Err(NbdError::TooLarge(_))));

    let (mut c, t) = served(&img);
    c.write_all(&[0u8; nbd::REQUEST_LEN]).unwrap();
    assert!(matches!(t.join().unwrap(), Err(NbdError::BadMagic(0))));

    let (mut c, t) = served(&img);
    let mut h = Request {
        command: Command::Read,
        flags: 0,
        cookie: 9,
        offset: 0,
        len: 1,
    }
    .encode();
    h[7] = 99;
    c.write_all(&h).unwrap();
    assert!(matches!(
        t.join().unwrap(),
        Err(NbdError::UnknownCommand(99))
    ));

    // A client that closes mid-header is simply gone.
    let (mut c, t) = served(&img);
    c.write_all(&[0x25, 0x60]).unwrap();
    drop(c);
    assert!(t.join().unwrap().is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Any bytes from a client, with or without the handshake, end in a result: no
    /// panic, no hang (the socket closes after the bytes).
    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), handshake in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, 4);
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                if handshake {
                    nbd::serve(b, &img, &WriteLimit::default()).map(|_| ())
                } else {
                    nbd::serve_transmission(b, &img, &WriteLimit::default()).map(|_| ())
                }
            })
        };
        // Drain replies so the server never blocks on a full socket.
        let mut r = a.try_clone().unwrap();
        let drain = std::thread::spawn(move || { let mut v = Vec::new(); let _ = r.read_to_end(&mut v); });
        let _ = a.write_all(&bytes);
        let _ = a.shutdown(std::net::Shutdown::Write);
        let _ = t.join().expect("server thread must not panic");
        drop(a);
        drain.join().unwrap();
    }
}

/// QEMU's NBD client (qemu-io over a Unix socket) against Ferry's server: the handshake
/// (NBD_OPT_GO), writes at aligned and unaligned offsets, reads that verify the pattern.
#[test]
fn qemu_io_reads_and_writes_through_the_ferry_server() {
    if Process::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-io not found (apt-get install qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 256);
    let sock = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = {
        let img = Arc::clone(&img);
        std::thread::spawn(move || {
            // qemu-io connects once per invocation.
            let mut served = Vec::new();
            for _ in 0..2 {
                let (conn, _) = listener.accept().expect("accept");
                served.push(nbd::serve(conn, &img, &WriteLimit::default()).expect("serve"));
            }
            served
        })
    };
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let qemu_io = |cmds: &[&str]| {
        let mut p = Process::new("qemu-io");
        p.args(["-f", "raw"]);
        for c in cmds {
            p.args(["-c", c]);
        }
        let out = p.arg(&uri).output().expect("run qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
        text
    };
    let w = qemu_io(&["write -P 0x5a 0 64k", "write -P 0xc3 70000 5000", "flush"]);
    assert!(!w.contains("error") && !w.contains("fail"), "{w}");
    let r = qemu_io(&[
        "read -P 0x5a 0 64k",
        "read -P 0xc3 70000 5000",
        "read -P 0 65536 4464",
    ]);
    assert!(
        !r.contains("Pattern verification failed") && !r.contains("error"),
        "{r}"
    );
    let served = server.join().unwrap();
    assert!(served[0].writes >= 2 && served[1].reads >= 3, "{served:?}");
    // Blocks 0..16 (64 KiB) and 17..18 (70000..75000) were written by the guest.
    let logged: Vec<u64> = img.log.take().iter_ones().collect();
    assert_eq!(logged, (0..16).chain(17..19).collect::<Vec<u64>>());
    let mut b = vec![0u8; BS as usize];
    img.read(17, &mut b).unwrap();
    let at = 70000 - 17 * BS as usize;
    assert!(b[..at].iter().all(|&x| x == 0));
    assert!(b[at..].iter().all(|&x| x == 0xc3));
}
