//! `CommError`, the one error type of every communicator call.

use std::time::Duration;

use crate::stats::OpKind;

/// Shorthand for results of communicator calls.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Why a communicator call failed. Ranks are ranks *in the communicator that reports the
/// error* unless a field says otherwise. Cloneable so one failure can be relayed to every
/// rank of a group that was waiting on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A peer's end of the group went away (its thread or process ended, or it dropped its
    /// communicator) while this rank still expected data from it.
    #[error("peer rank {rank} was lost during {op}")]
    PeerLost {
        /// The rank that went away.
        rank: usize,
        /// The operation that was waiting.
        op: OpKind,
    },
    /// No message arrived from `rank` within the configured timeout.
    #[error("{op} timed out after {after:?} waiting for rank {rank}")]
    Timeout {
        /// The rank that was being waited for.
        rank: usize,
        /// The operation that was waiting.
        op: OpKind,
        /// The configured timeout.
        after: Duration,
    },
    /// Two ranks called the same collective with buffers of different lengths.
    #[error("{op}: rank {rank} has {len} elements but rank {peer} has {peer_len}")]
    SizeMismatch {
        /// The operation.
        op: OpKind,
        /// One rank and its length.
        rank: usize,
        /// Length (elements or bytes) at `rank`.
        len: usize,
        /// The other rank.
        peer: usize,
        /// Length at `peer`.
        peer_len: usize,
    },
    /// Two ranks called different collectives at the same point of their sequences.
    #[error("rank {rank} called {op} while rank {peer} called {peer_op}")]
    CollectiveMismatch {
        /// This rank.
        rank: usize,
        /// What this rank called.
        op: OpKind,
        /// The other rank.
        peer: usize,
        /// What the other rank called.
        peer_op: OpKind,
    },
    /// A rank of the local cluster panicked, or the cluster was aborted on a rank's
    /// account (an elastic run evicting it); the whole group (and every group split from
    /// it) is poisoned and every later call fails with this.
    #[error("group poisoned by world rank {world_rank}: {message}")]
    Poisoned {
        /// Rank in the cluster (the world) that panicked or was evicted.
        world_rank: usize,
        /// What happened to it (the panic message, or why it was evicted).
        message: String,
    },
    /// A rank argument (root, destination, source) is outside `0..size`.
    #[error("{what} rank {rank} is out of range for a group of {size}")]
    InvalidRank {
        /// Which argument.
        what: &'static str,
        /// The value given.
        rank: usize,
        /// The group size.
        size: usize,
    },
    /// A buffer given to a call has the wrong length for that call on this rank.
    #[error("{op}: {what} has length {got}, expected {expected}")]
    BadLength {
        /// The operation.
        op: OpKind,
        /// Which buffer.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An internal invariant of an engine failed (a bug in meshrec-comm; please report).
    #[error("internal error: {0}")]
    Internal(String),
    /// The MPI library reported an error, or MPI could not be used as asked.
    #[error("MPI: {0}")]
    Mpi(String),
    /// An error of a group that knows who its ranks are elsewhere (a mesh axis): `group`
    /// names the group ranks the error mentions as world ranks and mesh coordinates.
    #[error("{source} ({group})")]
    InGroup {
        group: String,
        source: Box<CommError>,
    },
}

impl CommError {
    /// The ranks of the reporting communicator the error names as peers (the one lost or
    /// waited for, the two that disagreed); none for the others.
    pub fn peer_ranks(&self) -> Vec<usize> {
        match self {
            Self::PeerLost { rank, .. } | Self::Timeout { rank, .. } => vec![*rank],
            Self::SizeMismatch { rank, peer, .. } | Self::CollectiveMismatch { rank, peer, .. } => {
                vec![*rank, *peer]
            }
            _ => Vec::new(),
        }
    }
}
