//! The error of a training run, naming what failed: the file, the key, the rank.

use std::path::{Path, PathBuf};

/// Errors of a run, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] meshrec_model::DataError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("no training sequences: every user has fewer than two training items")]
    NoTrainingData,
    #[error("parallel run: {0}")]
    Parallel(String),
    /// A failure every rank of an MPI job meets alike (an invalid layout, say): world rank 0
    /// has printed it, and every rank stops with this, which the binary does not print again.
    #[error("stopped: world rank 0 reports why")]
    ReportedByLeader,
}

impl RunError {
    /// An I/O failure on `path`.
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        RunError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl From<meshrec_parallel::ParallelError> for RunError {
    fn from(e: meshrec_parallel::ParallelError) -> Self {
        RunError::Parallel(e.to_string())
    }
}

impl From<meshrec_comm::CommError> for RunError {
    fn from(e: meshrec_comm::CommError) -> Self {
        RunError::Parallel(e.to_string())
    }
}

impl From<meshrec_balance::BalanceError> for RunError {
    fn from(e: meshrec_balance::BalanceError) -> Self {
        RunError::Parallel(format!("balance: {e}"))
    }
}

impl From<meshrec_pipeline::MeshError> for RunError {
    fn from(e: meshrec_pipeline::MeshError) -> Self {
        RunError::Parallel(e.to_string())
    }
}

impl From<meshrec_pipeline::ScheduleError> for RunError {
    fn from(e: meshrec_pipeline::ScheduleError) -> Self {
        RunError::Parallel(e.to_string())
    }
}
