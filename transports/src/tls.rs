//! `tls`: the multi-channel TCP layout with every connection inside TLS 1.3 (rustls, ring),
//! both peers authenticated by pinned certificate fingerprints ([`crate::auth`]). The
//! channel preamble travels inside the encrypted stream.
//!
//! A channel is read by one thread and written by another, and a rustls connection is one
//! state machine for both directions. So the socket is split: the reader blocks on its own
//! socket handle without holding any lock and only then takes the connection's lock to
//! decrypt; the writer takes the send lock (which orders whole TLS records on the wire),
//! encrypts under the connection lock, and writes outside it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::transport::{Channel, Listener, Transport, TransportError};
use rustls::pki_types::ServerName;

use crate::admission::{self, Acceptor, Handshaken, Limits};
use crate::auth::Identity;
use crate::group::{self, Groups, PREAMBLE_LEN};
use crate::io_err as io;
use crate::quic::Congestion;
use crate::tcp::{set_congestion, tune};

/// ALPN protocol id of Ferry's channels.
pub const ALPN: &[u8] = b"ferry/2";
/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Multi-channel TCP inside TLS 1.3 with pinned peers.
#[derive(Clone)]
pub struct TlsTransport {
    io_timeout: Duration,
    identity: Arc<Identity>,
    congestion: Option<Congestion>,
}

impl TlsTransport {
    /// A transport presenting `identity` and accepting only its pinned peers.
    pub fn new(io_timeout: Duration, identity: Arc<Identity>) -> Self {
        Self {
            io_timeout,
            identity,
            congestion: None,
        }
    }

    /// Uses congestion controller `cc` for the connections it opens.
    pub fn with_congestion(mut self, cc: Congestion) -> Self {
        self.congestion = Some(cc);
        self
    }
}

/// Says what a failed handshake means for the operator, from the rustls error inside.
fn explain(e: &io::Error, we_are_client: bool) -> String {
    use rustls::AlertDescription as A;
    let peer = if we_are_client {
        "destination"
    } else {
        "source"
    };
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        // Our verifier turned the peer's certificate down.
        Some(rustls::Error::InvalidCertificate(_)) => {
            format!("the {peer}'s certificate is not the pinned one (check --peer)")
        }
        // The peer's verifier turned ours down.
        Some(rustls::Error::AlertReceived(
            A::AccessDenied
            | A::BadCertificate
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::UnknownCA,
        )) => format!("the {peer} refused our certificate (is our fingerprint pinned there?)"),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            "the peer does not speak TLS (plaintext tcp? both sides need --transport tls)".into()
        }
        _ => format!("TLS handshake failed: {e}"),
    }
}

/// What the listener answers inside TLS once a channel is admitted, so the connector
/// learns at connect time (not at its first read) whether its certificate was accepted.
const ADMITTED: u8 = b'K';

struct Shared {
    conn: Mutex<rustls::Connection>,
    /// The sending socket; its lock orders whole TLS records.
    send: Mutex<TcpStream>,
}

impl Shared {
    /// Encrypts `data` (all of it when `all`) and sends the records; returns bytes taken.
    fn send(&self, data: &[u8], scratch: &mut Vec<u8>) -> io::Result<usize> {
        let mut sock = self.send.lock().unwrap_or_else(|p| p.into_inner());
        let n = {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let n = if data.is_empty() {
                0
            } else {
                conn.writer().write(data)?
            };
            while conn.wants_write() {
                conn.write_tls(scratch)?;
            }
            n
        };
        sock.write_all(scratch)?;
        scratch.clear();
        Ok(n)
    }
}

struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    buf: Vec<u8>,
    /// Received ciphertext not yet handed to rustls: `buf[at..len]`.
    at: usize,
    len: usize,
    scratch: Vec<u8>,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let fed = {
                let mut conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.at < self.len {
                    let taken = conn.read_tls(&mut &self.buf[self.at..self.len])?;
                    self.at += taken;
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    Some(conn.wants_write())
                } else {
                    None
                }
            };
            match fed {
                // E.g. a key update to acknowledge.
                Some(true) => {
                    self.shared.send(&[], &mut self.scratch)?;
                    continue;
                }
                // Fed: what it decrypted is read at the top.
                Some(false) => continue,
                None => {}
            }
            // Nothing buffered: block on the socket without holding any lock.
            let n = self.sock.read(&mut self.buf)?;
            if n == 0 {
                return Ok(0);
            }
            self.at = 0;
            self.len = n;
        }
    }
}

struct TlsWriter {
    shared: Arc<Shared>,
    scratch: Vec<u8>,
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.shared.send(data, &mut self.scratch)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn channel(conn: rustls::Connection, sock: TcpStream) -> Result<Channel, TransportError> {
    let send = sock.try_clone().map_err(io("cloning a socket"))?;
    let closer = group::closer(&sock)?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        send: Mutex::new(send),
    });
    Ok(Channel {
        tx: Box::new(TlsWriter {
            shared: Arc::clone(&shared),
            scratch: Vec::new(),
        }),
        rx: Box::new(TlsReader {
            shared,
            sock,
            buf: vec![0; 64 << 10],
            at: 0,
            len: 0,
            scratch: Vec::new(),
        }),
        closer: Some(closer),
    })
}

impl Transport for TlsTransport {
    fn name(&self) -> String {
        "tls".into()
    }

    fn connect(&self, addr: &str, channels: usize) -> Result<Vec<Channel>, TransportError> {
        group::check_count(channels)?;
        let target = crate::resolve(addr)?;
        let config = Arc::new(
            self.identity
                .client_config(ALPN)
                .map_err(|e| TransportError::Config(crate::error_chain(&e)))?,
        );
        let name =
            ServerName::try_from("ferry").map_err(|e| TransportError::Config(e.to_string()))?;
        let g = group::new_group();
        let mut out = Vec::with_capacity(channels);
        for i in 0..channels {
            let mut s = TcpStream::connect_timeout(&target, self.io_timeout)
                .map_err(io(format!("connecting to {addr}")))?;
            tune(&s, self.io_timeout).map_err(io("configuring a socket"))?;
            set_congestion(&s, self.congestion).map_err(io("configuring a socket"))?;
            s.set_read_timeout(Some(HANDSHAKE))
                .map_err(io("configuring a socket"))?;
            let mut conn = rustls::ClientConnection::new(Arc::clone(&config), name.clone())
                .map_err(|e| TransportError::Config(e.to_string()))?;
            {
                // Writing drives the handshake; the listener's answer proves it accepted us.
                let mut stream = rustls::Stream::new(&mut conn, &mut s);
                let mut answer = [0u8; 1];
                stream
                    .write_all(&group::preamble(g, i, channels))
                    .and_then(|_| stream.read_exact(&mut answer))
                    .map_err(|e| TransportError::Setup(explain(&e, true)))?;
                if answer[0] != ADMITTED {
                    return Err(TransportError::Setup(
                        "the destination answered the channel preamble with garbage".into(),
                    ));
                }
            }
            tune(&s, self.io_timeout).map_err(io("configuring a socket"))?;
            out.push(channel(conn.into(), s)?);
        }
        Ok(out)
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>, TransportError> {
        let l = TcpListener::bind(addr).map_err(io(format!("binding {addr}")))?;
        let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let config = Arc::new(
            self.identity
                .server_config(ALPN)
                .map_err(|e| TransportError::Config(crate::error_chain(&e)))?,
        );
        let io_timeout = self.io_timeout;
        let acceptor = admission::spawn(
            l,
            Limits::default(),
            Arc::new(move |s: TcpStream, deadline| admit(&config, s, deadline, io_timeout)),
        )?;
        Ok(Box::new(TlsChannelListener {
            local,
            acceptor,
            groups: Groups::default(),
        }))
    }
}

type Authenticated = (rustls::Connection, TcpStream);

/// A listener that authenticates each connection and assembles channel groups.
pub struct TlsChannelListener {
    local: String,
    acceptor: Acceptor<Authenticated>,
    groups: Groups<Authenticated>,
}

/// A connection's handshake on the listener: TLS (the client's certificate is checked in
/// it), then the preamble inside, all by `deadline`.
fn admit(
    config: &Arc<rustls::ServerConfig>,
    mut s: TcpStream,
    deadline: Instant,
    io_timeout: Duration,
) -> Result<Handshaken<Authenticated>, String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    // The acceptor closes the socket at the deadline; the timeouts only bound each call.
    s.set_read_timeout(Some(admission::left(deadline)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(admission::left(deadline)))
        .map_err(|e| e.to_string())?;
    let mut conn = rustls::ServerConnection::new(Arc::clone(config)).map_err(|e| e.to_string())?;
    let mut pre = [0u8; PREAMBLE_LEN];
    let pre = {
        let mut stream = rustls::Stream::new(&mut conn, &mut s);
        stream
            .read_exact(&mut pre)
            .map_err(|e| explain(&e, false))?;
        let pre = group::parse(&pre)?;
        stream
            .write_all(&[ADMITTED])
            .map_err(|e| format!("answering the preamble: {e}"))?;
        pre
    };
    tune(&s, io_timeout).map_err(|e| e.to_string())?;
    Ok((pre, (conn.into(), s)))
}

impl Listener for TlsChannelListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> Result<Vec<Channel>, TransportError> {
        admission::next_group(&self.acceptor.admitted, &mut self.groups)?
            .into_iter()
            .map(|(c, s)| channel(c, s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Fingerprint;

    /// A certificate and key written to `dir`, and its fingerprint.
    fn material(
        dir: &std::path::Path,
        name: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf, Fingerprint) {
        crate::auth::generate_files(dir, name).unwrap()
    }

    fn identity(
        m: &(std::path::PathBuf, std::path::PathBuf, Fingerprint),
        peers: &[Fingerprint],
    ) -> Arc<Identity> {
        Arc::new(Identity::load(&m.0, &m.1, peers.to_vec()).unwrap())
    }

    struct Pair {
        src: Arc<Identity>,
        dst: Arc<Identity>,
        stranger: Arc<Identity>,
        _dir: tempfile::TempDir,
    }

    fn pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let s = material(dir.path(), "src");
        let d = material(dir.path(), "dst");
        let x = material(dir.path(), "stranger");
        Pair {
            src: identity(&s, &[d.2]),
            dst: identity(&d, &[s.2]),
            stranger: identity(&x, &[d.2]),
            _dir: dir,
        }
    }

    const T: Duration = Duration::from_secs(5);

    /// Reads exactly `buf.len()` bytes, retrying the poll timeouts channels return.
    fn read_full(rx: &mut dyn Read, buf: &mut [u8]) {
        let mut at = 0;
        while at < buf.len() {
            match rx.read(&mut buf[at..]) {
                Ok(0) => panic!("closed after {at} bytes"),
                Ok(n) => at += n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn pinned_peers_exchange_data_on_every_channel() {
        let p = pair();
        let mut l = TlsTransport::new(T, p.dst.clone())
            .listen("127.0.0.1:0")
            .unwrap();
        let addr = l.local_addr();
        let src = p.src.clone();
        let c = std::thread::spawn(move || {
            let mut chans = TlsTransport::new(T, src).connect(&addr, 3).unwrap();
            for (i, ch) in chans.iter_mut().enumerate() {
                ch.tx.write_all(&vec![i as u8; 100_000]).unwrap();
                let mut back = [0u8; 4];
                read_full(&mut ch.rx, &mut back);
                assert_eq!(back, [i as u8 + 1; 4]);
            }
        });
        let mut got = l.accept().unwrap();
        assert_eq!(got.len(), 3);
        for (i, ch) in got.iter_mut().enumerate() {
            let mut b = vec![0u8; 100_000];
            read_full(&mut ch.rx, &mut b);
            assert!(b.iter().all(|x| *x == i as u8));
            ch.tx.write_all(&[i as u8 + 1; 4]).unwrap();
        }
        c.join().unwrap();
    }

    #[test]
    fn a_wrong_fingerprint_or_an_unpinned_source_is_refused() {
        let p = pair();
        let mut l = TlsTransport::new(T, p.dst.clone())
            .listen("127.0.0.1:0")
            .unwrap();
        let addr = l.local_addr();
        // The listener runs until a legitimate source arrives after the impostors.
        let server = std::thread::spawn(move || l.accept().map(|c| c.len()));
        // The source pins someone else as the destination.
        let wrong_pin = Arc::new(Identity {
            peers: vec![p.stranger.fingerprint()],
            ..(*p.src).clone()
        });
        let e = TlsTransport::new(T, wrong_pin)
            .connect(&addr, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not the pinned one"), "{e}");
        // A source the destination never pinned.
        let e = TlsTransport::new(T, p.stranger.clone())
            .connect(&addr, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("refused our certificate"), "{e}");
        // A plaintext client.
        let e = crate::TcpTransport::new(T).connect(&addr, 1).err().unwrap();
        assert!(e.to_string().contains("refused the channel"), "{e}");
        assert_eq!(
            TlsTransport::new(T, p.src.clone())
                .connect(&addr, 2)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(server.join().unwrap().unwrap(), 2);
    }
}
