//! Link profiles: what one direction of the emulated link does to packets.

use std::time::Duration;

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Direction {
    /// Bits per second; `None` = no shaping.
    pub rate_bps: Option<u64>,
    /// One-way propagation delay.
    #[serde(serialize_with = "ser_ms")]
    pub delay: Duration,
    /// Uniform jitter added to the delay, ± this much (packets keep their order).
    #[serde(serialize_with = "ser_ms")]
    pub jitter: Duration,
    /// Probability that a packet is lost, 0..1.
    pub loss: f64,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl Direction {
    /// Bytes the queue in front of the link may hold: one bandwidth-delay product of the
    /// round trip (at least 64 KiB), as a router sized by the rule of thumb would.
    pub fn queue_limit(&self) -> usize {
        match self.rate_bps {
            None => usize::MAX,
            Some(r) => {
                let rtt = (2 * self.delay).max(Duration::from_millis(1));
                ((r as f64 / 8.0 * rtt.as_secs_f64()) as usize).max(64 << 10)
            }
        }
    }
}

/// Both directions of a link.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Profile {
    /// From namespace A to B.
    pub a_to_b: Direction,
    /// From B to A.
    pub b_to_a: Direction,
}

impl Profile {
    /// The same in both directions.
    pub fn symmetric(d: Direction) -> Self {
        Self {
            a_to_b: d,
            b_to_a: d,
        }
    }

    /// A named profile: `lan`, `metro`, `wan`, `lossy`, `intercontinental`.
    pub fn named(name: &str) -> Option<Self> {
        let d = |mbit: Option<u64>, rtt_ms: u64, loss: f64| {
            Self::symmetric(Direction {
                rate_bps: mbit.map(|m| m * 1_000_000),
                delay: Duration::from_micros(rtt_ms * 500),
                jitter: Duration::ZERO,
                loss,
            })
        };
        Some(match name {
            "lan" => d(None, 0, 0.0),
            "metro" => d(Some(1000), 2, 0.0),
            "wan" => d(Some(100), 40, 0.0),
            "lossy" => d(Some(50), 80, 0.01),
            "intercontinental" => d(Some(200), 150, 0.001),
            _ => return None,
        })
    }

    /// Names of the built-in profiles.
    pub const NAMES: &'static [&'static str] =
        &["lan", "metro", "wan", "lossy", "intercontinental"];
}
