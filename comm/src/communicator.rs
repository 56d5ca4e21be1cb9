//! The contract every engine implements: the object-safe [`Communicator`] trait, the
//! chunking rule of reduce-scatter, and the argument checks the engines share.

use std::ops::Range;

use crate::dtype::DType;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::request::Request;
use crate::stats::CommStats;

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

    /// The typed all-reduce: `buf` holds packed `dtype` elements in native byte order
    /// (alignment not required) and is reduced in place like [`Communicator::all_reduce`],
    /// with the engine's real algorithm. Most callers want `all_reduce_as::<T>`, which
    /// passes a typed slice.
    ///
    /// Errors (as `CommError::InvalidArgument`, on every engine alike): a length that is
    /// not a whole number of elements, naming both sizes; `Avg` on an integer type (refused,
    /// not truncated). Integer sums wrap on overflow. `F16` and `Bf16` are reduced in `f32`
    /// and rounded back to their type at every step of the algorithm (as NCCL does), so
    /// results may differ from an `f32` reduction by the type's rounding per step.
    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;

    /// The typed reduce-scatter: `input` and `output` hold packed `dtype` elements as in
    /// [`Communicator::all_reduce_bytes`], chunked by element as in
    /// [`Communicator::reduce_scatter`]; `output` must hold
    /// `chunk_len(input elements, size(), rank())` elements (else `BadLength`, in elements).
    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;

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
    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()> {
        self.isend(dst, tag, data.to_vec())?.wait()
    }

    /// Receives the next message from `src` with `tag` into `buf`, whose length must equal
    /// the sent length (else [`CommError::SizeMismatch`]).
    fn recv(&self, src: usize, tag: u32, buf: &mut [f32]) -> Result<()> {
        let v = self.irecv(src, tag, buf.len())?.wait()?;
        buf.copy_from_slice(&v);
        Ok(())
    }

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
