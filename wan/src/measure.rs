//! Measuring the emulated link as a user would: round-trip time of small messages and the
//! throughput of one plain TCP flow from A to B, with a chosen congestion controller.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::{Wan, WanError, ADDR_B};

/// A measurement of the link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// Median round trip of 1-byte messages, ms.
    pub rtt_ms: f64,
    /// Smallest and largest round trip, ms.
    pub rtt_min_ms: f64,
    /// Largest round trip, ms.
    pub rtt_max_ms: f64,
    /// Goodput of one TCP flow A→B, Mbit/s.
    pub tcp_mbps: f64,
    /// The congestion controller used.
    pub congestion: String,
    /// Seconds the flow ran.
    pub seconds: f64,
}

fn fail(what: &str) -> impl Fn(std::io::Error) -> WanError + '_ {
    move |e| WanError::Measure(format!("{what}: {e}"))
}

fn set_congestion(s: &TcpStream, cc: &str) -> Result<(), WanError> {
    // SAFETY: TCP_CONGESTION reads a byte string of the given length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(WanError::Measure(format!(
            "congestion control {cc}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Measures round trips (`pings` of them) and `seconds` of one TCP flow with `cc`.
pub fn measure(wan: &Wan, pings: usize, seconds: f64, cc: &str) -> Result<Measurement, WanError> {
    let listener = wan
        .b
        .enter(|| TcpListener::bind(SocketAddr::from((ADDR_B, 0))))?
        .map_err(fail("listening in B"))?;
    let port = listener
        .local_addr()
        .map_err(fail("listening in B"))?
        .port();
    let to = SocketAddr::from((ADDR_B, port));
    let server = std::thread::spawn(move || -> Result<(u64, f64), WanError> {
        // Echo for the pings.
        let (mut s, _) = listener.accept().map_err(fail("accepting"))?;
        s.set_nodelay(true).map_err(fail("nodelay"))?;
        let mut b = [0u8; 1];
        while let Ok(1) = s.read(&mut b) {
            s.write_all(&b).map_err(fail("echo"))?;
        }
        // Sink for the flow.
        let (mut s, _) = listener.accept().map_err(fail("accepting"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    got += n as u64;
                }
                Err(e) => return Err(WanError::Measure(format!("receiving: {e}"))),
            }
        }
        Ok((got, first.map_or(0.0, |f| f.elapsed().as_secs_f64())))
    });
    let connect = || -> Result<TcpStream, WanError> {
        wan.a
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?
            .map_err(fail("connecting from A"))
    };
    let mut rtts = Vec::with_capacity(pings);
    {
        let mut s = connect()?;
        s.set_nodelay(true).map_err(fail("nodelay"))?;
        let mut b = [7u8; 1];
        for _ in 0..pings {
            let t = Instant::now();
            s.write_all(&b).map_err(fail("ping"))?;
            s.read_exact(&mut b).map_err(fail("pong"))?;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut s = connect()?;
    set_congestion(&s, cc)?;
    let chunk = vec![0x42u8; 256 << 10];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        s.write_all(&chunk).map_err(fail("sending"))?;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(fail("closing"))?;
    let (got, secs) = server
        .join()
        .map_err(|_| WanError::Measure("the receiver panicked".into()))??;
    rtts.sort_by(f64::total_cmp);
    Ok(Measurement {
        rtt_ms: rtts.get(rtts.len() / 2).copied().unwrap_or(0.0),
        rtt_min_ms: rtts.first().copied().unwrap_or(0.0),
        rtt_max_ms: rtts.last().copied().unwrap_or(0.0),
        tcp_mbps: if secs > 0.0 {
            got as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        },
        congestion: cc.into(),
        seconds: secs,
    })
}
