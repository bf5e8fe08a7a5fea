//! A hostile sender against a real `ferry listen`: it completes the handshake (plain tcp,
//! as an unauthenticated peer can) and then sends crafted frames. Each attack must be
//! refused with a clear reason, and the receiver's peak memory (VmHWM) must stay within
//! a documented bound: the guest's own memory plus a fixed allowance.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::Write;
use std::time::Duration;

use ferry_core::guest::GuestLayout;
use ferry_core::transport::Transport;
use ferry_core::wire::frame::write_frame;
use ferry_core::wire::{
    ty, FrameReader, Hello, Message, ReadOutcome, VerifyMode, CAPABILITIES, PROTOCOL_VERSION,
    RECORD_HEADER,
};

const GUEST: u64 = 32 << 20;
/// What a receiver may use beyond the guest's memory: the binary, its threads' stacks,
/// per-channel frame buffers and digest tables (measured ≈ 40 MiB idle).
const ALLOWANCE: u64 = 160 << 20;

/// Peak resident memory of process `pid`, in bytes, while it lives.
fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn hello(pages: u64, codec: &str) -> Vec<u8> {
    let h = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAPABILITIES,
        migration_id: [7; 16],
        digest_key: [3; 32],
        channels: 1,
        verify: VerifyMode::Digest,
        codec: codec.into(),
        layout: GuestLayout {
            backend: "sim".into(),
            page_size: 4096,
            pages,
            disks: vec![],
        },
    });
    let mut body = Vec::new();
    let t = h.encode(&mut body);
    let mut f = Vec::new();
    write_frame(&mut f, t, &body).unwrap();
    f
}

/// Connects to `addr`, sends `frames` after the handshake, and returns what the
/// destination answered last (its refusal or abort), with the receiver's peak memory.
fn attack(addr: &str, pid: u32, pages: u64, codec: &str, frames: &[Vec<u8>]) -> (String, u64) {
    let t = ferry_transports::TcpTransport::new(Duration::from_secs(5));
    let mut ch = t.connect(addr, 1).unwrap().remove(0);
    ch.tx.write_all(&hello(pages, codec)).unwrap();
    let mut r = FrameReader::new(ch.rx);
    let mut answers = Vec::new();
    let mut peak = 0;
    let mut sent = false;
    for _ in 0..200 {
        peak = peak.max(vm_hwm(pid).unwrap_or(0));
        match r.poll() {
            Ok(ReadOutcome::Frame(h)) => match Message::decode_frame(&h, r.body()) {
                Ok(Message::Welcome(_)) if !sent => {
                    sent = true;
                    let mut plan = Vec::new();
                    let t = Message::StoragePlan(vec![]).encode(&mut plan);
                    write_frame(&mut ch.tx, t, &plan).unwrap();
                    for f in frames {
                        if ch.tx.write_all(f).is_err() {
                            break;
                        }
                    }
                }
                Ok(Message::Refuse(why)) | Ok(Message::Abort(why)) => answers.push(why),
                Ok(_) => {}
                Err(e) => answers.push(format!("undecodable answer: {e}")),
            },
            Ok(ReadOutcome::Idle) => {}
            Ok(ReadOutcome::Closed) | Err(_) => break,
        }
    }
    // The high-water mark as the receiver gives up (it exits right after).
    for _ in 0..50 {
        match vm_hwm(pid) {
            Some(m) => peak = peak.max(m),
            None => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (answers.join("; "), peak)
}

/// A batch frame of `count` records, each `len` data bytes, codec tag `tag`.
fn batch(count: u32, tag: u8, len: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes()); // round
    body.extend_from_slice(&count.to_le_bytes());
    for i in 0..count {
        let mut h = [0u8; RECORD_HEADER];
        h[0..8].copy_from_slice(&u64::from(i % 8192).to_le_bytes());
        h[8] = 1;
        h[9] = tag;
        h[10..14].copy_from_slice(&(len as u32).to_le_bytes());
        body.extend_from_slice(&h);
        body.extend(std::iter::repeat_n(0xa5u8, len));
    }
    let mut f = Vec::new();
    write_frame(&mut f, ty::PAGES, &body).unwrap();
    f
}

/// A frame header claiming the largest body, then only part of it.
fn claimed_but_never_sent() -> Vec<u8> {
    let mut f = Vec::new();
    write_frame(&mut f, ty::PAGES, &vec![0u8; 16 << 20]).unwrap();
    f.truncate(64 << 10);
    f
}

#[test]
fn a_hostile_sender_cannot_raise_the_receivers_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    // (what, pages in the hello, codec, frames after the handshake, expected refusal)
    type Case = (&'static str, u64, &'static str, Vec<Vec<u8>>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "a hello for 4 TiB of memory",
            1 << 30,
            "raw",
            vec![],
            "--max-memory",
        ),
        (
            "16 MiB of empty encoded records (762k pages to stage)",
            GUEST / 4096,
            "xor-delta",
            vec![batch(((16 << 20) - 8) / RECORD_HEADER as u32, 1, 0)],
            "exceed a batch",
        ),
        (
            "a body claimed at 16 MiB that never comes",
            GUEST / 4096,
            "raw",
            vec![claimed_but_never_sent()],
            "",
        ),
    ];
    for (what, pages, codec, frames, expect) in cases {
        let sub = dir.path().join(format!("c{}", peaks.len()));
        std::fs::create_dir_all(&sub).unwrap();
        let (mut dst, addr) = listen_in(
            &sub.join("dst"),
            &sub.join("dst.sock"),
            "2s",
            "127.0.0.1:0",
            &PLAIN,
            &[],
        );
        let (answer, peak) = attack(&addr, dst.0.id(), pages, codec, &frames);
        assert!(
            answer.contains(expect),
            "{what}: the destination answered {answer:?}"
        );
        eprintln!(
            "{what}: refused ({answer}); receiver peak RSS {} MiB",
            peak >> 20
        );
        assert!(
            peak <= GUEST + ALLOWANCE,
            "{what}: the receiver reached {} MiB",
            peak >> 20
        );
        peaks.push(peak);
        // The destination gave up and exits; nothing of the guest stays.
        assert!(wait_exit(&mut dst, Duration::from_secs(10)).is_some());
    }
}
