//! Collectives for meshrec: the `Communicator` trait and its local, MPI and simulated engines.
//!
//! * [`Communicator`] — the object-safe trait every engine implements (`&dyn Communicator`,
//!   `Box<dyn Communicator>`); it is `Send` so a communicator can move to its rank's thread.
//! * [`local`] — N ranks as N threads of one process, crossbeam channels; in-place
//!   (shared-memory), ring and recursive-doubling algorithms ([`LocalCluster`]).
//! * `mpi` (feature `mpi`) — rsmpi over the system MPI, launched by `mpirun`.
//! * [`sim`] — wraps any engine, adds a link model and a virtual clock ([`SimCommunicator`]).
//! * [`cost`] — the alpha-beta cost formulas (shared with the balance crate's simulator).
//! * [`bucket`] — gradient bucketing (fusion buffers reduced as soon as full).
//!
//! # Semantics shared by all engines
//! * Collectives must be called by every rank of a communicator in the same order (as in MPI);
//!   blocking and non-blocking variants do not match each other.
//! * Buffer lengths must agree across ranks where a collective needs it; a disagreement is
//!   reported as [`CommError::SizeMismatch`] naming both ranks, never as a hang or garbage.
//! * Chunking rule of [`Communicator::reduce_scatter`]: an input of `len` elements is cut into
//!   `size` contiguous chunks; chunk `r` has `len / size` elements plus one if
//!   `r < len % size` (the counts one would pass to `MPI_Reduce_scatter`); see [`chunk_range`].
//! * Point-to-point messages between one pair of ranks with one tag arrive in send order.
//! * Reductions are typed by [`DType`] (`f32`, `i64`, `f16`, `bf16`) through
//!   [`Communicator::all_reduce_bytes`] / [`Communicator::reduce_scatter_bytes`], which every
//!   engine implements with its own algorithm; callers use [`all_reduce_as`] and
//!   [`reduce_scatter_as`] on typed slices. The `f32` methods are the same reductions.

pub mod bucket;
mod communicator;
pub mod cost;
mod dtype;
mod error;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod observed;
mod op;
mod reduce;
mod request;
pub mod sim;
mod stats;
mod typed;

// This file only declares and re-exports: every item lives in the module that owns it, and
// modules name each other by those paths, never through the root, so that the modules form
// a DAG (the root above all of them).
pub use bucket::{BucketHandle, GradBucketer, ReducedBucket};
pub use communicator::{chunk_len, chunk_range, Communicator};
pub use dtype::{DType, Element};
pub use error::{CommError, Result};
pub use local::{AbortHandle, ClusterError, LocalCluster, LocalCommunicator, LocalConfig};
pub use observed::{Observed, WaitProbe};
pub use op::ReduceOp;
pub use request::{Completion, Request};
pub use sim::{SimClock, SimCommunicator};
pub use stats::{CommStats, OpKind, OpStats, StatsRecorder};
pub use typed::{all_reduce_as, reduce_scatter_as};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer() {
        for len in 0..40 {
            for size in 1..9 {
                let mut next = 0;
                for r in 0..size {
                    let rg = chunk_range(len, size, r);
                    assert_eq!(rg.start, next);
                    assert_eq!(rg.len(), chunk_len(len, size, r));
                    next = rg.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn trait_is_object_safe_and_send() {
        fn takes(_: Option<Box<dyn Communicator>>) {}
        fn is_send<T: Send>() {}
        takes(None);
        is_send::<Box<dyn Communicator>>();
    }
}
