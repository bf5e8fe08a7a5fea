//! Every message decoder on a body whose frame checks passed (a peer computes CRCs too):
//! the first byte picks the message type.
#![no_main]

use ferry_core::wire::{Message, Message::Batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ty, body)) = data.split_first() else {
        return;
    };
    // Types 1..=23 are defined; others must be refused cleanly too.
    if let Ok(Batch(b)) = Message::decode(ty % 32, body) {
        for (size, limit) in [(4096, 1 << 20), (512, 8), (2 << 20, 1 << 40)] {
            for rec in b.records(size, limit) {
                if rec.is_err() {
                    break;
                }
            }
        }
    }
});
