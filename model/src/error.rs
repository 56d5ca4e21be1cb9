//! Error types of the model crate: data loading and configuration.

use std::path::PathBuf;

/// Where in an input file something went wrong: the file and the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Errors from reading or preparing interaction data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Malformed { at: Location, message: String },
    #[error("{file}: header lacks the required column `{column}` (found: {found})")]
    MissingColumn {
        file: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}: no interaction file found (looked for *.inter, u.data, ratings.dat)")]
    NoInteractions { path: PathBuf },
    #[error("{path}: the file holds no interactions")]
    Empty { path: PathBuf },
    #[error("{path}: the file holds no rows")]
    NoRows { path: PathBuf },
    #[error("{file}: no row for {kind} `{token}`, which the interactions name")]
    MissingSideRow {
        file: PathBuf,
        kind: &'static str,
        token: String,
    },
    #[error("invalid data parameter `{key}`: {message}")]
    InvalidParameter { key: &'static str, message: String },
}

/// Errors from an invalid model configuration; `key` names the offending field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid model config `{key}`: {message}")]
pub struct ConfigError {
    pub key: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

/// Errors from writing or reading a serving checkpoint (weights plus the metadata that
/// rebuilds the model and maps ids); each names the file and, where one is at fault, the
/// metadata key or line.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: metadata key `{key}` {message}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("{path}: the weights do not match the model the metadata describes: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{at}: {message}")]
    Users { at: Location, message: String },
    #[error("{path}: invalid model config in the metadata: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
}
