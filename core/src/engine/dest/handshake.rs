//! The destination's handshake: hello, the guest, welcome, then the storage plan and the
//! hash-compared copy, all before any receiver thread runs.

use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::storage::{answer_hash_compare, apply_storage_plan};
use super::{check_hello, send, CodecResolver, DestConfig, GuestFactory};
use crate::codec::CodecFactory;
use crate::engine::read_frame_until;
use crate::fault::{Faults, Point};
use crate::guest::{Base, DestGuest};
use crate::machine::{DestEvent, DestSession};
use crate::transport::Channel;
use crate::wire::{FrameReader, Hello, Message, Welcome, CAPABILITIES, CAP_RECOVER};

/// The channels of one migration, split into halves.
pub(super) struct Links {
    pub(super) txs: Vec<Box<dyn Write + Send>>,
    /// Receiving halves of channels 1.. (channel 0's is read by the handshake).
    pub(super) rxs: Vec<Box<dyn Read + Send>>,
    pub(super) rx0: Option<FrameReader<Box<dyn Read + Send>>>,
    closers: Vec<Box<dyn Fn() + Send + Sync>>,
    pub(super) stop: Arc<AtomicBool>,
}

impl Links {
    /// Splits `channels` (under the fault switches); `None` without channels.
    pub(super) fn new(channels: Vec<Channel>, faults: &Faults) -> Option<Self> {
        let mut links = Links {
            txs: Vec::new(),
            rxs: Vec::new(),
            rx0: None,
            closers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        for c in channels.into_iter().map(|c| faults.wrap(c)) {
            links.txs.push(c.tx);
            if links.rx0.is_none() {
                links.rx0 = Some(FrameReader::new(c.rx));
            } else {
                links.rxs.push(c.rx);
            }
            if let Some(cl) = c.closer {
                links.closers.push(cl);
            }
        }
        links.rx0.is_some().then_some(links)
    }

    /// Number of channels.
    pub(super) fn count(&self) -> usize {
        self.txs.len()
    }

    /// Closes every channel, so no thread stays blocked on the peer.
    pub(super) fn close_all(&self) {
        for c in &self.closers {
            c();
        }
    }

    /// Refuses the migration: tells the source why and closes.
    pub(super) fn refuse(&mut self, why: String) -> String {
        if let Some(tx) = self.txs.first_mut() {
            let _ = send(tx.as_mut(), &Message::Refuse(why.clone()));
        }
        self.close_all();
        why
    }
}

/// Reads and checks the hello on channel 0; a bad one is refused.
pub(super) fn read_hello(links: &mut Links, cfg: &DestConfig) -> Result<Hello, String> {
    let n = links.count();
    let Some(reader0) = links.rx0.as_mut() else {
        return Err("no channels".into());
    };
    let deadline = Some(Instant::now() + cfg.io_timeout);
    let hello = match read_frame_until(reader0, deadline, &links.stop) {
        Ok(Some(fh)) => match Message::decode_frame(&fh, reader0.body()) {
            Ok(Message::Hello(h)) => Ok(h),
            Ok(_) => Err(format!("expected hello, got message type {}", fh.ty)),
            Err(e) => Err(format!("bad hello: {e}")),
        },
        Ok(None) => Err("source closed the connection before the handshake".into()),
        Err(e) => Err(format!("handshake: {}", crate::engine::error_chain(&e))),
    };
    hello
        .and_then(|h| check_hello(&h, n, cfg).map(|()| h))
        .map_err(|e| links.refuse(e))
}

/// A migration the destination accepted.
pub(super) struct Accepted {
    pub(super) hello: Hello,
    pub(super) codec: Arc<dyn CodecFactory>,
    pub(super) guest: Arc<dyn DestGuest>,
}

/// Reads the hello, builds the guest, welcomes the source and applies its storage plan.
/// Anything that fails ends the migration here, with nothing kept: the error says why.
pub(super) fn handshake(
    links: &mut Links,
    session: &mut DestSession,
    make_guest: &GuestFactory<'_>,
    codecs: &CodecResolver<'_>,
    cfg: &DestConfig,
    faults: &Faults,
) -> Result<Accepted, String> {
    let hello = read_hello(links, cfg)?;
    if hello.capabilities & CAP_RECOVER != 0 {
        return Err(links.refuse("nothing to recover here: no guest is held".into()));
    }
    let codec =
        codecs(&hello.codec).map_err(|e| links.refuse(format!("codec {:?}: {e}", hello.codec)))?;
    let guest = make_guest(&hello.layout).map_err(|e| {
        links.refuse(format!(
            "cannot build the guest: {}",
            crate::engine::error_chain(&e)
        ))
    })?;
    let bases: Vec<Base> = (0..hello.layout.disks.len())
        .map(|d| guest.base(d))
        .collect();
    faults.hit(Point::Handshake);
    let welcome = Message::Welcome(Welcome {
        version: hello.version,
        capabilities: CAPABILITIES,
        migration_id: hello.migration_id,
        bases: bases.clone(),
    });
    let give_up = |links: &Links, error: String| {
        guest.discard();
        links.close_all();
        error
    };
    if let Err(e) = send(links.txs[0].as_mut(), &welcome) {
        return Err(give_up(links, format!("sending welcome: {e}")));
    }
    if let Err(e) = session.on(DestEvent::Hello) {
        return Err(give_up(links, e.to_string()));
    }
    // The storage plan comes before any data: apply it before any receiver runs, so no
    // block can land in a base that is about to be replaced.
    let digest_key = crate::basecmp::key_for(&hello.migration_id);
    let Links { txs, rx0, stop, .. } = links;
    let Some(reader0) = rx0.as_mut() else {
        return Err(give_up(links, "no channels".into()));
    };
    let planned = apply_storage_plan(reader0, &*guest, &bases, cfg, stop).and_then(|plans| {
        answer_hash_compare(
            reader0,
            txs[0].as_mut(),
            &*guest,
            &hello.layout,
            &plans,
            &digest_key,
            cfg,
            stop,
        )
    });
    if let Err(e) = planned {
        let _ = send(links.txs[0].as_mut(), &Message::Abort(e.clone()));
        return Err(give_up(links, e));
    }
    Ok(Accepted {
        hello,
        codec,
        guest,
    })
}
