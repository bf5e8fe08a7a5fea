//! A byte stream as a channel delivers it: frames, each decoded as a message, batches
//! iterated record by record, as a receiver does. The first byte picks the stream: the
//! input as it is, or the input cut into frames with valid CRCs (a peer computes them
//! too), some of them then damaged, so the decoders behind the checks are reached.
#![no_main]

use ferry_core::wire::frame::write_frame;
use ferry_core::wire::{FrameReader, Message, ReadOutcome};
use libfuzzer_sys::fuzz_target;

/// Cuts `data` into frames: `ty:u8 len:u16 body`, each written with valid CRCs.
fn framed(mut data: &[u8], damage: u8) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let ty = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        let _ = write_frame(&mut out, ty, &data[3..3 + len]);
        data = &data[3 + len..];
    }
    if damage != 0 && !out.is_empty() {
        let at = usize::from(damage) * 7 % out.len();
        out[at] ^= damage;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = match mode % 4 {
        0 => rest.to_vec(),
        1 => framed(rest, 0),
        _ => framed(rest, mode),
    };
    let mut r = FrameReader::new(&stream[..]);
    for _ in 0..64 {
        match r.poll() {
            Ok(ReadOutcome::Frame(h)) => {
                if let Ok(Message::Batch(b)) = Message::decode_frame(&h, r.body()) {
                    for rec in b.records(4096, 1 << 20) {
                        if rec.is_err() {
                            break;
                        }
                    }
                }
            }
            Ok(ReadOutcome::Idle) | Ok(ReadOutcome::Closed) | Err(_) => return,
        }
    }
});
