//! The sim, KVM and Xen state blobs a source sends: raw, and with the body inside a valid
//! envelope (a hostile peer computes the CRC too). The first byte picks the format.
#![no_main]

use ferry_core::guest::StateBlob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 3 {
        0 => {
            let v = ferry_sim::state::VERSION;
            for bytes in [
                body.to_vec(),
                ferry_core::envelope::seal(b"FSIMST01", v, body),
            ] {
                let _ = ferry_sim::state::decode(&StateBlob { version: v, bytes });
            }
        }
        1 => {
            let v = ferry_kvm::state::STATE_VERSION;
            let _ = ferry_kvm::state::decode(body);
            if let Ok(s) =
                ferry_kvm::state::decode(&ferry_core::envelope::seal(b"FERRYKVM", v, body))
            {
                let again = ferry_kvm::state::encode(&s);
                assert!(
                    ferry_kvm::state::decode(&again).is_ok(),
                    "re-encoded KVM state decodes"
                );
            }
        }
        _ => {
            let v = ferry_xen::state::STATE_VERSION;
            let _ = ferry_xen::state::decode(body);
            if let Ok(s) =
                ferry_xen::state::decode(&ferry_core::envelope::seal(b"FERRYXEN", v, body))
            {
                let _ = ferry_xen::state::hvm_records(&s.hvm_context);
                assert_eq!(
                    ferry_xen::state::decode(&ferry_xen::state::encode(&s)).ok(),
                    Some(s)
                );
            }
        }
    }
});
