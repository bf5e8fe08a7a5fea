//! Strangers cannot hold a listener: hundreds of idle and slowly trickling connections
//! opened first, a legitimate connector still gets its channels, on every stream
//! transport.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::transport::Transport;
use ferry_transports::auth::{generate_files, Fingerprint, Identity};
use ferry_transports::{QuicOptions, QuicTransport, TcpTransport, TlsTransport, UnixTransport};

const IDLE: usize = 300;
const TRICKLING: usize = 20;
const T: Duration = Duration::from_secs(10);

/// Opens `IDLE` silent connections and `TRICKLING` that send one byte every 200 ms, with
/// `open`; they stay until `stop` is set.
fn flood<S: Write + Send + 'static>(
    open: impl Fn() -> std::io::Result<S>,
    stop: &Arc<AtomicBool>,
) -> (Vec<S>, Vec<std::thread::JoinHandle<()>>) {
    let idle = (0..IDLE).filter_map(|_| open().ok()).collect::<Vec<_>>();
    assert!(
        idle.len() > IDLE / 2,
        "only {} connections opened",
        idle.len()
    );
    let trickle = (0..TRICKLING)
        .filter_map(|_| open().ok())
        .map(|mut s| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                // A TLS ClientHello header, or preamble bytes: plausible, never complete.
                for b in b"\x16\x03\x01\x02\x00FERRYCH1".iter().cycle() {
                    if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    (idle, trickle)
}

/// Floods the listener of `t`, then connects legitimately with `legit` and checks the
/// channels arrive; prints how long the legitimate connect took.
fn held_listener_still_admits<S: Write + Send + 'static>(
    what: &str,
    listener_side: &dyn Transport,
    legit: Arc<dyn Transport>,
    open: impl Fn(&str) -> std::io::Result<S>,
    bind: &str,
) {
    let mut l = listener_side.listen(bind).unwrap();
    let addr = l.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (idle, trickle) = flood(|| open(&addr), &stop);
    // Give the acceptor time to take them all, as an attacker would.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let connector = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut chans = legit.connect(&addr, 2).expect("legitimate connect");
            for ch in &mut chans {
                ch.tx.write_all(b"hello").unwrap();
            }
            chans
        })
    };
    let got = l.accept().expect("accept");
    let took = started.elapsed();
    assert_eq!(got.len(), 2);
    drop(connector.join().unwrap());
    eprintln!(
        "{what}: {} idle + {TRICKLING} trickling connections; a pinned connect took {took:?}",
        idle.len()
    );
    assert!(took < T, "{what}: the legitimate connector waited {took:?}");
    stop.store(true, Ordering::SeqCst);
    for t in trickle {
        t.join().unwrap();
    }
}

fn material(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Fingerprint) {
    generate_files(dir, name).unwrap()
}

fn identities() -> (Arc<Identity>, Arc<Identity>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = material(dir.path(), "src");
    let d = material(dir.path(), "dst");
    (
        Arc::new(Identity::load(&s.0, &s.1, vec![d.2]).unwrap()),
        Arc::new(Identity::load(&d.0, &d.1, vec![s.2]).unwrap()),
        dir,
    )
}

#[test]
fn tls_listener_is_not_held_by_idle_connections() {
    let (src, dst, _dir) = identities();
    held_listener_still_admits(
        "tls",
        &TlsTransport::new(T, dst),
        Arc::new(TlsTransport::new(T, src)),
        |a: &str| TcpStream::connect(a),
        "127.0.0.1:0",
    );
}

#[test]
fn tcp_listener_is_not_held_by_idle_connections() {
    held_listener_still_admits(
        "tcp",
        &TcpTransport::new(T),
        Arc::new(TcpTransport::new(T)),
        |a: &str| TcpStream::connect(a),
        "127.0.0.1:0",
    );
}

#[test]
fn unix_listener_is_not_held_by_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sock");
    held_listener_still_admits(
        "unix",
        &UnixTransport::new(T),
        Arc::new(UnixTransport::new(T)),
        |a: &str| UnixStream::connect(a),
        path.to_str().unwrap(),
    );
}

/// QUIC: hundreds of handshakes that never finish (UDP Initial packets of strangers
/// that then go silent) do not stop a pinned connector.
#[test]
fn quic_listener_is_not_held_by_stalled_handshakes() {
    let (src, dst, _dir) = identities();
    let listener_side = QuicTransport::new(T, dst, QuicOptions::default()).unwrap();
    let mut l = listener_side.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    // Strangers: UDP sockets sending a byte string that looks like a long-header Initial.
    let strangers: Vec<std::net::UdpSocket> = (0..IDLE)
        .map(|i| {
            let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut pkt = vec![0u8; 1200];
            pkt[0] = 0xc0;
            pkt[1..5].copy_from_slice(&1u32.to_be_bytes());
            pkt[5] = 8;
            pkt[6..14].copy_from_slice(&(i as u64).to_le_bytes());
            let _ = u.send_to(&pkt, &addr);
            u
        })
        .collect();
    let started = Instant::now();
    let legit = QuicTransport::new(T, src, QuicOptions::default()).unwrap();
    let connector = {
        let addr = addr.clone();
        std::thread::spawn(move || legit.connect(&addr, 2).expect("legitimate connect").len())
    };
    let got = l.accept().expect("accept");
    assert_eq!(got.len(), 2);
    assert_eq!(connector.join().unwrap(), 2);
    eprintln!(
        "quic: {} stranger Initials; a pinned connect took {:?}",
        strangers.len(),
        started.elapsed()
    );
}
