//! Errors of the parallel crate: invalid layouts, communication failures, state that does
//! not fit a layout.

use meshrec_comm::CommError;

use crate::mesh::{Axis, Mesh};
use crate::schedule::ScheduleError;

/// A layout that cannot run, naming the constraint it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MeshError {
    #[error("mesh axis {axis} must be at least 1")]
    ZeroAxis { axis: Axis },
    #[error("mesh order {order:?} must name dp, tp and pp once each")]
    BadOrder { order: [Axis; 3] },
    #[error("mesh {mesh} needs {} ranks but the world size {world_size} differs", mesh.world_size())]
    WorldSize { mesh: Mesh, world_size: usize },
    #[error("tp {tp} must divide {what} ({value}): each tensor-parallel rank holds whole heads and equal MLP shards")]
    TpDivides {
        tp: usize,
        what: &'static str,
        value: usize,
    },
    #[error("tp {tp} exceeds the item vocabulary ({vocab} rows): every rank needs item rows")]
    VocabTooSmall { tp: usize, vocab: usize },
    #[error("pp {pp} × virtual_stages {virtual_stages} model chunks exceed model.n_layers ({n_layers}): no pipeline chunk may be empty")]
    TooManyStages {
        pp: usize,
        virtual_stages: usize,
        n_layers: usize,
    },
    #[error("partition {partition:?} must have {chunks} non-empty entries summing to n_layers {n_layers}")]
    BadPartition {
        partition: Vec<usize>,
        chunks: usize,
        n_layers: usize,
    },
}

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
