//! `LocalCluster`: creates the ranks of a cluster and runs a closure per rank on scoped
//! threads, turning a rank's panic into poison for the others and an error for the caller.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::communicator::{self, LocalCommunicator};
use super::config::LocalConfig;
use crate::error::{CommError, Result};

/// Why `LocalCluster::run` failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    /// A rank's closure panicked (the group was poisoned, so the others saw errors).
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank whose closure panicked.
        rank: usize,
        /// Its panic message.
        message: String,
    },
    /// The cluster could not be set up.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// A group of `n` local ranks (threads of this process).
#[derive(Debug)]
pub struct LocalCluster {
    comms: Vec<LocalCommunicator>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl LocalCluster {
    /// A cluster of `n >= 1` ranks with the default configuration.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_config(n, LocalConfig::default())
    }

    /// A cluster of `n >= 1` ranks.
    pub fn with_config(n: usize, config: LocalConfig) -> Result<Self> {
        if n == 0 {
            return Err(CommError::InvalidArgument(
                "a local cluster needs at least one rank".into(),
            ));
        }
        if config.segment_bytes < 4 {
            return Err(CommError::InvalidArgument(format!(
                "segment_bytes {} is below one f32",
                config.segment_bytes
            )));
        }
        Ok(Self {
            comms: communicator::world(config, n),
        })
    }

    /// The `n` communicators, rank order; hand each to its own thread.
    pub fn into_communicators(self) -> Vec<LocalCommunicator> {
        self.comms
    }

    /// Runs `f` on `n` scoped threads, one per rank, with the default configuration, and
    /// returns the results in rank order. A panicking rank poisons the group (the others'
    /// calls fail with `CommError::Poisoned`) and makes this return `RankPanicked`.
    pub fn run<T, F>(n: usize, f: F) -> Result<Vec<T>, ClusterError>
    where
        T: Send,
        F: Fn(LocalCommunicator) -> T + Sync,
    {
        Self::run_with_config(n, LocalConfig::default(), f)
    }

    /// [`LocalCluster::run`] with a configuration.
    pub fn run_with_config<T, F>(
        n: usize,
        config: LocalConfig,
        f: F,
    ) -> Result<Vec<T>, ClusterError>
    where
        T: Send,
        F: Fn(LocalCommunicator) -> T + Sync,
    {
        let comms = Self::with_config(n, config)?.into_communicators();
        let f = &f;
        let results: Vec<std::thread::Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let shared = c.shared();
                    let rank = c.world_rank();
                    s.spawn(move || {
                        let r = catch_unwind(AssertUnwindSafe(|| f(c)));
                        if let Err(p) = &r {
                            shared.poison(
                                rank,
                                format!("panicked: {}", panic_message(p.as_ref())),
                                false,
                            );
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(Err))
                .collect()
        });
        let mut out = Vec::with_capacity(n);
        let mut first_panic = None;
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => out.push(v),
                Err(p) => {
                    if first_panic.is_none() {
                        first_panic = Some(ClusterError::RankPanicked {
                            rank,
                            message: panic_message(p.as_ref()),
                        });
                    }
                }
            }
        }
        match first_panic {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}
