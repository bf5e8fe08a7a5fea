//! The image sidecar (a file anyone with write access to the directory may have edited):
//! as read from disk, and its body inside a valid envelope.
#![no_main]

use ferry_core::image::{Sidecar, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Sidecar::decode(data, 4096, 100);
    let sealed = ferry_core::envelope::seal(b"FERRYIMG", VERSION, data);
    for blocks in [0, 1, 100, 1 << 20] {
        if let Ok(s) = Sidecar::decode(&sealed, 4096, blocks) {
            // What decodes re-encodes to the same sidecar.
            assert_eq!(Sidecar::decode(&s.encode(), 4096, blocks).ok(), Some(s));
        }
    }
});
