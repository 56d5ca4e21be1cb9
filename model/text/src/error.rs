//! Errors of the text encoder: each names the file it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: weights: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: text feature cache: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("{dir}: no sentence encoder here (missing {missing}); run `cargo xtask data minilm`")]
    NotFetched { dir: PathBuf, missing: String },
}
