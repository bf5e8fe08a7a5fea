//! The hello (the first thing an unauthenticated `tcp` or `unix` peer sends) and the
//! welcome, and a re-encoding of whatever decodes, which must decode to the same.
#![no_main]

use ferry_core::wire::{ty, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for t in [ty::HELLO, ty::WELCOME] {
        if let Ok(m) = Message::decode(t, data) {
            let mut out = Vec::new();
            let t2 = m.encode(&mut out);
            assert_eq!(t2, t);
            let again = Message::decode(t2, &out).expect("a re-encoded message decodes");
            let mut out2 = Vec::new();
            again.encode(&mut out2);
            assert_eq!(out, out2, "encoding is stable");
        }
    }
});
