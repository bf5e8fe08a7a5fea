//! What the bundled guest program does, as the VMM configures and paces it.

/// The order in which a pass visits the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pattern {
    /// Every page in address order.
    #[default]
    Sequential,
    /// Every page once per pass, in a scrambled order (a large stride coprime with the
    /// page count): no locality, as a uniform random writer, yet still verifiable.
    Scatter,
    /// The guest stops at its first pacing point and writes nothing more.
    Idle,
}

impl Pattern {
    /// Parses a pattern name (`uniform` is accepted for `scatter`, as the sim guest calls
    /// its random pattern).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "sequential" => Ok(Self::Sequential),
            "scatter" | "uniform" => Ok(Self::Scatter),
            "idle" => Ok(Self::Idle),
            _ => Err(format!(
                "unknown KVM workload {s:?} (known: sequential, scatter, idle)"
            )),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Scatter => "scatter",
            Self::Idle => "idle",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Sequential => 0,
            Self::Scatter => 1,
            Self::Idle => 2,
        }
    }

    pub(crate) fn from_code(c: u64) -> Option<Self> {
        match c {
            0 => Some(Self::Sequential),
            1 => Some(Self::Scatter),
            2 => Some(Self::Idle),
            _ => None,
        }
    }
}

/// Workload settings (they travel with the guest's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Workload {
    /// Page order.
    pub pattern: Pattern,
    /// Page writes per second over all vCPUs (0 = as fast as the vCPUs run).
    pub dirty_rate: u64,
    /// Disk block writes per second over all vCPUs (0 = none).
    pub disk_rate: u64,
}
