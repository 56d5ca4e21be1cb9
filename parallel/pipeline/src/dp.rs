//! How data-parallel replicas combine their work: the mode the trainer runs and the
//! simulator models.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Data-parallel synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// Every step's gradients averaged before the step's update (DDP): bucketed all-reduce
    /// overlapped with backward, every replica waits for all.
    Sync,
    /// Updates applied when their reduction has arrived, at most `max_staleness` steps after
    /// the step that computed them (stale-synchronous parallel).
    Async { max_staleness: u64 },
    /// Replicas step on their own gradients and average parameters every `sync_every`
    /// steps (at least 1).
    LocalSgd { sync_every: u64 },
}

/// A DP mode that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpModeError {
    #[error("unknown dp.mode `{0}` (known: sync, async, local_sgd)")]
    Unknown(String),
    #[error("local SGD needs dp.sync_every >= 1")]
    ZeroSyncEvery,
}

impl DpMode {
    /// The mode named as in the trainer's `[dp] mode` (`sync`, `async`, `local_sgd`), with
    /// the parameter of each (`max_staleness` for async, `sync_every` for local SGD; the
    /// other is ignored).
    pub fn from_name(name: &str, max_staleness: u64, sync_every: u64) -> Result<Self, DpModeError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "sync" => Ok(Self::Sync),
            "async" => Ok(Self::Async { max_staleness }),
            "local_sgd" => {
                if sync_every == 0 {
                    return Err(DpModeError::ZeroSyncEvery);
                }
                Ok(Self::LocalSgd { sync_every })
            }
            _ => Err(DpModeError::Unknown(name.to_string())),
        }
    }

    /// `sync`, `async` or `local_sgd`: the config name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async { .. } => "async",
            Self::LocalSgd { .. } => "local_sgd",
        }
    }

    /// Whether replicas meet every step (their gradients are averaged before the update).
    pub fn meets_every_step(&self) -> bool {
        matches!(self, Self::Sync)
    }
}

impl fmt::Display for DpMode {
    /// Short label: `sync`, `async-s4`, `local-sgd-k8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sync => f.write_str("sync"),
            Self::Async { max_staleness } => write!(f, "async-s{max_staleness}"),
            Self::LocalSgd { sync_every } => write!(f, "local-sgd-k{sync_every}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_their_parameter() {
        assert_eq!(DpMode::from_name("sync", 3, 4), Ok(DpMode::Sync));
        assert_eq!(
            DpMode::from_name(" Async ", 3, 4),
            Ok(DpMode::Async { max_staleness: 3 })
        );
        assert_eq!(
            DpMode::from_name("local_sgd", 3, 4),
            Ok(DpMode::LocalSgd { sync_every: 4 })
        );
        assert_eq!(
            DpMode::from_name("local_sgd", 3, 0),
            Err(DpModeError::ZeroSyncEvery)
        );
        let err = DpMode::from_name("gossip", 0, 1).unwrap_err().to_string();
        assert!(err.contains("gossip") && err.contains("local_sgd"), "{err}");
        for mode in [
            DpMode::Sync,
            DpMode::Async { max_staleness: 2 },
            DpMode::LocalSgd { sync_every: 8 },
        ] {
            let back = DpMode::from_name(mode.name(), 2, 8).unwrap();
            assert_eq!(back, mode);
        }
        assert_eq!(
            DpMode::LocalSgd { sync_every: 8 }.to_string(),
            "local-sgd-k8"
        );
        assert_eq!(DpMode::Async { max_staleness: 4 }.to_string(), "async-s4");
    }
}
