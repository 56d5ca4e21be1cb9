//! Discrete-event simulator of DP × TP × PP training steps on a modelled cluster.
//!
//! Everything here is **simulated**: compute times come from [`CostProfile::modelled`]
//! (roofline of the device), communication times from `meshrec_comm::cost` (alpha-beta link
//! model, the same as `comm`'s `sim` engine). What is modelled:
//!
//! * every pipeline device (one DP replica's stage; its TP ranks move in lockstep and are
//!   simulated once, on the group's slowest device) runs its actions of the very
//!   [`meshrec_pipeline::Schedule`] the executor runs, in order, on one compute stream
//!   (walked by [`meshrec_pipeline::Schedule::walk`]); an action starts when the device is free and its input has
//!   arrived (the previous virtual stage's forward plus the point-to-point transfer, or the
//!   next virtual stage's backward plus the transfer of the gradient back);
//! * Megatron TP all-reduces (2 per block forward, 2 backward, vocab-parallel embedding and
//!   cross-entropy) are blocking and lengthen each operation;
//! * pipeline transfers run on their own links and never delay compute beyond their own
//!   latency (no link contention is modelled);
//! * data-parallel gradient synchronisation is bucketed (DDP's ~25 MB buckets) and starts
//!   as soon as the last micro-batch's backward has produced a bucket, overlapping the rest
//!   of backward on a separate communication stream. `Sync` mode waits for every replica
//!   (a collective starts when all replicas have the bucket); `Async` mode lets each replica
//!   exchange its gradient at the same cost without waiting for the others (bounded
//!   staleness is honoured over many steps by [`simulate_steps`]); `LocalSgd` exchanges no
//!   gradients and averages the parameters every `sync_every` steps (amortised per step);
//! * a tied output head keeps a copy of the embedding on the last stage; its gradient is
//!   all-reduced between first and last stage before DP (as Megatron's embedding group);
//! * compression shrinks DP payloads by `wire_ratio` and costs compute on the comm stream;
//!   gather-then-sum compressors all-gather instead of all-reducing;
//! * the AdamW step is memory-bound: it reads and writes the resident state once.
//!
//! Files: [`config`] (what to simulate), [`compression`] (a compressor's costs),
//! `prepare` (the constant part: devices, batch split, partition, costs per virtual stage),
//! `step` (one step in named phases), [`result`], and `simulate` (the entry points).

pub mod compression;
pub mod config;
mod prepare;
pub mod result;
mod simulate;
mod step;

pub use compression::{Aggregation, Compression};
pub use config::SimConfig;
pub use result::{CommBytes, MultiStepResult, SimResult, StepBreakdown, StepPart};
pub use simulate::{simulate, simulate_steps};
