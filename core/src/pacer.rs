//! A token bucket for `--max-bandwidth`. Pure arithmetic over caller-supplied instants,
//! shared by the channel senders behind a mutex.

use std::time::{Duration, Instant};

/// Token-bucket rate limiter.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Pacer {
    /// Allows `rate` bytes per second with bursts of `burst` bytes.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: None,
        }
    }

    /// Takes `bytes` at time `now`; returns how long the caller must wait before sending.
    pub fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_cap() {
        let mut p = Pacer::new(1_000_000, 10_000);
        let mut now = Instant::now();
        let start = now;
        for _ in 0..1000 {
            let wait = p.reserve(now, 10_000);
            now += wait;
        }
        // 10 MB at 1 MB/s ≈ 10 s (the first burst is free).
        let secs = now.duration_since(start).as_secs_f64();
        assert!((9.9..10.1).contains(&secs), "{secs}");
    }
}
