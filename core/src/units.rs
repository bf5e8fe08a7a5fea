//! Parsing sizes (`256MiB`), rates (`100Mbit`, `50MiB/s`) and durations (`50ms`): the
//! one parser of every flag, codec spec (`dedup:256MiB`) and control request. Errors
//! name what was wrong; the caller adds the flag.

use std::time::Duration;

fn split_number(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    if num.is_empty() {
        return Err(format!("{s:?} does not start with a number"));
    }
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{num:?} is not a finite number"));
    }
    Ok((v, unit.trim()))
}

fn size_factor(unit: &str) -> Option<f64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return None,
    })
}

/// A size in bytes: `4096`, `256MiB`, `1GiB`, `10MB`, `64k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (v, unit) = split_number(s)?;
    let f = size_factor(unit).ok_or_else(|| {
        format!("unknown size unit {unit:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)")
    })?;
    let bytes = v * f;
    if bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("{s:?} is too large"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// A rate in bytes per second: `100Mbit`, `1Gbit`, `50MiB`, `50MiB/s`, `12MB/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (v, unit) = split_number(s)?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let lower = unit.to_ascii_lowercase();
    let bits = match lower.as_str() {
        "bit" | "bps" => Some(1.0),
        "kbit" | "kbps" => Some(1e3),
        "mbit" | "mbps" => Some(1e6),
        "gbit" | "gbps" => Some(1e9),
        _ => None,
    };
    let bytes = match bits {
        Some(f) => v * f / 8.0,
        None => {
            let f = size_factor(unit).ok_or_else(|| {
                format!("unknown rate unit {unit:?} in {s:?} (use e.g. 100Mbit, 1Gbit, 50MiB/s)")
            })?;
            v * f
        }
    };
    if bytes < 1.0 {
        return Err(format!("{s:?} is less than one byte per second"));
    }
    Ok(bytes as u64)
}

/// A duration: `50ms`, `2s`, `1.5s`, `100us`, `1m`; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (v, unit) = split_number(s)?;
    let secs = match unit {
        "" | "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => {
            return Err(format!(
                "unknown time unit {unit:?} in {s:?} (use us, ms, s, m)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A fraction in 0..=1, or a percentage like `25%`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let (v, unit) = split_number(s)?;
    let f = match unit {
        "" => v,
        "%" => v / 100.0,
        _ => {
            return Err(format!(
                "{s:?} is not a fraction (0.25) or a percentage (25%)"
            ))
        }
    };
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{s:?} is outside 0..=1"));
    }
    Ok(f)
}

/// Human-readable bytes.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("0.5B").is_err());
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("50MiB/s"), Ok(50 << 20));
        assert!(parse_rate("5furlongs").is_err());
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_millis(20)));
        assert!(parse_duration("3 fortnights").is_err());
        assert_eq!(parse_fraction("25%"), Ok(0.25));
        assert!(parse_fraction("1.5").is_err());
    }
}
