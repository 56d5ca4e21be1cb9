//! The error type of every fallible function in `meshrec-balance`.

use thiserror::Error;

/// What went wrong, naming the offending value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BalanceError {
    /// A `ModelShape` field is inconsistent (zero size, heads not dividing `d_model`...).
    #[error("invalid model shape: {0}")]
    InvalidShape(String),
    /// A device or cluster description is unusable (non-positive speed, unknown preset...).
    #[error("invalid device or cluster: {0}")]
    InvalidDevice(String),
    /// A cost profile is malformed (negative time, too few layers...).
    #[error("invalid cost profile: {0}")]
    InvalidProfile(String),
    /// The partitioning problem has no solution or bad input.
    #[error("cannot partition: {0}")]
    Partition(String),
    /// No partition fits the per-device memory limits.
    #[error("no partition of {layers} layers into {stages} stages fits in memory: {detail}")]
    OutOfMemory {
        /// Number of layers to place.
        layers: usize,
        /// Number of stages requested.
        stages: usize,
        /// Which stage or device ran out, and by how much.
        detail: String,
    },
    /// Rebalancer or DP split input is wrong (length mismatch, non-positive time...).
    #[error("invalid balancing input: {0}")]
    InvalidMeasurement(String),
    /// A layout (dp, tp, pp, schedule, micro-batches) is not valid for the model/cluster.
    #[error("invalid layout {layout}: {reason}")]
    InvalidLayout {
        /// The layout as `dp×tp×pp` plus schedule.
        layout: String,
        /// The violated constraint.
        reason: String,
    },
    /// The link model rejected its input.
    #[error("link model: {0}")]
    Link(String),
    /// The planner found nothing that fits.
    #[error("no layout fits: {0}")]
    NoFeasibleLayout(String),
    /// Writing a report or drawing failed.
    #[error("cannot write {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's message.
        message: String,
    },
}
