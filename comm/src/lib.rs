//! Collectives for meshrec: the `Communicator` trait and its local, MPI and simulated engines.
//!
//! * [`Communicator`] — the object-safe trait every engine implements (`&dyn Communicator`,
//!   `Box<dyn Communicator>`); it is `Send` so a communicator can move to its rank's thread.
//! * [`local`] — N ranks as N threads of one process, crossbeam channels, ring and
//!   recursive-doubling algorithms ([`LocalCluster`]).
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

pub mod bucket;
pub mod cost;
mod error;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
mod reduce;
mod request;
pub mod sim;
mod stats;

use std::ops::Range;

pub use bucket::{BucketHandle, GradBucketer, ReducedBucket};
pub use error::{CommError, Result};
pub use local::{ClusterError, LocalCluster, LocalCommunicator, LocalConfig};
pub use request::{Completion, Request};
pub use sim::{SimClock, SimCommunicator};
pub use stats::{CommStats, OpKind, OpStats, StatsRecorder};

/// Element-wise reduction of a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks (sum, then divided by the group size once).
    Avg,
    /// Maximum over ranks.
    Max,
    /// Minimum over ranks.
    Min,
}

/// Length of chunk `rank` when `len` elements are split over `size` ranks (the
/// [`Communicator::reduce_scatter`] rule): `len / size`, plus one for the first `len % size`
/// ranks. Zero when `size == 0`.
pub fn chunk_len(len: usize, size: usize, rank: usize) -> usize {
    if size == 0 || rank >= size {
        return 0;
    }
    len / size + usize::from(rank < len % size)
}

/// Element range of chunk `rank` in a buffer of `len` split over `size` ranks (see
/// [`chunk_len`]).
pub fn chunk_range(len: usize, size: usize, rank: usize) -> Range<usize> {
    if size == 0 || rank >= size {
        return len..len;
    }
    let base = len / size;
    let rem = len % size;
    let start = rank * base + rank.min(rem);
    start..start + chunk_len(len, size, rank)
}

/// A group of ranks that exchange data. All methods are fallible; see the crate docs for the
/// semantics every engine shares. Object safe: use it as `&dyn Communicator` or
/// `Box<dyn Communicator>`.
pub trait Communicator: Send {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn size(&self) -> usize;

    /// Reduces `buf` element-wise over all ranks, in place; every rank ends with the same
    /// values (bit for bit). All ranks must pass the same length.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Reduces `input` (same length on all ranks) element-wise and leaves chunk `rank()` of
    /// the result (see [`chunk_range`]) in `output`, whose length must be
    /// `chunk_len(input.len(), size(), rank())`.
    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Gathers every rank's `input` (same length on all ranks) into `output`
    /// (`size() * input.len()` elements), rank `r`'s at `r * input.len()`.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()>;

    /// Gathers ragged byte payloads: element `r` of the result is rank `r`'s `input`.
    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Gathers ragged `f32` payloads: element `r` of the result is rank `r`'s `input`.
    fn all_gatherv(&self, input: &[f32]) -> Result<Vec<Vec<f32>>> {
        let parts = self.all_gatherv_bytes(bytemuck::cast_slice(input))?;
        parts
            .into_iter()
            .enumerate()
            .map(|(r, p)| {
                if p.len() % 4 != 0 {
                    return Err(CommError::InvalidArgument(format!(
                        "all_gatherv: rank {r} sent {} bytes, not a whole number of f32",
                        p.len()
                    )));
                }
                Ok(p.chunks_exact(4)
                    .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            })
            .collect()
    }

    /// Copies `buf` of rank `root` into `buf` of every rank (same length on all ranks).
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Replaces `buf` of every rank with `buf` of rank `root` (lengths may differ before).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;

    /// Sends `data` to rank `dst` with `tag`; returns once `data` may be reused.
    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()>;

    /// Receives the next message from `src` with `tag` into `buf`, whose length must equal
    /// the sent length (else [`CommError::SizeMismatch`]).
    fn recv(&self, src: usize, tag: u32, buf: &mut [f32]) -> Result<()>;

    /// Sends a byte payload to `dst` with `tag`.
    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()>;

    /// Receives the next byte payload from `src` with `tag`.
    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// Starts an all-reduce of `buf` and returns at once; the handle yields the reduced
    /// buffer. Several may be outstanding; they complete in the order started.
    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>>;

    /// Starts sending `data` to `dst` with `tag`.
    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>>;

    /// Starts receiving a message of `len` elements from `src` with `tag`. Receives posted
    /// for one `(src, tag)` match messages in the order they were posted.
    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>>;

    /// Splits the group as `MPI_Comm_split`: ranks passing the same `color` form a new group,
    /// ordered by `key` and then by rank in this group. Collective over this group.
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>>;

    /// A snapshot of this communicator's statistics (not of communicators split from it).
    fn stats(&self) -> CommStats;

    /// Zeroes the statistics.
    fn reset_stats(&self);
}

/// Fails with [`CommError::InvalidRank`] unless `rank < size`.
pub(crate) fn check_rank(what: &'static str, rank: usize, size: usize) -> Result<()> {
    if rank < size {
        Ok(())
    } else {
        Err(CommError::InvalidRank { what, rank, size })
    }
}

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
