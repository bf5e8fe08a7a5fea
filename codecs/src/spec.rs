//! Parsing `--codec` values: an ordered, comma-separated list of stages such as
//! `dedup,xor-delta,lz4` or `zstd:9`, the word `raw`, or the word `auto`.

use std::fmt;

use crate::dedup;

/// Names of the stages this build knows, in their canonical spelling (`zstd` takes a
/// level, `zstd:1` … `zstd:22`, 3 by default; `dedup` a store size, `dedup:256MiB`).
pub const STAGE_NAMES: &[&str] = &["raw", "dedup", "xor-delta", "lz4", "zstd", "auto"];

/// Default zstd level.
pub const ZSTD_LEVEL: i32 = 3;

/// Most stages a pipeline may have (the tag has one bit per stage and one for references).
pub const MAX_STAGES: usize = 7;

/// One stage of a pipeline, as parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageSpec {
    /// `dedup[:SIZE]`: references to content the destination holds, in a store of SIZE
    /// bytes per channel.
    Dedup {
        /// Store size in bytes.
        capacity: usize,
    },
    /// `xor-delta`.
    XorDelta,
    /// `lz4`.
    Lz4,
    /// `zstd[:LEVEL]`.
    Zstd(i32),
}

impl StageSpec {
    /// The stage's name without parameters.
    pub fn name(&self) -> &'static str {
        match self {
            StageSpec::Dedup { .. } => "dedup",
            StageSpec::XorDelta => "xor-delta",
            StageSpec::Lz4 => "lz4",
            StageSpec::Zstd(_) => "zstd",
        }
    }
}

impl fmt::Display for StageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StageSpec::Dedup { capacity } if *capacity == dedup::DEFAULT_CAPACITY => {
                f.write_str("dedup")
            }
            StageSpec::Dedup { capacity } if capacity % (1 << 20) == 0 => {
                write!(f, "dedup:{}MiB", capacity >> 20)
            }
            StageSpec::Dedup { capacity } => write!(f, "dedup:{capacity}"),
            StageSpec::Zstd(level) => write!(f, "zstd:{level}"),
            other => f.write_str(other.name()),
        }
    }
}

/// A bad `--codec` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Nothing given.
    #[error("empty codec list")]
    Empty,
    /// Unknown stage name.
    #[error("unknown codec {name:?} (known: {known})")]
    Unknown {
        /// The name given.
        name: String,
        /// Known names.
        known: String,
    },
    /// A stage listed twice.
    #[error("codec {0:?} is listed twice")]
    Duplicate(String),
    /// `raw` or `auto` combined with others.
    #[error("{0:?} cannot be combined with other codecs")]
    Alone(&'static str),
    /// Too many stages.
    #[error("at most {MAX_STAGES} codecs in one pipeline")]
    TooMany,
    /// A bad parameter.
    #[error("{0}")]
    BadParameter(String),
    /// Stages in an order that cannot work.
    #[error("{0}")]
    Order(String),
}

/// What a `--codec` value asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A fixed list of stages (empty for `raw`).
    Fixed(Vec<StageSpec>),
    /// `auto`: the codec chosen per batch.
    Auto,
}

/// Parses a size such as `64MiB`, `1GiB`, `512KiB` or a byte count (the units every flag
/// takes).
fn parse_size(s: &str) -> Option<usize> {
    ferry_core::units::parse_size(s)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
}

fn stage(word: &str) -> Result<Option<StageSpec>, SpecError> {
    let (name, param) = match word.split_once(':') {
        Some((a, b)) => (a.trim(), Some(b.trim())),
        None => (word, None),
    };
    let canon = STAGE_NAMES
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
        .ok_or_else(|| SpecError::Unknown {
            name: word.to_string(),
            known: STAGE_NAMES.join(", "),
        })?;
    Ok(Some(match (*canon, param) {
        ("zstd", p) => StageSpec::Zstd(match p {
            None => ZSTD_LEVEL,
            Some(p) => p
                .parse::<i32>()
                .ok()
                .filter(|l| (1..=22).contains(l))
                .ok_or_else(|| {
                    SpecError::BadParameter(format!("zstd level {p:?} is not 1..=22"))
                })?,
        }),
        ("dedup", p) => StageSpec::Dedup {
            capacity: match p {
                None => dedup::DEFAULT_CAPACITY,
                Some(p) => parse_size(p)
                    .filter(|n| (64 << 10..=dedup::MAX_CAPACITY).contains(n))
                    .ok_or_else(|| {
                        SpecError::BadParameter(format!(
                            "dedup store size {p:?} is not a size from 64KiB to 4GiB (e.g. 256MiB)"
                        ))
                    })?,
            },
        },
        (c, Some(p)) => {
            return Err(SpecError::BadParameter(format!(
                "{c} takes no parameter ({p:?})"
            )))
        }
        ("raw", None) => return Ok(None),
        ("xor-delta", None) => StageSpec::XorDelta,
        ("lz4", None) => StageSpec::Lz4,
        // "auto" is handled by the caller; anything else is not in STAGE_NAMES.
        (other, None) => {
            return Err(SpecError::Unknown {
                name: other.to_string(),
                known: STAGE_NAMES.join(", "),
            })
        }
    }))
}

/// Parses a comma-separated spec such as `lz4`, `raw`, `auto` or `dedup,xor-delta,zstd:9`.
pub fn parse_spec(spec: &str) -> Result<Parsed, SpecError> {
    let words: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if words.is_empty() {
        return Err(SpecError::Empty);
    }
    if words.len() > MAX_STAGES {
        return Err(SpecError::TooMany);
    }
    for alone in ["raw", "auto"] {
        if words.iter().any(|w| w.eq_ignore_ascii_case(alone)) && words.len() > 1 {
            return Err(SpecError::Alone(alone));
        }
    }
    if words[0].eq_ignore_ascii_case("auto") {
        return Ok(Parsed::Auto);
    }
    let mut stages: Vec<StageSpec> = Vec::new();
    for w in &words {
        let Some(s) = stage(w)? else { continue };
        if stages.iter().any(|o| o.name() == s.name()) {
            return Err(SpecError::Duplicate(s.name().into()));
        }
        stages.push(s);
    }
    // Dedup looks at the raw unit and a reference ends the pipeline: it comes first. A
    // delta is computed against the raw unit: it comes before any compressor.
    for (i, s) in stages.iter().enumerate() {
        let must_follow_only: &[&str] = match s {
            StageSpec::Dedup { .. } => &[],
            StageSpec::XorDelta => &["dedup"],
            _ => continue,
        };
        if let Some(before) = stages[..i]
            .iter()
            .find(|b| !must_follow_only.contains(&b.name()))
        {
            return Err(SpecError::Order(format!(
                "{} must come before {} (it looks at raw units)",
                s.name(),
                before.name()
            )));
        }
    }
    Ok(Parsed::Fixed(stages))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(spec: &str) -> Vec<String> {
        match parse_spec(spec).unwrap() {
            Parsed::Fixed(s) => s.iter().map(ToString::to_string).collect(),
            Parsed::Auto => vec!["auto".into()],
        }
    }

    #[test]
    fn specs_parse_canonically() {
        assert!(fixed("raw").is_empty());
        assert_eq!(fixed(" LZ4 "), ["lz4"]);
        assert_eq!(fixed("zstd"), ["zstd:3"]);
        assert_eq!(fixed("ZSTD:19"), ["zstd:19"]);
        assert_eq!(fixed("dedup,xor-delta,lz4"), ["dedup", "xor-delta", "lz4"]);
        assert_eq!(fixed("dedup:256MiB,zstd"), ["dedup:256MiB", "zstd:3"]);
        assert_eq!(fixed("dedup:64m"), ["dedup"]);
        assert_eq!(parse_spec("auto").unwrap(), Parsed::Auto);
    }

    #[test]
    fn bad_specs_say_why() {
        assert_eq!(parse_spec(""), Err(SpecError::Empty));
        let e = parse_spec("lz5").unwrap_err();
        assert!(matches!(e, SpecError::Unknown { .. }));
        assert!(e.to_string().contains("known: raw, dedup"), "{e}");
        assert_eq!(
            parse_spec("lz4,lz4"),
            Err(SpecError::Duplicate("lz4".into()))
        );
        assert_eq!(
            parse_spec("zstd:3,zstd:5"),
            Err(SpecError::Duplicate("zstd".into()))
        );
        assert_eq!(parse_spec("raw,lz4"), Err(SpecError::Alone("raw")));
        assert_eq!(parse_spec("auto,lz4"), Err(SpecError::Alone("auto")));
        for bad in [
            "zstd:0",
            "zstd:x",
            "lz4:2",
            "dedup:12",
            "dedup:5XB",
            "dedup:5GiB",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(SpecError::BadParameter(_))),
                "{bad}"
            );
        }
        for bad in ["lz4,xor-delta", "xor-delta,dedup", "zstd,dedup"] {
            assert!(matches!(parse_spec(bad), Err(SpecError::Order(_))), "{bad}");
        }
        assert_eq!(
            parse_spec("dedup,xor-delta,lz4,zstd,a,b,c,d"),
            Err(SpecError::TooMany)
        );
    }
}
