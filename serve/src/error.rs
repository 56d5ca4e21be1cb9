//! Errors of the serving library, each naming the file, key or address at fault.

use std::path::PathBuf;

/// Errors from configuring, loading or running the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    #[error("invalid serving config `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("`--set {0}`: expected section.key=value")]
    BadOverride(String),
    #[error(transparent)]
    Checkpoint(#[from] meshrec_model::CheckpointError),
    #[error("worker {worker} (`{device}`): {message}")]
    Device {
        worker: usize,
        device: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    #[error("the serving engine stopped: {0}")]
    Stopped(String),
    #[error("load generator: {0}")]
    Load(String),
    #[error("pruning: {0}")]
    Prune(String),
}

impl ServeError {
    pub fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ServeError::Invalid {
            key,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        ServeError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }
}
