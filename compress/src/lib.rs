//! Gradient compressors with error feedback and a versioned wire format.
//!
//! * [`Compressor`] — the common trait over flat `f32` gradients: `compress_into`
//!   writes a [`Payload`], `decompress_into` decodes one, [`Aggregation`] says whether
//!   payloads are all-reduced or gathered and summed. Build one from a
//!   [`MethodConfig`] (identity, fp16, bf16, top-k, DGC top-k, random-k, threshold,
//!   QSGD, TernGrad, sign, PowerSGD).
//! * [`Memory`] — per-tensor state: error-feedback residual, DGC momentum correction,
//!   PowerSGD warm start; serde-serialisable for checkpoints ([`MemoryBank`]).
//! * [`sync()`] — the compressed all-reduce of one tensor over a
//!   [`meshrec_comm::Communicator`], for either aggregation kind.
//! * [`wire`] — the payload format (magic, version, method, length, parameters, body)
//!   and its validating decoder: bad payloads are errors, never panics.
//! * [`stats`] — bytes before/after, ratios and times per method.
//!
//! Anchors: GRACE (Compressor / Memory / Communicator split), PyTorch's PowerSGD hook,
//! DGC (sampled threshold, momentum correction), QSGD, TernGrad, EF-signSGD.

#[cfg(target_endian = "big")]
compile_error!("meshrec-compress writes little-endian payloads by casting host buffers");

pub mod error;
mod lowrank;
pub mod memory;
pub mod methods;
pub mod rng;
pub mod stats;
pub mod sync;
pub mod wire;

pub use error::{CompressError, SyncError};
pub use memory::{Memory, MemoryBank, MemoryOptions};
pub use methods::{
    avg_as, warmed_ratio, Aggregation, AvgReduce, Compressor, Ctx, MethodConfig, ReduceInfo,
};
pub use stats::{MethodStats, Stats, SyncReport};
pub use sync::{sync, sync_with};
pub use wire::{decode_into, peek, Apply, DecodeScratch, Header, MethodId, Params, Payload};
