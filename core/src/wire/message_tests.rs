//! Tests of the message codec: round trips and hostile input.
use super::*;
use crate::guest::{DiskLayout, GuestLayout};
use crate::image::ImageIdentity;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        capabilities: CAPABILITIES,
        migration_id: [7; 16],
        digest_key: [3; 32],
        channels: 2,
        verify: VerifyMode::Full,
        codec: "lz4".into(),
        layout: GuestLayout {
            backend: "sim".into(),
            page_size: 4096,
            pages: 1000,
            disks: vec![DiskLayout {
                name: "disk0.img".into(),
                block_size: 4096,
                blocks: 10,
                identity: Some(ImageIdentity {
                    id: [3; 16],
                    generation: 7,
                }),
            }],
        },
    }
}

fn all_messages() -> Vec<Message<'static>> {
    vec![
        Message::Hello(hello()),
        Message::Welcome(Welcome {
            version: 1,
            capabilities: 3,
            migration_id: [1; 16],
            bases: vec![
                Base::None,
                Base::Raw,
                Base::Identity(ImageIdentity {
                    id: [2; 16],
                    generation: 5,
                }),
            ],
        }),
        Message::StoragePlan(vec![
            DiskPlan::Full,
            DiskPlan::Incremental,
            DiskPlan::HashCompared,
        ]),
        Message::BaseDigests {
            disk: 1,
            first: 3,
            total: 5,
            digests: vec![[4; 16], [5; 16]],
        },
        Message::OwedBlocks {
            disk: 0,
            part: BitmapPart {
                bits: 130,
                first_word: 1,
                words: vec![2, 1],
            },
        },
        Message::PullBlocks {
            disk: 0,
            blocks: vec![1, 129],
        },
        Message::PostcopyDone(vec![7, 8]),
        Message::PullBlocks {
            disk: MEMORY_SPACE,
            blocks: vec![0, 65_535],
        },
        Message::RoundAck(12),
        Message::DigestRequest {
            disk: 0,
            last: false,
            chunks: vec![3, 9],
        },
        Message::BlockDigests {
            disk: 0,
            last: true,
            chunks: vec![(3, vec![[1; 16]; 64]), (9, vec![[2; 16]; 5])],
        },
        Message::Refuse("no".into()),
        Message::RoundEnd(RoundEnd {
            phase: Phase::Memory,
            round: 4,
        }),
        Message::State {
            version: 2,
            bytes: std::borrow::Cow::Borrowed(b"blob"),
        },
        Message::Manifest(Manifest {
            pages: 1,
            disks: vec![2, 3],
            full: Some((4, vec![5, 6])),
        }),
        Message::Manifest(Manifest {
            pages: 1,
            disks: vec![],
            full: None,
        }),
        Message::Verified { verify_us: 9 },
        Message::Commit,
        Message::Resumed { resume_us: 10 },
        Message::Verdict(Verdict {
            ok: true,
            pages_checked: 5,
            blocks_checked: 6,
            detail: "fine".into(),
            decode_ns: vec![1_500, 7],
            faults: 12,
            fault_latency_us: [9, 99, 999],
        }),
        Message::Abort("bye".into()),
        Message::Progress(123_456),
    ]
}

#[test]
fn every_control_message_roundtrips() {
    for m in all_messages() {
        let mut body = Vec::new();
        let t = m.encode(&mut body);
        assert_eq!(Message::decode(t, &body).unwrap(), m);
    }
}

#[test]
fn truncated_and_extended_bodies_are_errors() {
    for m in all_messages() {
        let mut body = Vec::new();
        let t = m.encode(&mut body);
        // State takes the rest of the body: only the version prefix can be truncated.
        let cuts = if t == ty::STATE { 0..4 } else { 0..body.len() };
        for cut in cuts {
            assert!(Message::decode(t, &body[..cut]).is_err(), "{m:?} cut {cut}");
        }
        if t != ty::STATE {
            let mut longer = body.clone();
            longer.push(0);
            assert!(Message::decode(t, &longer).is_err(), "{m:?} + trailing");
        }
    }
}

#[test]
fn wrong_version_and_bad_fields_are_refused() {
    let mut body = Vec::new();
    Message::Hello(hello()).encode(&mut body);
    let mut v2 = body.clone();
    v2[0] = 9;
    let e = Message::decode(ty::HELLO, &v2).unwrap_err();
    assert!(e.to_string().contains("version 9 not supported"), "{e}");

    let mut h = hello();
    h.layout.disks[0].name = "../etc/passwd".into();
    let mut b = Vec::new();
    Message::Hello(h).encode(&mut b);
    assert!(Message::decode(ty::HELLO, &b).is_err());

    let mut h = hello();
    h.layout.page_size = 4095;
    let mut b = Vec::new();
    Message::Hello(h).encode(&mut b);
    assert!(Message::decode(ty::HELLO, &b).is_err());

    assert_eq!(Message::decode(99, &[]), Err(DecodeError::UnknownType(99)));
}

fn batch_body(records: &[(u64, bool, u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let at = BatchBuilder::begin(&mut out, None, 3);
    for (i, z, t, d) in records {
        BatchBuilder::record(&mut out, *i, *z, *t, d.len(), 42);
        out.extend_from_slice(d);
    }
    BatchBuilder::finish(&mut out, at, records.len() as u32);
    out
}

fn collect(body: &[u8]) -> Result<Vec<(u64, bool, usize)>, DecodeError> {
    let Message::Batch(b) = Message::decode(ty::PAGES, body)? else {
        panic!("not a batch")
    };
    b.records(8, 100)
        .map(|r| r.map(|r| (r.index, r.zero, r.data.len())))
        .collect()
}

#[test]
fn digest_flagged_batches_check_their_headers() {
    use crate::wire::frame::{header_with, parse_header, FLAG_RECORD_DIGESTS};
    let body = batch_body(&[(1, false, 0, vec![1; 8]), (2, true, 0, vec![])]);
    // CRC over prefix (round, count) and the two 22-byte headers, not the data.
    let mut covered = body[..8].to_vec();
    covered.extend_from_slice(&body[8..30]);
    covered.extend_from_slice(&body[38..60]);
    let crc = crc32c::crc32c(&covered);
    let decode = |body: &[u8], ty: u8| -> Result<usize, DecodeError> {
        let h = parse_header(&header_with(ty, FLAG_RECORD_DIGESTS, body.len(), crc)).unwrap();
        match Message::decode_frame(&h, body)? {
            Message::Batch(b) => b
                .records(8, 100)
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.len()),
            _ => unreachable!(),
        }
    };
    assert_eq!(decode(&body, ty::PAGES), Ok(2));
    // Data bytes are not covered by the CRC (their digests are checked after decoding)...
    let mut data_flip = body.clone();
    data_flip[30] ^= 1;
    assert_eq!(decode(&data_flip, ty::PAGES), Ok(2));
    // ...but every header byte and the prefix are.
    for i in (0..30).chain(38..60) {
        let mut b = body.clone();
        b[i] ^= 0x10;
        assert!(decode(&b, ty::PAGES).is_err(), "flip at {i} unnoticed");
    }
    // The flag is meaningless (and refused) on anything but a batch.
    let h = parse_header(&header_with(ty::COMMIT, FLAG_RECORD_DIGESTS, 0, 0)).unwrap();
    assert!(Message::decode_frame(&h, &[]).is_err());
}

#[test]
fn batches_decode_and_reject_bad_records() {
    let ok = batch_body(&[
        (1, false, 0, vec![1; 8]),
        (2, true, 0, vec![]),
        (3, false, 5, vec![9; 3]),
    ]);
    assert_eq!(
        collect(&ok).unwrap(),
        vec![(1, false, 8), (2, true, 0), (3, false, 3)]
    );
    for cut in 0..ok.len() {
        assert!(collect(&ok[..cut]).is_err(), "cut at {cut}");
    }
    // index out of range
    assert!(collect(&batch_body(&[(100, false, 0, vec![1; 8])])).is_err());
    // raw record of the wrong size
    assert!(collect(&batch_body(&[(1, false, 0, vec![1; 7])])).is_err());
    // zero record with data
    assert!(collect(&batch_body(&[(1, true, 0, vec![1; 8])])).is_err());
    // oversized encoded record
    assert!(collect(&batch_body(&[(1, false, 3, vec![1; 8 + CODEC_SLACK + 1])])).is_err());
    // count larger than the records present
    let mut lie = ok.clone();
    lie[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(collect(&lie).is_err());
    // trailing garbage
    let mut tail = ok.clone();
    tail.push(1);
    assert!(collect(&tail).is_err());
    // absurd count
    let mut huge = ok;
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(collect(&huge).is_err());
}

#[test]
fn a_huge_owed_bitmap_travels_in_parts_and_comes_back_whole() {
    // 16 TiB of 4 KiB blocks: 2^32 bits, 512 MiB of words, far above one frame.
    let bits = 1u64 << 32;
    let mut owed = Bitmap::new(bits);
    for b in [0, 12_345, bits / 2, bits - 1] {
        owed.set(b);
    }
    let parts = owed_parts(2, &owed);
    assert_eq!(parts.len(), (bits / 64) as usize / OWED_WORDS_PER_FRAME);
    let mut asm = BitmapAssembler::new(bits);
    let mut whole = None;
    for (k, p) in parts.into_iter().enumerate() {
        let mut body = Vec::new();
        let ty = p.encode(&mut body);
        assert!(body.len() <= crate::wire::frame::MAX_BODY as usize);
        let Message::OwedBlocks { disk: 2, part } = Message::decode(ty, &body).unwrap() else {
            panic!("part {k} decoded to something else");
        };
        if let Some(b) = asm.add(part).unwrap() {
            whole = Some(b);
        }
    }
    assert_eq!(whole.unwrap(), owed);
    // Parts out of order, or of another size, are refused.
    let mut asm = BitmapAssembler::new(130);
    let e = asm.add(BitmapPart {
        bits: 130,
        first_word: 1,
        words: vec![0],
    });
    assert!(e.is_err());
    let e = BitmapAssembler::new(130).add(BitmapPart {
        bits: 64,
        first_word: 0,
        words: vec![0],
    });
    assert!(e.is_err());
}
