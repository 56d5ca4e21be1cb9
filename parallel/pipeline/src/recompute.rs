//! Activation recomputation: what the executor keeps of a block's forward for backward,
//! and what the simulator counts as kept.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Activation recomputation (Korthikanti et al.): what a block keeps from its forward for
/// backward, and what backward runs again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Everything backward needs is kept.
    #[default]
    None,
    /// The attention's `seq²`-sized scores, probabilities and dropout mask are recomputed
    /// from the kept queries, keys and values.
    Selective,
    /// Each block keeps its input only and runs its forward again in backward.
    Full,
}

/// A recomputation mode that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown recomputation `{0}` (known: none, selective, full)")]
pub struct RecomputeError(pub String);

impl Recompute {
    pub fn from_name(name: &str) -> Result<Self, RecomputeError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "selective" => Ok(Self::Selective),
            "full" => Ok(Self::Full),
            _ => Err(RecomputeError(name.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Selective => "selective",
            Self::Full => "full",
        }
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
