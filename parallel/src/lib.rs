//! Device mesh, segments, tensor and pipeline parallelism over `meshrec-comm`.
//!
//! * [`mesh`] — the `dp × tp × pp` grid and its sub-communicators.
//! * [`layout`] — where each parameter lives (partition, TP splits), shard / unshard.
//! * [`segment`] — one model chunk on one rank: forward per micro-batch, backward by graph
//!   cuts, Megatron's tensor-parallel all-reduces at the cuts.
//! * [`schedule`] — GPipe, 1F1B and interleaved 1F1B as data, checked deadlock-free.
//! * [`exec`] — runs a schedule over a rank's segments, then the model-parallel gradient
//!   reductions.
//! * [`dp`] — data-parallel gradient reduction in buckets on a thread, compressed or dense,
//!   waited for at once (sync) or later (bounded staleness).
//! * [`timeline`] — what each stage did when; utilization, bubble, SVG.
//! * [`eval`] — full-ranking evaluation on vocabulary shards.
//! * [`check`] — the layout-equivalence check against one device.

pub mod check;
pub mod dp;
mod error;
pub mod eval;
pub mod exec;
pub mod layout;
pub mod mesh;
pub mod schedule;
pub mod segment;
pub mod timeline;

pub use error::{MeshError, ParallelError};
