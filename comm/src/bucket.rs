//! Gradient bucketing: a fusion buffer that packs many small gradient tensors into buckets of
//! about `bucket_bytes` (default 25 MB, as PyTorch DDP) and starts a non-blocking all-reduce
//! of each bucket the moment it is full, so that communication overlaps the rest of backward.
//!
//! Rule (DDP's): a tensor is never split; it goes into the open bucket, and the bucket is
//! launched as soon as its size reaches the cap, so a bucket exceeds the cap by less than its
//! last tensor. All ranks must push the same tensors in the same order; a disagreement in
//! sizes surfaces as `CommError::SizeMismatch` from the bucket's all-reduce.

use std::ops::Range;

use crate::communicator::Communicator;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::request::Request;

/// Default bucket size: 25 MB (PyTorch DDP's `bucket_cap_mb`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Packs gradients into buckets and launches one `iall_reduce` per full bucket.
#[derive(Debug)]
pub struct GradBucketer {
    cap_elems: usize,
    op: ReduceOp,
    data: Vec<f32>,
    layout: Vec<(usize, Range<usize>)>,
    launched: usize,
}

/// Handle of one launched bucket.
#[derive(Debug)]
pub struct BucketHandle {
    index: usize,
    layout: Vec<(usize, Range<usize>)>,
    request: Request<Vec<f32>>,
}

/// A reduced bucket: the tensors it packed, by the ids they were pushed with.
#[derive(Debug, Clone, PartialEq)]
pub struct ReducedBucket {
    index: usize,
    layout: Vec<(usize, Range<usize>)>,
    data: Vec<f32>,
}

impl GradBucketer {
    /// A bucketer with buckets of about `bucket_bytes` (at least one `f32`) reduced with `op`.
    pub fn new(bucket_bytes: usize, op: ReduceOp) -> Result<Self> {
        if bucket_bytes < 4 {
            return Err(CommError::InvalidArgument(format!(
                "bucket size {bucket_bytes} bytes is below one f32"
            )));
        }
        Ok(Self {
            cap_elems: bucket_bytes / 4,
            op,
            data: Vec::new(),
            layout: Vec::new(),
            launched: 0,
        })
    }

    /// A bucketer with the default 25 MB buckets.
    pub fn with_default_size(op: ReduceOp) -> Self {
        Self {
            cap_elems: DEFAULT_BUCKET_BYTES / 4,
            op,
            data: Vec::new(),
            layout: Vec::new(),
            launched: 0,
        }
    }

    /// Adds gradient `id` (any caller-chosen number, reported back by [`ReducedBucket`]);
    /// returns the handle of the bucket it launched, if this push filled one.
    pub fn push(
        &mut self,
        comm: &dyn Communicator,
        id: usize,
        grad: &[f32],
    ) -> Result<Option<BucketHandle>> {
        if self.data.capacity() == 0 {
            self.data.reserve(self.cap_elems.max(grad.len()));
        }
        let start = self.data.len();
        self.data.extend_from_slice(grad);
        self.layout.push((id, start..self.data.len()));
        if self.data.len() >= self.cap_elems {
            self.launch(comm).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Launches the open bucket if it holds anything (call after the last push).
    pub fn flush(&mut self, comm: &dyn Communicator) -> Result<Option<BucketHandle>> {
        if self.layout.is_empty() {
            Ok(None)
        } else {
            self.launch(comm).map(Some)
        }
    }

    /// Elements in the open (not yet launched) bucket.
    pub fn pending_elems(&self) -> usize {
        self.data.len()
    }

    fn launch(&mut self, comm: &dyn Communicator) -> Result<BucketHandle> {
        let data = std::mem::take(&mut self.data);
        let layout = std::mem::take(&mut self.layout);
        let request = comm.iall_reduce(data, self.op)?;
        let index = self.launched;
        self.launched += 1;
        Ok(BucketHandle {
            index,
            layout,
            request,
        })
    }
}

impl BucketHandle {
    /// Position of this bucket in launch order.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Ids of the tensors in this bucket, in push order.
    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.layout.iter().map(|(id, _)| *id)
    }

    /// `true` once the reduction has finished.
    pub fn test(&mut self) -> bool {
        self.request.test()
    }

    /// Waits for the reduction.
    pub fn wait(self) -> Result<ReducedBucket> {
        let data = self.request.wait()?;
        let need = self.layout.last().map_or(0, |(_, r)| r.end);
        if data.len() != need {
            return Err(CommError::Internal(format!(
                "bucket {} came back with {} elements, packed {need}",
                self.index,
                data.len()
            )));
        }
        Ok(ReducedBucket {
            index: self.index,
            layout: self.layout,
            data,
        })
    }
}

impl ReducedBucket {
    /// Position of this bucket in launch order.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The reduced values of tensor `id`, if it is in this bucket.
    pub fn get(&self, id: usize) -> Option<&[f32]> {
        self.layout
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, r)| &self.data[r.clone()])
    }

    /// `(id, values)` of every tensor, in push order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[f32])> + '_ {
        self.layout
            .iter()
            .map(|(id, r)| (*id, &self.data[r.clone()]))
    }

    /// The whole fused buffer (tensors back to back in push order).
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// Reduces `grads` in place over `comm` through buckets of `bucket_bytes`: pushes them in
/// order (tensor `i` gets id `i`), then waits for every bucket and copies the results back.
pub fn all_reduce_bucketed(
    comm: &dyn Communicator,
    grads: &mut [&mut [f32]],
    bucket_bytes: usize,
    op: ReduceOp,
) -> Result<()> {
    let mut b = GradBucketer::new(bucket_bytes, op)?;
    let mut handles = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        handles.extend(b.push(comm, i, g)?);
    }
    handles.extend(b.flush(comm)?);
    for h in handles {
        let red = h.wait()?;
        for (id, v) in red.iter() {
            grads[id].copy_from_slice(v);
        }
    }
    Ok(())
}
