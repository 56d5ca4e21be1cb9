//! The `Compressor` trait and what it exchanges with its callers: the per-call context,
//! the aggregation kind and the all-reduce hook.

use super::config::MethodConfig;
use crate::error::{CompressError, SyncError};
use crate::wire::{self, Apply, DecodeScratch, MethodId, Payload};
use meshrec_comm::{DType, Element};
use serde::{Deserialize, Serialize};

/// How the payloads of all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    /// The compressed representation is a dense f32 vector whose sum over ranks is the
    /// compressed sum (same indices / same factors on every rank): `all_reduce` it.
    AllReduce,
    /// Payloads differ per rank (own indices, own scales): exchange them with
    /// `all_gatherv`, then every rank decodes and sums all of them.
    GatherThenSum,
}

/// Per-call context: seeds and per-tensor state a method may need.
#[derive(Debug, Default)]
pub struct Ctx<'a> {
    /// Identical on all ranks for this tensor and step (random-k indices, PowerSGD init).
    pub shared_seed: u64,
    /// Different on every rank (stochastic-rounding noise must be independent so it
    /// averages out across ranks).
    pub local_seed: u64,
    /// Matrix view of the tensor for PowerSGD; `None` picks a near-square view.
    pub shape: Option<(usize, usize)>,
    /// The tensor is a bucket of several layers, each `(rows, cols)` in order (their
    /// products sum to the length): PowerSGD compresses each layer as its own matrix
    /// (Vogels et al.), batching all layers' factors into one all-reduce per factor.
    pub layers: Option<&'a [(usize, usize)]>,
    /// PowerSGD warm-start factor Q (cols x rank); filled on first use.
    pub warm: Option<&'a mut Vec<f32>>,
    /// Progress through DGC's sparsity warm-up, in [0, 1); `None` outside it. The
    /// sparsifiers keep [`warmed_ratio`] of the elements instead of their ratio.
    pub warmup: Option<f64>,
    /// Sparsifiers select within each of `layers` (DGC's layer-wise top-k) instead of
    /// over the whole tensor.
    pub layerwise_selection: bool,
    /// Sparsifiers rank element `i` by `|x_i| / sqrt(scale_i)` instead of `|x_i|` (same
    /// length as the tensor; see `MemoryOptions::normalized_selection`).
    pub selection_scale: Option<&'a [f32]>,
    /// Sparsifiers send their values as bf16 (see `wire::SparseValues`).
    pub bf16_values: bool,
}

/// DGC's sparsity warm-up: the kept fraction falls geometrically from 25% to `ratio` as
/// `progress` goes from 0 to 1. DGC's schedule (75%, 93.75%, 98.4%, 99.6%, 99.9% sparsity
/// over four epochs) is, within 2%, this curve at progress 0, 1/4, ..., 1 for ratio 0.1%;
/// a continuous curve lets the warm-up be any number of steps.
pub fn warmed_ratio(ratio: f64, progress: Option<f64>) -> f64 {
    const START: f64 = 0.25;
    match progress {
        Some(p) if ratio < START => (START.ln() * (1.0 - p) + ratio.ln() * p).exp(),
        _ => ratio,
    }
}

impl Ctx<'_> {
    /// A context with both seeds derived from one value (single-process use).
    pub fn seeded(seed: u64) -> Self {
        Ctx {
            shared_seed: seed,
            local_seed: crate::rng::mix(seed ^ 0x5EED),
            ..Ctx::default()
        }
    }
}

/// The all-reduce used by `Compressor::reduce`: sums a buffer of the given element type
/// over all ranks and divides by the number of ranks, in place. Typed, so that a method
/// whose payload is 16-bit (fp16, bf16) reduces 16-bit values and moves 2 bytes per
/// element; call it through [`avg_as`].
pub type AvgReduce<'a> = dyn FnMut(&mut [u8], DType) -> Result<(), SyncError> + 'a;

/// Averages `buf` over all ranks through `avg`, in `buf`'s own element type.
pub fn avg_as<T: Element>(avg: &mut AvgReduce<'_>, buf: &mut [T]) -> Result<(), SyncError> {
    avg(bytemuck::cast_slice_mut(buf), T::DTYPE)
}

/// What an all-reduce-compatible protocol moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReduceInfo {
    /// Bytes of the compressed representation per rank (what a transport that reduces
    /// in the compressed dtype would move).
    pub payload_bytes: usize,
    /// Bytes handed to the all-reduce per rank (what this transport moved).
    pub reduced_bytes: usize,
    /// The method fell back to a dense all-reduce (PowerSGD on a tensor too small to
    /// gain from it).
    pub skipped: bool,
}

/// A gradient compressor over flat f32 tensors (one tensor or one bucket).
///
/// Compressors hold configuration and reusable scratch buffers; per-tensor state
/// (residuals, PowerSGD's warm start) lives in `Memory` and reaches them via `Ctx`.
pub trait Compressor: Send {
    /// The wire method this compressor writes.
    fn method(&self) -> MethodId;
    /// The configuration it was built from.
    fn config(&self) -> &MethodConfig;
    /// How payloads of several ranks combine.
    fn aggregation(&self) -> Aggregation;

    /// Compresses `x` into `out`, replacing its contents and reusing its buffer.
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError>;

    /// Compresses into a fresh payload.
    fn compress(&mut self, x: &[f32], seed: u64) -> Result<Payload, CompressError> {
        let mut p = Payload::new();
        self.compress_into(x, &mut Ctx::seeded(seed), &mut p)?;
        Ok(p)
    }

    /// Decoder scratch owned by the compressor (reused across calls).
    fn scratch(&mut self) -> &mut DecodeScratch;

    /// Decodes a payload written by this method into `out`, combining as `apply` says.
    fn decompress_into(
        &mut self,
        payload: &[u8],
        out: &mut [f32],
        apply: Apply,
    ) -> Result<(), CompressError> {
        let found = wire::peek(payload)?.method;
        // PowerSGD writes a dense payload for tensors it does not compress.
        let ok = found == self.method()
            || (self.method() == MethodId::PowerSgd && found == MethodId::Identity);
        if !ok {
            return Err(CompressError::MethodMismatch {
                expected: self.method().name(),
                found: found.name(),
            });
        }
        wire::decode_into(payload, out, apply, self.scratch())?;
        Ok(())
    }

    /// The compressed all-reduce protocol of an `AllReduce` method.
    ///
    /// On entry `x` holds this rank's (compensated) gradient; on exit it holds the
    /// average over ranks of the compressed gradients. If `residual` is given it must
    /// hold a copy of `x` on entry (as `Memory::compensate` leaves it, which saves a
    /// pass) and receives `x_in - sent`, where `sent` is this rank's decompressed
    /// contribution (for PowerSGD, as in the paper and PyTorch's hook, the
    /// decompressed average).
    /// `avg` all-reduces a buffer to its mean; every rank calls it the same number of
    /// times with the same lengths.
    fn reduce(
        &mut self,
        x: &mut [f32],
        residual: Option<&mut [f32]>,
        ctx: &mut Ctx<'_>,
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        let _ = (x, residual, ctx, avg);
        Err(SyncError::NotAllReduce(self.method().name()))
    }
}
