//! Device mesh, segments, tensor and pipeline parallelism over `meshrec-comm`. The
//! vocabulary of a step — mesh coordinates, schedules, DP modes, timelines — is
//! `meshrec-pipeline`'s, shared with the simulator.
//!
//! * [`mesh`] — the mesh against a model, and its sub-communicators.
//! * [`layout`] — where each parameter lives (partition, TP plan), shard / unshard.
//! * [`segment`] — one model chunk on one rank: forward per micro-batch, backward by graph
//!   cuts, Megatron's tensor-parallel all-reduces at the cuts.
//! * [`rank`] — a rank's chunks of a layout, built and loaded from a full state.
//! * [`exec`] — runs a schedule over a rank's segments, then the model-parallel gradient
//!   reductions; callers add to a step through [`exec::StepHooks`].
//! * [`optim`] — a rank's AdamW over its segments, the moments whole or ZeRO-sharded.
//! * [`dp`] — data-parallel gradient reduction in buckets on a thread, compressed or dense,
//!   waited for at once (sync) or later (bounded staleness).
//! * [`zero`] — ZeRO's shard-major layouts for the reduce-scatter of gradients and the
//!   all-gather of updated parameters.
//! * [`eval`] — full-ranking evaluation on vocabulary shards.
//! * [`check`] — the layout-equivalence check against one device.

mod branch;
pub mod check;
pub mod dp;
mod dropout_key;
mod error;
pub mod eval;
pub mod exec;
pub mod layout;
pub mod mesh;
mod named;
pub mod optim;
pub mod rank;
pub mod segment;
mod seq_shard;
pub mod zero;

pub use error::{MeshError, ParallelError};
