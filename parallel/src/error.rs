//! Errors of the parallel crate: invalid layouts, communication failures, state that does
//! not fit a layout.

use meshrec_comm::CommError;

pub use meshrec_pipeline::MeshError;
use meshrec_pipeline::ScheduleError;

/// Everything that can go wrong in a parallel step.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("communication failed: {0}")]
    Comm(#[from] CommError),
    #[error("state does not fit the layout: {0}")]
    State(String),
    #[error("pipeline step: {0}")]
    Step(String),
    #[error("data-parallel reduction on rank {rank} of its DP group: {message}")]
    Dp { rank: usize, message: String },
}
