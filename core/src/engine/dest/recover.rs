//! Post-copy recovery on the destination: a guest held (or in doubt) because its owed
//! blocks stopped arriving gets them over a new connection from the source that handed it
//! over, as QEMU's post-copy recovery does for memory.

use crate::wire::owed_parts;
use std::sync::Arc;

use super::events::Receivers;
use super::handshake::{read_hello, Accepted, Links};
use super::storage::wait_postcopy;
use super::{send, send_shared, CodecResolver, DestConfig, SharedTx};
use crate::bitmap::Bitmap;
use crate::fault::{Faults, Side};
use crate::guest::{Base, DestGuest};
use crate::machine::ChannelOrder;
use crate::report::hex;
use crate::transport::Channel;
use crate::wire::{Message, Verdict, Welcome, CAPABILITIES, CAP_RECOVER, MEMORY_SPACE};

/// Receives the blocks `guest` still owes, over `channels` accepted from the source of
/// migration `migration_id`. Every block is checked against its digest as it arrives and
/// the push as a whole against the source's sums; it succeeds only when nothing is owed
/// any more. Returns the number of blocks that arrived.
pub fn receive_owed_blocks(
    channels: Vec<Channel>,
    guest: &Arc<dyn DestGuest>,
    migration_id: &[u8; 16],
    codecs: &CodecResolver<'_>,
    cfg: &DestConfig,
) -> Result<u64, String> {
    let faults = Faults::new(Side::Dest, Vec::new(), cfg.io_timeout);
    let mut links = Links::new(channels, &faults).ok_or("no channels")?;
    let hello = read_hello(&mut links, cfg)?;
    let layout = guest.layout();
    let why_not = if hello.capabilities & CAP_RECOVER == 0 {
        Some("a guest is held here for post-copy recovery; no new migration is taken".into())
    } else if hello.migration_id != *migration_id {
        Some(format!(
            "the held guest came with migration {}, not {}",
            hex(migration_id),
            hex(&hello.migration_id)
        ))
    } else if hello.layout.disks.len() != layout.disks.len()
        || hello.layout.disks.iter().zip(&layout.disks).any(|(a, b)| {
            a.blocks != b.blocks
                || a.block_size != b.block_size
                || a.identity.map(|i| i.id) != b.identity.map(|i| i.id)
        })
    {
        Some("the recovering source's disks are not the images this guest came from".into())
    } else if guest.owed_pages() > 0 && hello.layout.pages != layout.pages {
        Some(format!(
            "{} memory pages are owed, and the recovering source has no such memory (its guest has {} pages)",
            guest.owed_pages(),
            hello.layout.pages
        ))
    } else {
        None
    };
    if let Some(why) = why_not {
        return Err(links.refuse(why));
    }
    let codec = codecs(&hello.codec).map_err(|e| links.refuse(format!("codec: {e}")))?;
    let welcome = Message::Welcome(Welcome {
        version: hello.version,
        capabilities: CAPABILITIES | CAP_RECOVER,
        migration_id: hello.migration_id,
        bases: vec![Base::None; layout.disks.len()],
    });
    let tx0 = &mut links.txs[0];
    send(tx0.as_mut(), &welcome).map_err(|e| format!("sending welcome: {e}"))?;
    // What is still owed, disk by disk: the source pushes exactly that.
    let mut owed_total = 0;
    for (d, dl) in layout.disks.iter().enumerate() {
        let owed = guest
            .owed_bitmap(d)
            .unwrap_or_else(|| Bitmap::new(dl.blocks));
        owed_total += owed.count();
        for part in owed_parts(d as u16, &owed) {
            send(tx0.as_mut(), &part).map_err(|e| format!("sending the owed blocks: {e}"))?;
        }
    }
    // Then memory's (of no bits when no page is owed: a source that recovers only disks,
    // from the image it left, has no memory).
    let owed = guest
        .owed_pages_bitmap()
        .filter(|b| !b.none())
        .unwrap_or_else(|| Bitmap::new(0));
    owed_total += owed.count();
    for part in owed_parts(MEMORY_SPACE, &owed) {
        send(tx0.as_mut(), &part).map_err(|e| format!("sending the owed pages: {e}"))?;
    }
    let n = links.count();
    let tx0: SharedTx = Arc::new(std::sync::Mutex::new(links.txs.swap_remove(0)));
    let accepted = Accepted {
        hello,
        codec,
        guest: Arc::clone(guest),
    };
    let rx = Receivers::start(&mut links, &accepted, ChannelOrder::after_final_barrier());
    let pushed = wait_postcopy(&rx.events, &rx.pages, &rx.disks, n, cfg);
    let left = (guest.owed_pages(), guest.owed_blocks());
    let result = pushed.and_then(|()| match left {
        (0, 0) => Ok(owed_total),
        (p, b) => Err(format!(
            "{p} pages and {b} blocks are still owed after the recovery"
        )),
    });
    let verdict = Verdict {
        ok: result.is_ok(),
        pages_checked: 0,
        blocks_checked: owed_total,
        detail: match &result {
            Ok(n) => format!("{n} owed units recovered"),
            Err(e) => e.clone(),
        },
        decode_ns: Vec::new(),
        faults: 0,
        fault_latency_us: [0; 3],
    };
    let _ = send_shared(&tx0, &Message::Verdict(verdict));
    rx.shut_down(&links, true);
    result
}
