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

/// ZeRO's sharding of a data-parallel replica's training state (Rajbhandari et al.;
/// Megatron's distributed optimizer is stage 1). Parameters stay replicated in every stage.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum ZeroStage {
    /// Every replica holds the whole optimizer state and gradient.
    #[default]
    Off,
    /// The AdamW moments are sharded over the DP group: each rank updates its slice and
    /// the updated slices are all-gathered.
    Optimizer,
    /// The gradients too: buckets are reduce-scattered instead of all-reduced, and each
    /// rank keeps only its slice of the reduced gradient.
    Gradients,
}

/// A ZeRO stage that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ZeRO stage {0} (known: 0, 1, 2)")]
pub struct ZeroStageError(pub u64);

impl ZeroStage {
    /// The stage numbered as in DeepSpeed's `zero_optimization.stage` (0, 1, 2).
    pub fn from_number(n: u64) -> Result<Self, ZeroStageError> {
        match n {
            0 => Ok(Self::Off),
            1 => Ok(Self::Optimizer),
            2 => Ok(Self::Gradients),
            _ => Err(ZeroStageError(n)),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Optimizer => 1,
            Self::Gradients => 2,
        }
    }

    /// Whether the optimizer state is sharded.
    pub fn shards_optimizer(self) -> bool {
        self >= Self::Optimizer
    }

    /// Whether the reduced gradients are sharded.
    pub fn shards_gradients(self) -> bool {
        self == Self::Gradients
    }
}

impl fmt::Display for ZeroStage {
    /// `zero0`, `zero1`, `zero2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "zero{}", self.number())
    }
}

/// The elements of a parameter of `len` elements that DP rank `rank` of `size` owns under
/// ZeRO: every rank gets `ceil(len / size)` of them (FSDP's padded even split), the last
/// ranks fewer or none. Every parameter is sharded on its own, so a parameter's shard
/// lines up across the tensor- and pipeline-parallel peers that reduce it together.
pub fn zero_shard(len: usize, size: usize, rank: usize) -> std::ops::Range<usize> {
    let per = zero_shard_stride(len, size);
    let start = (rank * per).min(len);
    start..((rank + 1) * per).min(len)
}

/// The padded length of every rank's shard of a parameter of `len` elements over `size`
/// ranks (`ceil(len / size)`): the stride of the shard-major layouts that are
/// reduce-scattered and all-gathered.
pub fn zero_shard_stride(len: usize, size: usize) -> usize {
    len.div_ceil(size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_shards_cover_each_parameter_once() {
        for len in [0usize, 1, 5, 64, 65, 1000] {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let s = zero_shard(len, size, r);
                    assert_eq!(s.start, next, "len {len} size {size} rank {r}");
                    assert!(s.len() <= zero_shard_stride(len, size));
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
        assert_eq!(zero_shard(10, 4, 3), 9..10);
        assert_eq!(zero_shard(2, 4, 3), 2..2);
    }

    #[test]
    fn zero_stages_are_numbered_as_deepspeed_does() {
        for n in 0..3 {
            assert_eq!(u64::from(ZeroStage::from_number(n).unwrap().number()), n);
        }
        assert!(ZeroStage::from_number(3).is_err());
    }

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
