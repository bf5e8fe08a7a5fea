//! `quic`: QUIC (quinn over rustls with ring), peers pinned by certificate as in `tls`.
//! Either N connections of one stream each (the default: 1.18× the throughput of N streams
//! on one connection with 2 channels on loopback here, since each connection's state
//! machine runs separately — see the README) or N streams on one connection; flow-control windows sized for a bandwidth-delay
//! product; congestion control `cubic` (default), `newreno` or `bbr` (experimental in
//! quinn).
//!
//! The engine's channels are blocking readers and writers; quinn is async. Each stream is
//! bridged by two tasks on a small tokio runtime the transport owns: one writes the chunks
//! the channel's writer queues (a bounded queue, so memory stays bounded and a stalled peer
//! turns into a write timeout), one queues what the stream delivers for the channel's reader.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::transport::{Channel, Listener, Transport, TransportError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::admission::{Limits, PeerKey, Pending};
use crate::auth::Identity;
use crate::group::{self, Groups, PREAMBLE_LEN};
use crate::io_err;

/// ALPN protocol id of Ferry over QUIC.
pub const ALPN: &[u8] = b"ferry-quic/2";
/// Reads time out after this long, as a poll interval.
const POLL: Duration = Duration::from_millis(200);
/// Chunks queued per stream in each direction.
const QUEUE: usize = 16;
/// What the listener answers once a stream's preamble is accepted.
const ADMITTED: u8 = b'K';

/// How the channels map onto QUIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicLayout {
    /// N streams on one connection.
    Streams,
    /// N connections of one stream each.
    Connections,
}

/// Congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (the default).
    Cubic,
    /// NewReno.
    NewReno,
    /// BBR (experimental in quinn).
    Bbr,
}

impl Congestion {
    /// Parses `cubic`, `newreno` or `bbr`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "newreno" => Ok(Self::NewReno),
            "bbr" => Ok(Self::Bbr),
            o => Err(format!(
                "unknown congestion controller {o:?} (cubic, newreno, bbr)"
            )),
        }
    }
}

/// QUIC options.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    /// Streams on one connection, or a connection per channel.
    pub layout: QuicLayout,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Bytes in flight a connection may have (its flow-control window): at least the
    /// bandwidth-delay product of the link.
    pub window: u64,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            layout: QuicLayout::Connections,
            congestion: Congestion::Cubic,
            // 1 Gbit/s × 150 ms ≈ 19 MB: room for the intercontinental profile.
            window: 32 << 20,
        }
    }
}

/// QUIC with pinned peers.
pub struct QuicTransport {
    io_timeout: Duration,
    identity: Arc<Identity>,
    opts: QuicOptions,
    rt: Arc<Runtime>,
}

fn setup(e: impl std::fmt::Display) -> TransportError {
    TransportError::Setup(e.to_string())
}

impl QuicTransport {
    /// A transport presenting `identity`, accepting only its pinned peers.
    pub fn new(
        io_timeout: Duration,
        identity: Arc<Identity>,
        opts: QuicOptions,
    ) -> Result<Self, TransportError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-quic")
            .enable_all()
            .build()
            .map_err(io_err("starting the QUIC runtime"))?;
        Ok(Self {
            io_timeout,
            identity,
            opts,
            rt: Arc::new(rt),
        })
    }

    fn transport_config(
        &self,
        streams: usize,
    ) -> Result<Arc<quinn::TransportConfig>, TransportError> {
        let mut t = quinn::TransportConfig::default();
        let window = self.opts.window;
        let varint = |v: u64| quinn::VarInt::try_from(v).map_err(setup);
        t.receive_window(varint(window)?);
        t.stream_receive_window(varint(window)?);
        t.send_window(window);
        t.max_concurrent_bidi_streams(varint(streams.max(1) as u64)?);
        t.keep_alive_interval(Some(Duration::from_millis(500)));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.io_timeout.max(Duration::from_secs(2)))
                .map_err(setup)?,
        ));
        match self.opts.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        Ok(Arc::new(t))
    }
}

/// Says what a failed connection means for the operator.
fn explain(e: &quinn::ConnectionError) -> String {
    let t = e.to_string();
    let cert = t.to_lowercase().contains("certificate");
    match e {
        // We refused the destination's certificate.
        quinn::ConnectionError::TransportError(_) if cert => {
            "the destination's certificate is not the pinned one (check --peer)".into()
        }
        // The destination closed on us during the handshake: it refused our certificate.
        quinn::ConnectionError::ConnectionClosed(_) if cert => {
            "the destination refused our certificate (is our fingerprint pinned there?)".into()
        }
        quinn::ConnectionError::TimedOut => {
            "no QUIC answer from the destination (is it listening with --transport quic?)".into()
        }
        _ => format!("QUIC: {t}"),
    }
}

fn timed_out() -> TransportError {
    TransportError::Setup(explain(&quinn::ConnectionError::TimedOut))
}

/// The blocking sending half of a stream.
struct QuicWriter {
    tx: Option<mpsc::Sender<bytes::Bytes>>,
    /// Keeps the runtime (and so the bridging tasks) alive as long as the channel.
    rt: Arc<Runtime>,
    io_timeout: Duration,
}

impl Write for QuicWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(tx) = &self.tx else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "channel closed"));
        };
        let n = data.len().min(256 << 10);
        let chunk = bytes::Bytes::copy_from_slice(&data[..n]);
        let timeout = self.io_timeout;
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, tx.send(chunk)).await })
        {
            Ok(Ok(())) => Ok(n),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the QUIC stream closed",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "QUIC stream blocked past the timeout",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The blocking receiving half of a stream.
struct QuicReader {
    rx: mpsc::Receiver<io::Result<bytes::Bytes>>,
    rt: Arc<Runtime>,
    pending: bytes::Bytes,
}

impl Read for QuicReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            let rx = &mut self.rx;
            match self
                .rt
                .block_on(async { tokio::time::timeout(POLL, rx.recv()).await })
            {
                Ok(Some(Ok(b))) => self.pending = b,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Ok(0),
                Err(_) => return Err(io::Error::new(io::ErrorKind::WouldBlock, "no data yet")),
            }
        }
        let n = out.len().min(self.pending.len());
        out[..n].copy_from_slice(&self.pending[..n]);
        let _ = self.pending.split_to(n);
        Ok(n)
    }
}

/// Bridges a stream pair into a channel; `conn` is closed by the closer.
fn channel(
    rt: &Arc<Runtime>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    io_timeout: Duration,
) -> Channel {
    let (wtx, mut wrx) = mpsc::channel::<bytes::Bytes>(QUEUE);
    rt.spawn(async move {
        while let Some(b) = wrx.recv().await {
            if send.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
        // Let the last bytes leave before the stream is dropped.
        let _ = send.stopped().await;
    });
    let (rtx, rrx) = mpsc::channel::<io::Result<bytes::Bytes>>(QUEUE);
    rt.spawn(async move {
        loop {
            match recv.read_chunk(1 << 20, true).await {
                Ok(Some(c)) => {
                    if rtx.send(Ok(c.bytes)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = rtx
                        .send(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)))
                        .await;
                    return;
                }
            }
        }
    });
    Channel {
        tx: Box::new(QuicWriter {
            tx: Some(wtx),
            rt: Arc::clone(rt),
            io_timeout,
        }),
        rx: Box::new(QuicReader {
            rx: rrx,
            rt: Arc::clone(rt),
            pending: bytes::Bytes::new(),
        }),
        closer: Some(Box::new(move || conn.close(0u32.into(), b"closed"))),
    }
}

impl Transport for QuicTransport {
    fn name(&self) -> String {
        "quic".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        group::check_count(channels)?;
        let target = crate::resolve(addr)?;
        let rustls = self
            .identity
            .client_config(ALPN)
            .map_err(|e| TransportError::Config(crate::error_chain(&e)))?;
        let crypto = QuicClientConfig::try_from(rustls).map_err(setup)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let per_conn = match self.opts.layout {
            QuicLayout::Streams => channels,
            QuicLayout::Connections => 1,
        };
        cfg.transport_config(self.transport_config(per_conn)?);
        let bind: SocketAddr = if target.is_ipv6() {
            "[::]:0".parse().map_err(setup)?
        } else {
            "0.0.0.0:0".parse().map_err(setup)?
        };
        let g = group::new_group();
        let layout = self.opts.layout;
        let timeout = self.io_timeout;
        let pairs = self.rt.block_on(async move {
            let endpoint = quinn::Endpoint::client(bind).map_err(io_err("binding a UDP socket"))?;
            let conns = match layout {
                QuicLayout::Streams => 1,
                QuicLayout::Connections => channels,
            };
            let mut connections = Vec::new();
            for _ in 0..conns {
                let connecting = endpoint
                    .connect_with(cfg.clone(), target, "ferry")
                    .map_err(|e| TransportError::Setup(format!("QUIC: {e}")))?;
                let c = tokio::time::timeout(timeout, connecting)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| TransportError::Setup(explain(&e)))?;
                connections.push(c);
            }
            let mut pairs = Vec::new();
            for i in 0..channels {
                let c = connections[i % conns].clone();
                let (mut s, mut r) = c
                    .open_bi()
                    .await
                    .map_err(|e| TransportError::Setup(explain(&e)))?;
                let refused = |e: &dyn std::fmt::Display| match c.close_reason() {
                    Some(reason) => TransportError::Setup(explain(&reason)),
                    None => TransportError::Setup(format!("QUIC: {e}")),
                };
                s.write_all(&group::preamble(g, i, channels))
                    .await
                    .map_err(|e| refused(&e))?;
                let mut answer = [0u8; 1];
                tokio::time::timeout(timeout, r.read_exact(&mut answer))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| refused(&e))?;
                if answer[0] != ADMITTED {
                    return Err(TransportError::Setup(
                        "the destination answered the channel preamble with garbage".into(),
                    ));
                }
                pairs.push((c, s, r));
            }
            // The endpoint lives as long as its connections.
            drop(endpoint);
            Ok::<_, TransportError>(pairs)
        })?;
        Ok(pairs
            .into_iter()
            .map(|(c, s, r)| channel(&self.rt, c, s, r, self.io_timeout))
            .collect())
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let bind = crate::resolve(addr)?;
        let rustls = self
            .identity
            .server_config(ALPN)
            .map_err(|e| TransportError::Config(crate::error_chain(&e)))?;
        let crypto = QuicServerConfig::try_from(rustls).map_err(setup)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(self.transport_config(usize::from(ferry_core::wire::MAX_CHANNELS))?);
        let endpoint = {
            let _guard = self.rt.enter();
            quinn::Endpoint::server(cfg, bind).map_err(io_err(format!("binding {addr}")))?
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let ep = endpoint.clone();
        let pending = Pending::new(Limits::default());
        self.rt.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                // A peer that has not proven it owns its address (a spoofed one could
                // exhaust another host's budget) is asked to, statelessly, first.
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    if let Err(e) = incoming.retry() {
                        tracing::warn!("QUIC retry failed: {e}");
                    }
                    continue;
                }
                let tx = tx.clone();
                let peer = incoming.remote_address();
                let abort = Arc::new(tokio::sync::Notify::new());
                let ticket = {
                    let abort = Arc::clone(&abort);
                    pending.register(PeerKey::Ip(peer.ip()), Box::new(move || abort.notify_one()))
                };
                let deadline = pending.limits().deadline;
                let table = Arc::clone(&pending);
                tokio::spawn(async move {
                    let conn = tokio::select! {
                        _ = abort.notified() => return,
                        c = tokio::time::timeout(deadline, incoming) => c,
                    };
                    drop(ticket);
                    let conn = match conn {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            table
                                .log
                                .note(&format!("refused a QUIC connection from {peer}: {e}"));
                            return;
                        }
                        Err(_) => {
                            table.log.note(&format!(
                                "refused a QUIC connection from {peer}: no handshake within {deadline:?}"
                            ));
                            return;
                        }
                    };
                    // Every stream the peer opens is a channel.
                    while let Ok((mut s, mut r)) = conn.accept_bi().await {
                        let mut pre = [0u8; PREAMBLE_LEN];
                        let parsed = match tokio::time::timeout(
                            Duration::from_secs(5),
                            r.read_exact(&mut pre),
                        )
                        .await
                        {
                            Ok(Ok(())) => group::parse(&pre),
                            Ok(Err(e)) => Err(format!("no channel preamble: {e}")),
                            Err(_) => Err("no channel preamble".into()),
                        };
                        match parsed {
                            Ok(p) => {
                                if s.write_all(&[ADMITTED]).await.is_ok()
                                    && tx.send((p, conn.clone(), s, r)).is_err()
                                {
                                    return;
                                }
                            }
                            Err(e) => tracing::warn!(%peer, "dropping QUIC stream: {e}"),
                        }
                    }
                });
            }
        });
        Ok(Box::new(QuicChannelListener {
            endpoint,
            rt: Arc::clone(&self.rt),
            io_timeout: self.io_timeout,
            streams: rx,
            groups: Groups::default(),
        }))
    }
}

type Admitted = (
    ([u8; 8], u16, u16),
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
);

/// A listener that assembles channel groups from admitted streams.
pub struct QuicChannelListener {
    endpoint: quinn::Endpoint,
    rt: Arc<Runtime>,
    io_timeout: Duration,
    streams: std::sync::mpsc::Receiver<Admitted>,
    groups: Groups<(quinn::Connection, quinn::SendStream, quinn::RecvStream)>,
}

impl Listener for QuicChannelListener {
    fn local_addr(&self) -> String {
        self.endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        loop {
            let (pre, c, s, r) = self
                .streams
                .recv()
                .map_err(|_| TransportError::Setup("the QUIC endpoint stopped".into()))?;
            match self.groups.add(pre, (c, s, r)) {
                Ok(Some(set)) => {
                    return Ok(set
                        .into_iter()
                        .map(|(c, s, r)| channel(&self.rt, c, s, r, self.io_timeout))
                        .collect())
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("dropping QUIC stream: {e}"),
            }
        }
    }
}
