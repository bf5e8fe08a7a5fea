//! Transport throughput on loopback: each transport and channel count moving the same
//! bytes, next to one plain TCP socket in the same group (the baseline).
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::transport::{Channel, Transport};
use ferry_transports::{
    Identity, QuicLayout, QuicOptions, QuicTransport, TcpTransport, TlsTransport, UnixTransport,
};

/// Bytes per measured transfer.
const BYTES: usize = 256 << 20;
const CHUNK: usize = 256 << 10;
const T: Duration = Duration::from_secs(10);

/// Drains a channel until `bytes` arrived (reads time out as a poll interval).
fn drain(rx: &mut dyn Read, bytes: usize) {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < bytes {
        match rx.read(&mut buf) {
            Ok(0) => panic!("closed after {got} bytes"),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Connects `channels`, sends BYTES split across them, and waits until all arrived.
fn transfer(
    t: &dyn Transport,
    addr: &str,
    l: &mut dyn ferry_core::transport::Listener,
    channels: usize,
) {
    let per = BYTES / channels;
    std::thread::scope(|s| {
        let accepted = s.spawn(|| l.accept().unwrap());
        let senders: Vec<Channel> = t.connect(addr, channels).unwrap();
        let receivers = accepted.join().unwrap();
        let mut joins = Vec::new();
        for (mut tx, mut rx) in senders.into_iter().zip(receivers) {
            joins.push(s.spawn(move || {
                let buf = vec![0x5au8; CHUNK];
                for _ in 0..per / CHUNK {
                    tx.tx.write_all(&buf).unwrap();
                }
                tx
            }));
            joins.push(s.spawn(move || {
                drain(&mut rx.rx, per);
                rx
            }));
        }
        for j in joins {
            drop(j.join().unwrap());
        }
    });
}

fn identities() -> (Arc<Identity>, Arc<Identity>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut fps = Vec::new();
    for n in ["src", "dst"] {
        let (c, k, fp) = ferry_transports::auth::generate(n).unwrap();
        std::fs::write(dir.path().join(format!("{n}.crt")), c).unwrap();
        std::fs::write(dir.path().join(format!("{n}.key")), k).unwrap();
        fps.push(fp);
    }
    let id = |n: &str, peer| {
        Arc::new(
            Identity::load(
                &dir.path().join(format!("{n}.crt")),
                &dir.path().join(format!("{n}.key")),
                vec![peer],
            )
            .unwrap(),
        )
    };
    (id("src", fps[1]), id("dst", fps[0]), dir)
}

/// A transport under test: name, connecting side, listening side, where to bind.
type Case = (&'static str, Box<dyn Transport>, Box<dyn Transport>, String);

fn transports(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport-loopback");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    // The baseline: one plain socket, 256 KiB writes and reads.
    g.bench_function("plain-tcp-socket", |b| {
        b.iter(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let rx = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                drain(&mut s, BYTES);
            });
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let buf = vec![0x5au8; CHUNK];
            for _ in 0..BYTES / CHUNK {
                s.write_all(&buf).unwrap();
            }
            rx.join().unwrap();
        })
    });
    let (src, dst, dir) = identities();
    let sock = dir.path().join("bench.sock");
    let cases: Vec<Case> = vec![
        (
            "tcp",
            Box::new(TcpTransport::new(T)),
            Box::new(TcpTransport::new(T)),
            "127.0.0.1:0".into(),
        ),
        (
            "tls",
            Box::new(TlsTransport::new(T, src.clone())),
            Box::new(TlsTransport::new(T, dst.clone())),
            "127.0.0.1:0".into(),
        ),
        (
            "quic-streams",
            Box::new(
                QuicTransport::new(
                    T,
                    src.clone(),
                    QuicOptions {
                        layout: QuicLayout::Streams,
                        ..QuicOptions::default()
                    },
                )
                .unwrap(),
            ),
            Box::new(QuicTransport::new(T, dst.clone(), QuicOptions::default()).unwrap()),
            "127.0.0.1:0".into(),
        ),
        (
            "quic-connections",
            Box::new(QuicTransport::new(T, src.clone(), QuicOptions::default()).unwrap()),
            Box::new(QuicTransport::new(T, dst.clone(), QuicOptions::default()).unwrap()),
            "127.0.0.1:0".into(),
        ),
        (
            "unix",
            Box::new(UnixTransport::new(T)),
            Box::new(UnixTransport::new(T)),
            sock.display().to_string(),
        ),
    ];
    for (name, connector, listener, bind) in &cases {
        for channels in [1usize, 2, 4] {
            let mut l = listener.listen(bind).unwrap();
            let addr = l.local_addr();
            g.bench_function(BenchmarkId::new(*name, channels), |b| {
                b.iter(|| transfer(connector.as_ref(), &addr, l.as_mut(), channels))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, transports);
criterion_main!(benches);
