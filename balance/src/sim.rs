//! Discrete-event simulator of DP × TP × PP training steps on a modelled cluster.
//!
//! Everything here is **simulated**: compute times come from [`CostProfile::modelled`]
//! (roofline of the device), communication times from `meshrec_comm::cost` (alpha-beta link
//! model, the same as `comm`'s `sim` engine). What is modelled:
//!
//! * every pipeline device (one DP replica's stage; its TP ranks move in lockstep and are
//!   simulated once, on the group's slowest device) runs its schedule's operations in order
//!   on one compute stream; an operation starts when the device is free and its input has
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

use std::collections::HashMap;

use meshrec_comm::cost as link;
use meshrec_comm::cost::{LinkClass, LinkKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::cost::CostProfile;
use crate::device::DeviceSpec;
use crate::error::BalanceError;
use crate::partition::{Partition, PartitionProblem, StageSpec};
use crate::rebalance::split_batch;
use crate::shape::ModelShape;

/// A device mesh: `dp × tp × pp` ranks, TP innermost, then DP, then PP (Megatron order):
/// global rank = `t + tp·(d + dp·s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mesh {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
}

impl Mesh {
    /// Number of devices.
    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// Global rank of TP rank `t` of replica `d`'s stage `s`.
    pub fn rank(&self, d: usize, t: usize, s: usize) -> usize {
        t + self.tp * (d + self.dp * s)
    }

    /// `dp2·tp4·pp1`.
    pub fn label(&self) -> String {
        format!("dp{}·tp{}·pp{}", self.dp, self.tp, self.pp)
    }
}

/// Pipeline schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Schedule {
    /// All forwards, then all backwards.
    GPipe,
    /// One forward one backward, at most `pp` micro-batches in flight (PipeDream-flush).
    OneFOneB,
    /// Megatron's interleaved 1F1B with `chunks` model chunks per device.
    Interleaved {
        /// Model chunks per device (`v`), at least 2.
        chunks: usize,
    },
}

/// One operation of a schedule on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Forward (true) or backward.
    pub forward: bool,
    /// Micro-batch index.
    pub micro_batch: usize,
    /// Model chunk on this device (0 unless interleaved).
    pub chunk: usize,
}

impl Schedule {
    /// The schedule named as in the trainer's `[parallel] schedule`: `gpipe`, `1f1b` or
    /// `interleaved` (with `virtual_stages` model chunks per device; `interleaved-v2` style
    /// names carry their own count). `virtual_stages` is ignored by the others.
    pub fn from_name(name: &str, virtual_stages: usize) -> Result<Self, BalanceError> {
        let lower = name.to_ascii_lowercase();
        let bad = |reason: String| BalanceError::InvalidLayout {
            layout: format!("schedule {name:?}"),
            reason,
        };
        match lower.as_str() {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" | "one_f_one_b" | "pipedream-flush" => Ok(Schedule::OneFOneB),
            "interleaved" | "interleaved-1f1b" | "interleaved_1f1b" => {
                if virtual_stages < 2 {
                    return Err(bad(format!(
                        "interleaving needs virtual_stages >= 2, got {virtual_stages}"
                    )));
                }
                Ok(Schedule::Interleaved {
                    chunks: virtual_stages,
                })
            }
            other => match other.strip_prefix("interleaved-v").map(str::parse::<usize>) {
                Some(Ok(v)) if v >= 2 => Ok(Schedule::Interleaved { chunks: v }),
                _ => Err(bad(
                    "unknown schedule (known: gpipe, 1f1b, interleaved)".into()
                )),
            },
        }
    }

    /// Model chunks per device.
    pub fn chunks(&self) -> usize {
        match self {
            Schedule::Interleaved { chunks } => *chunks,
            _ => 1,
        }
    }

    /// Short name: `gpipe`, `1f1b`, `interleaved-v2`.
    pub fn label(&self) -> String {
        match self {
            Schedule::GPipe => "gpipe".into(),
            Schedule::OneFOneB => "1f1b".into(),
            Schedule::Interleaved { chunks } => format!("interleaved-v{chunks}"),
        }
    }

    /// Checks the schedule against `pp` stages and `m` micro-batches (interleaving needs
    /// `pp >= 2`, `v >= 2` and `m` a multiple of `pp`, Megatron's rule).
    pub fn validate(&self, pp: usize, m: usize) -> Result<(), String> {
        if pp == 0 || m == 0 {
            return Err("pp and micro_batches must be at least 1".into());
        }
        if let Schedule::Interleaved { chunks } = *self {
            if chunks < 2 {
                return Err(format!(
                    "interleaving needs at least 2 chunks, got {chunks}"
                ));
            }
            if pp < 2 {
                return Err("interleaving needs pp >= 2".into());
            }
            if !m.is_multiple_of(pp) {
                return Err(format!(
                    "interleaving needs micro_batches ({m}) to be a multiple of pp ({pp})"
                ));
            }
        }
        Ok(())
    }

    /// The order of operations of stage `s` of `pp` for `m` micro-batches.
    pub fn ops(&self, s: usize, pp: usize, m: usize) -> Result<Vec<Op>, String> {
        self.validate(pp, m)?;
        if s >= pp {
            return Err(format!("stage {s} out of range for pp {pp}"));
        }
        let f = |mb, chunk| Op {
            forward: true,
            micro_batch: mb,
            chunk,
        };
        let b = |mb, chunk| Op {
            forward: false,
            micro_batch: mb,
            chunk,
        };
        let mut ops = Vec::with_capacity(2 * m * self.chunks());
        match *self {
            Schedule::GPipe => {
                ops.extend((0..m).map(|i| f(i, 0)));
                ops.extend((0..m).map(|i| b(i, 0)));
            }
            Schedule::OneFOneB => {
                let warm = (pp - s - 1).min(m);
                ops.extend((0..warm).map(|i| f(i, 0)));
                for i in 0..(m - warm) {
                    ops.push(f(warm + i, 0));
                    ops.push(b(i, 0));
                }
                ops.extend((m - warm..m).map(|i| b(i, 0)));
            }
            Schedule::Interleaved { chunks: v } => {
                let total = m * v;
                let warm = ((pp - s - 1) * 2 + (v - 1) * pp).min(total);
                let group = pp * v;
                let mb = |k: usize| (k / group) * pp + k % pp;
                let fwd_chunk = |k: usize| (k % group) / pp;
                let bwd_chunk = |k: usize| v - 1 - (k % group) / pp;
                ops.extend((0..warm).map(|k| f(mb(k), fwd_chunk(k))));
                for i in 0..(total - warm) {
                    let k = warm + i;
                    ops.push(f(mb(k), fwd_chunk(k)));
                    ops.push(b(mb(i), bwd_chunk(i)));
                }
                ops.extend((total - warm..total).map(|k| b(mb(k), bwd_chunk(k))));
            }
        }
        Ok(ops)
    }

    /// Peak number of micro-batches whose activations stage `s` holds, in units of one
    /// whole stage's activations (interleaved: chunk activations / `v`, rounded up).
    pub fn in_flight(&self, s: usize, pp: usize, m: usize) -> u32 {
        let Ok(ops) = self.ops(s, pp, m) else {
            return m as u32;
        };
        let (mut cur, mut peak) = (0usize, 0usize);
        for op in ops {
            if op.forward {
                cur += 1;
                peak = peak.max(cur);
            } else {
                cur = cur.saturating_sub(1);
            }
        }
        peak.div_ceil(self.chunks()) as u32
    }
}

/// Data-parallel synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DpMode {
    /// Bucketed all-reduce overlapped with backward; every replica waits for all.
    Sync,
    /// Each replica exchanges gradients without waiting; staleness at most `max_staleness`.
    Async {
        /// Steps a replica may run ahead of the slowest.
        max_staleness: u32,
    },
    /// Local SGD: each replica steps on its own gradients (no gradient exchange); the
    /// parameters are averaged by an all-reduce every `sync_every` steps. One simulated
    /// step carries `1 / sync_every` of that all-reduce (amortised).
    LocalSgd {
        /// Steps between parameter averages (at least 1).
        sync_every: u32,
    },
}

impl DpMode {
    /// The mode named as in the trainer's `[dp] mode`: `sync`, `async` (with
    /// `max_staleness`) or `local_sgd` / `local-sgd` (with `sync_every`); the parameter the
    /// mode does not use is ignored.
    pub fn from_name(
        name: &str,
        max_staleness: u32,
        sync_every: u32,
    ) -> Result<Self, BalanceError> {
        match name.to_ascii_lowercase().as_str() {
            "sync" => Ok(DpMode::Sync),
            "async" => Ok(DpMode::Async { max_staleness }),
            "local_sgd" | "local-sgd" | "localsgd" => {
                if sync_every == 0 {
                    return Err(BalanceError::InvalidLayout {
                        layout: format!("dp mode {name}"),
                        reason: "sync_every must be at least 1".into(),
                    });
                }
                Ok(DpMode::LocalSgd { sync_every })
            }
            other => Err(BalanceError::InvalidLayout {
                layout: format!("dp mode {other:?}"),
                reason: "unknown DP mode (known: sync, async, local_sgd)".into(),
            }),
        }
    }

    /// Short name: `sync`, `async-s4`, `local-sgd-k8`.
    pub fn label(&self) -> String {
        match self {
            DpMode::Sync => "sync".to_string(),
            DpMode::Async { max_staleness } => format!("async-s{max_staleness}"),
            DpMode::LocalSgd { sync_every } => format!("local-sgd-k{sync_every}"),
        }
    }
}

/// How a compressor's payloads are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    /// Compressed payloads add up element-wise (fp16, rand-k with a shared seed, PowerSGD).
    AllReduce,
    /// Every rank's payload is gathered and summed after decoding (top-k, QSGD, sign).
    GatherThenSum,
}

/// A gradient compressor as the simulator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// Name for reports.
    pub name: String,
    /// Wire bytes / uncompressed gradient bytes.
    pub wire_ratio: f64,
    /// Compute per gradient element to compress and decompress (FLOPs).
    pub flops_per_element: f64,
    /// Passes over the gradient in memory to compress and decompress.
    pub memory_passes: f64,
    /// All-reduce or gather-then-sum.
    pub aggregation: Aggregation,
}

impl Compression {
    /// No compression.
    pub fn none() -> Self {
        Self {
            name: "none".into(),
            wire_ratio: 1.0,
            flops_per_element: 0.0,
            memory_passes: 0.0,
            aggregation: Aggregation::AllReduce,
        }
    }

    /// Top-k keeping `fraction` of the elements as (u32 index, value) pairs with error
    /// feedback: selection ~8 FLOPs and 4 memory passes per element (modelled).
    pub fn top_k(fraction: f64, grad_bytes: u32) -> Self {
        let g = f64::from(grad_bytes.max(1));
        Self {
            name: format!("topk{}%", fraction * 100.0),
            wire_ratio: fraction * (4.0 + g) / g,
            flops_per_element: 8.0,
            memory_passes: 4.0,
            aggregation: Aggregation::GatherThenSum,
        }
    }

    /// PowerSGD of `rank` on square `d×d` matrices: wire `2·rank/d`, two thin matmuls and an
    /// orthogonalisation, ~`6·rank` FLOPs per element, error feedback (3 passes).
    pub fn power_sgd(rank: u32, d: u64) -> Self {
        Self {
            name: format!("powersgd-r{rank}"),
            wire_ratio: (2.0 * f64::from(rank) / d as f64).min(1.0),
            flops_per_element: 6.0 * f64::from(rank),
            memory_passes: 3.0,
            aggregation: Aggregation::AllReduce,
        }
    }

    /// A compressor named as `meshrec-compress` names its methods (`MethodId::name`), with
    /// its one size parameter `param`:
    ///
    /// | method | `param` | wire (per gradient element) | aggregation |
    /// |---|---|---|---|
    /// | `identity` / `none` | ignored | the gradient | all-reduce |
    /// | `fp16`, `bf16` | ignored | 2 bytes | all-reduce |
    /// | `topk`, `dgc_topk` | kept fraction (`ratio`) | `ratio` × (u32 index + f32) | gather |
    /// | `threshold` | expected kept fraction | as top-k | gather |
    /// | `randk` | kept fraction (`ratio`) | `ratio` × f32 (shared seed) | all-reduce |
    /// | `qsgd` | `levels` | sign + level bits, one f32 norm per 512 | gather |
    /// | `terngrad` | ignored | 2 bits, one f32 scale per 512 | gather |
    /// | `sign` | ignored | 1 bit, one f32 scale per 512 | gather |
    /// | `powersgd` | `rank` | `2·rank/d` of a `d×d` matrix | all-reduce |
    ///
    /// Compute costs are modelled (FLOPs and memory passes per element), not measured.
    pub fn from_method(method: &str, param: f64, shape: &ModelShape) -> Result<Self, BalanceError> {
        let g = f64::from(shape.precision.grad_bytes.max(1));
        let lower = method.to_ascii_lowercase();
        let bad = |reason: String| BalanceError::InvalidLayout {
            layout: format!("compressor {method:?}"),
            reason,
        };
        let fraction = || {
            if param.is_finite() && param > 0.0 && param <= 1.0 {
                Ok(param)
            } else {
                Err(bad(format!("ratio {param} must be in (0, 1]")))
            }
        };
        let quantised = |name: String, bits: f64, flops: f64| Self {
            name,
            wire_ratio: ((bits / 8.0 + 4.0 / 512.0) / g).min(1.0),
            flops_per_element: flops,
            memory_passes: 3.0,
            aggregation: Aggregation::GatherThenSum,
        };
        Ok(match lower.as_str() {
            "identity" | "none" => Self::none(),
            "fp16" | "bf16" => Self {
                name: lower.clone(),
                wire_ratio: (2.0 / g).min(1.0),
                flops_per_element: 1.0,
                memory_passes: 2.0,
                aggregation: Aggregation::AllReduce,
            },
            "topk" => Self::top_k(fraction()?, shape.precision.grad_bytes),
            "dgc_topk" | "threshold" => {
                let r = fraction()?;
                Self {
                    name: format!("{lower}{}%", r * 100.0),
                    // A sampled threshold instead of a selection: 2 passes.
                    memory_passes: 2.0,
                    flops_per_element: 2.0,
                    ..Self::top_k(r, shape.precision.grad_bytes)
                }
            }
            "randk" => {
                let r = fraction()?;
                Self {
                    name: format!("randk{}%", r * 100.0),
                    wire_ratio: (r * 4.0 / g).min(1.0),
                    flops_per_element: 1.0,
                    memory_passes: 3.0,
                    aggregation: Aggregation::AllReduce,
                }
            }
            "qsgd" => {
                if !(param.is_finite() && param >= 1.0) {
                    return Err(bad(format!("levels {param} must be at least 1")));
                }
                let levels = param.round();
                let bits = 1.0 + (levels + 1.0).log2().ceil();
                quantised(format!("qsgd-l{levels}"), bits, 6.0)
            }
            "terngrad" => quantised("terngrad".into(), 2.0, 4.0),
            "sign" => quantised("sign".into(), 1.0, 2.0),
            "powersgd" => {
                if !(param.is_finite() && param >= 1.0) {
                    return Err(bad(format!("rank {param} must be at least 1")));
                }
                Self::power_sgd(param.round() as u32, shape.d_model)
            }
            _ => {
                return Err(bad(
                    "unknown compressor (known: identity, fp16, bf16, topk, dgc_topk, threshold, randk, qsgd, terngrad, sign, powersgd)".into(),
                ))
            }
        })
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.wire_ratio.is_finite() && self.wire_ratio > 0.0) {
            return Err(format!(
                "compression {}: wire_ratio {} must be positive",
                self.name, self.wire_ratio
            ));
        }
        if !(self.flops_per_element >= 0.0 && self.memory_passes >= 0.0) {
            return Err(format!("compression {}: costs must be >= 0", self.name));
        }
        Ok(())
    }
}

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The model.
    pub shape: ModelShape,
    /// The layout.
    pub mesh: Mesh,
    /// The pipeline schedule.
    pub schedule: Schedule,
    /// Micro-batches per step per replica.
    pub micro_batches: usize,
    /// Sequences per step over the whole job; a multiple of `micro_batches` with at least
    /// one sequence per replica per micro-batch.
    pub global_batch: usize,
    /// DP synchronisation.
    pub dp_mode: DpMode,
    /// DP gradient compression.
    pub compression: Compression,
    /// DP bucket size in bytes (DDP: 25 MB).
    pub bucket_bytes: u64,
    /// Adaptive balancing: partition layers by the partitioner (device speeds, memory,
    /// heavy embedding/head) and split the batch over replicas by speed. Off: uniform
    /// blocks per stage and an even batch split.
    pub balance: bool,
    /// Explicit partition over `pp × chunks` virtual stages (overrides `balance` for PP).
    pub partition: Option<Partition>,
    /// Fewest blocks per (virtual) stage when balancing.
    pub min_blocks_per_stage: usize,
    /// A measured `tp` 1 profile to use instead of the roofline model (e.g. from
    /// `meshrec profile` on this machine). It is used for every device as is (so only for
    /// homogeneous clusters of the device it was measured on), sharded with
    /// [`CostProfile::tp_sharded`] for `tp > 1`, and its times and activation sizes scaled
    /// linearly to each replica's micro-batch size.
    pub profile: Option<CostProfile>,
    /// Record the event timeline (the planner turns it off to save memory).
    pub record_timeline: bool,
    /// Run pipeline stage `s` on the ranks of mesh stage `pp - 1 - s`: on a heterogeneous
    /// cluster this puts the heavy head (last stage) on the devices the mesh gives stage 0.
    pub reverse_stages: bool,
}

impl SimConfig {
    /// Defaults: sync DP, no compression, 25 MB buckets, balancing on.
    pub fn new(
        shape: ModelShape,
        mesh: Mesh,
        schedule: Schedule,
        micro_batches: usize,
        global_batch: usize,
    ) -> Self {
        Self {
            shape,
            mesh,
            schedule,
            micro_batches,
            global_batch,
            dp_mode: DpMode::Sync,
            compression: Compression::none(),
            bucket_bytes: 25_000_000,
            balance: true,
            partition: None,
            min_blocks_per_stage: 1,
            profile: None,
            record_timeline: true,
            reverse_stages: false,
        }
    }

    /// Global rank of TP rank `t` of replica `d`'s pipeline stage `s` (see
    /// [`SimConfig::reverse_stages`]).
    pub fn rank(&self, d: usize, t: usize, s: usize) -> usize {
        let s = if self.reverse_stages {
            self.mesh.pp - 1 - s
        } else {
            s
        };
        self.mesh.rank(d, t, s)
    }

    /// `dp2·tp2·pp2 1f1b m8 sync none` (`rev` appended for reversed stages).
    pub fn label(&self) -> String {
        let mode = self.dp_mode.label();
        format!(
            "{}{} {} m{} {} {}",
            self.mesh.label(),
            if self.reverse_stages { " rev" } else { "" },
            self.schedule.label(),
            self.micro_batches,
            mode,
            self.compression.name
        )
    }

    fn layout_err(&self, reason: String) -> BalanceError {
        BalanceError::InvalidLayout {
            layout: self.label(),
            reason,
        }
    }

    /// Checks the layout against the model and the cluster.
    pub fn validate(&self, cluster: &Cluster) -> Result<(), BalanceError> {
        self.shape.validate()?;
        cluster.validate()?;
        let m = self.mesh;
        if m.dp == 0 || m.tp == 0 || m.pp == 0 {
            return Err(self.layout_err("dp, tp and pp must be at least 1".into()));
        }
        if m.world() > cluster.len() {
            return Err(self.layout_err(format!(
                "needs {} devices, cluster {} has {}",
                m.world(),
                cluster.name,
                cluster.len()
            )));
        }
        if !(self.shape.n_heads as usize).is_multiple_of(m.tp) {
            return Err(self.layout_err(format!(
                "tp {} does not divide n_heads {}",
                m.tp, self.shape.n_heads
            )));
        }
        self.schedule
            .validate(m.pp, self.micro_batches)
            .map_err(|r| self.layout_err(r))?;
        let virt = m.pp * self.schedule.chunks();
        if virt > self.shape.n_layers as usize {
            return Err(self.layout_err(format!(
                "{virt} (virtual) stages exceed {} blocks",
                self.shape.n_layers
            )));
        }
        if !self.global_batch.is_multiple_of(self.micro_batches)
            || self.global_batch / self.micro_batches < m.dp
        {
            return Err(self.layout_err(format!(
                "global batch {} must be a multiple of micro_batches {} with at least one sequence per replica (dp {})",
                self.global_batch, self.micro_batches, m.dp
            )));
        }
        self.compression
            .validate()
            .map_err(|r| self.layout_err(r))?;
        if self.dp_mode == (DpMode::LocalSgd { sync_every: 0 }) {
            return Err(self.layout_err("local SGD needs sync_every >= 1".into()));
        }
        if let Some(p) = &self.profile {
            p.validate()?;
            if p.len() != self.shape.n_partition_layers() || p.tp != 1 {
                return Err(self.layout_err(format!(
                    "measured profile has {} layers at tp {}, expected {} at tp 1",
                    p.len(),
                    p.tp,
                    self.shape.n_partition_layers()
                )));
            }
        }
        if let Some(p) = &self.partition {
            if p.stages() != virt || p.n_layers() != self.shape.n_partition_layers() {
                return Err(self.layout_err(format!(
                    "partition has {} stages over {} layers, expected {virt} over {}",
                    p.stages(),
                    p.n_layers(),
                    self.shape.n_partition_layers()
                )));
            }
        }
        Ok(())
    }
}

/// Kind of a timeline event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Forward compute.
    Forward,
    /// Backward compute.
    Backward,
    /// Blocking TP all-reduces of an operation.
    TpComm,
    /// Pipeline activation or gradient in flight (on the link, not the device).
    PpTransfer,
    /// Tied-embedding gradient all-reduce between first and last stage.
    TiedSync,
    /// DP gradient bucket (compression included).
    DpComm,
    /// Optimizer step.
    Optimizer,
}

/// One interval on one pipeline device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Global rank of the device's TP rank 0.
    pub rank: usize,
    /// DP replica.
    pub replica: usize,
    /// Pipeline stage.
    pub stage: usize,
    /// What happened.
    pub kind: EventKind,
    /// Micro-batch, for compute, TP and PP events.
    pub micro_batch: Option<usize>,
    /// Model chunk on the device.
    pub chunk: usize,
    /// Start, seconds from the step's start.
    pub start_s: f64,
    /// End, seconds.
    pub end_s: f64,
}

/// Bytes sent per step, summed over all devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CommBytes {
    /// DP gradient synchronisation (and the tied-embedding all-reduce).
    pub dp: f64,
    /// TP all-reduces.
    pub tp: f64,
    /// Pipeline sends.
    pub pp: f64,
    /// Over intra-node links.
    pub intra: f64,
    /// Over inter-node links.
    pub inter: f64,
}

impl CommBytes {
    fn add(&mut self, group: &str, kind: LinkKind, bytes: f64) {
        match group {
            "dp" => self.dp += bytes,
            "tp" => self.tp += bytes,
            _ => self.pp += bytes,
        }
        match kind {
            LinkKind::Intra => self.intra += bytes,
            LinkKind::Inter => self.inter += bytes,
        }
    }

    /// All bytes.
    pub fn total(&self) -> f64 {
        self.dp + self.tp + self.pp
    }
}

/// Where one device's step time goes, in seconds, averaged over the pipeline devices (a
/// TP group counts once). The parts add up to the replica's step time: up to the device's
/// last backward it computes, waits on blocking TP all-reduces, or idles for pipeline
/// inputs; after it, it runs the optimizer or waits for gradient synchronisation (DP
/// buckets not hidden behind backward, the tied-embedding all-reduce, other replicas and
/// stages, local SGD's amortised parameter average).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepBreakdown {
    /// Forward and backward compute.
    pub compute_s: f64,
    /// Blocking tensor-parallel all-reduces.
    pub tp_comm_s: f64,
    /// Idle inside the pipeline section (bubble, waiting for activations or gradients).
    pub pipeline_idle_s: f64,
    /// Exposed gradient/parameter synchronisation and waiting for the rest of the job.
    pub sync_s: f64,
    /// The optimizer step.
    pub optimizer_s: f64,
}

impl StepBreakdown {
    /// The sum of the parts: the mean device's step time.
    pub fn total_s(&self) -> f64 {
        self.compute_s + self.tp_comm_s + self.pipeline_idle_s + self.sync_s + self.optimizer_s
    }
}

/// The simulated outcome of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    /// The configuration's label.
    pub layout: String,
    /// Seconds per step (async: global batch / samples_per_s).
    pub step_s: f64,
    /// Sequences per second.
    pub samples_per_s: f64,
    /// Target tokens per second (`samples_per_s · seq_len`).
    pub tokens_per_s: f64,
    /// Per global rank: compute-busy time / step time.
    pub utilization: Vec<f64>,
    /// Mean of `utilization`.
    pub utilization_mean: f64,
    /// Minimum of `utilization`.
    pub utilization_min: f64,
    /// Model FLOPs per second / peak FLOP/s of the devices used.
    pub mfu: f64,
    /// Mean idle fraction of pipeline devices inside the pipeline section of the step.
    pub bubble: f64,
    /// Bubble of each stage of replica 0.
    pub bubble_per_stage: Vec<f64>,
    /// Bytes sent per step by group and link class.
    pub bytes: CommBytes,
    /// Peak memory per global rank.
    pub peak_memory_bytes: Vec<u64>,
    /// Whether every device's peak memory fits its capacity.
    pub fits: bool,
    /// The partition used (over virtual stages).
    pub partition: Partition,
    /// Sequences per micro-batch of each replica.
    pub replica_micro_batch: Vec<usize>,
    /// Per replica step time (sync: all equal).
    pub replica_step_s: Vec<f64>,
    /// Where a device's step goes, averaged over pipeline devices.
    pub breakdown: StepBreakdown,
    /// Events of the step.
    pub timeline: Vec<Event>,
}

/// Per-pipeline-device constants of a simulation.
struct Unit {
    dev: DeviceSpec,
    rank: usize,
}

struct VStage {
    fwd: f64,
    bwd: f64,
    tp_fwd: f64,
    tp_bwd: f64,
    tp_bytes_fwd: f64,
    tp_bytes_bwd: f64,
    out_bytes: f64,
    act_bytes: f64,
    state_bytes: f64,
    params: f64,
    /// Per layer of the range, reversed: (bwd seconds, grad bytes, tied copy grad bytes).
    grads_rev: Vec<(f64, f64)>,
}

struct Prepared {
    units: Vec<Vec<Unit>>, // [replica][stage]
    vst: Vec<Vec<VStage>>, // [replica][virtual stage]
    partition: Partition,
    b: Vec<usize>,
    tp_link: Vec<(LinkClass, LinkKind)>, // per pipeline device index r*pp+s
    tied_grad_bytes: f64,
}

fn all_reduce_cost(n: usize, bytes: f64, l: &LinkClass) -> (f64, f64) {
    if n <= 1 || bytes <= 0.0 {
        return (0.0, 0.0);
    }
    let t = link::all_reduce_time(n, bytes, l);
    let sent = match link::all_reduce_algorithm(n, bytes, l) {
        link::AllReduceAlgorithm::Ring => link::ring_all_reduce_bytes_per_rank(n, bytes),
        link::AllReduceAlgorithm::RecursiveDoubling => {
            link::recursive_doubling_all_reduce_bytes_per_rank(n, bytes)
        }
    };
    (t, sent)
}

fn slowest<'a>(devs: impl Iterator<Item = &'a DeviceSpec>) -> Option<DeviceSpec> {
    devs.min_by(|a, b| a.achieved_flops().total_cmp(&b.achieved_flops()))
        .cloned()
}

fn prepare(cfg: &SimConfig, cluster: &Cluster) -> Result<Prepared, BalanceError> {
    cfg.validate(cluster)?;
    let Mesh { dp, tp, pp } = cfg.mesh;
    let v = cfg.schedule.chunks();
    let vn = pp * v;
    let m = cfg.micro_batches;
    let topo = &cluster.topology;

    let mut units = Vec::with_capacity(dp);
    for d in 0..dp {
        let mut row = Vec::with_capacity(pp);
        for s in 0..pp {
            let ranks = (0..tp).map(|t| cfg.rank(d, t, s));
            let dev = slowest(ranks.map(|r| &cluster.devices[r]))
                .ok_or_else(|| BalanceError::InvalidDevice("empty TP group".into()))?;
            row.push(Unit {
                dev,
                rank: cfg.rank(d, 0, s),
            });
        }
        units.push(row);
    }

    // Batch split over replicas (per micro-batch).
    let per_micro = cfg.global_batch / m;
    let speeds: Vec<f64> = if cfg.balance {
        units
            .iter()
            .map(|row| {
                row.iter()
                    .map(|u| u.dev.achieved_flops())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    } else {
        vec![1.0; dp]
    };
    let b = split_batch(per_micro, &speeds)?.batch;

    // Profiles, cached by (device name, micro-batch size).
    let mut cache: HashMap<(String, usize), CostProfile> = HashMap::new();
    let mut profile = |dev: &DeviceSpec, mb: usize| -> Result<CostProfile, BalanceError> {
        let key = (dev.name.clone(), mb);
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let p = match &cfg.profile {
            None => CostProfile::modelled(&cfg.shape, dev, mb as u64, tp as u32)?,
            Some(measured) => {
                let mut p = if tp > 1 {
                    measured.tp_sharded(&cfg.shape, tp as u32)?
                } else {
                    measured.clone()
                };
                let scale = mb as f64 / measured.micro_batch as f64;
                for l in &mut p.layers {
                    l.fwd_s *= scale;
                    l.bwd_s *= scale;
                    l.act_bytes = (l.act_bytes as f64 * scale) as u64;
                    l.out_bytes = (l.out_bytes as f64 * scale) as u64;
                    for x in l
                        .tp_fwd_allreduce_bytes
                        .iter_mut()
                        .chain(l.tp_bwd_allreduce_bytes.iter_mut())
                    {
                        *x = (*x as f64 * scale) as u64;
                    }
                }
                p.micro_batch = mb as u64;
                p
            }
        };
        cache.insert(key, p.clone());
        Ok(p)
    };

    // Partition over virtual stages.
    let n_blocks = cfg.shape.n_layers as usize;
    let partition = match (&cfg.partition, cfg.balance) {
        (Some(p), _) => p.clone(),
        (None, false) => Partition::uniform(n_blocks, vn)?,
        (None, true) => {
            // Reference: replica 0's stage-0 device at the largest micro-batch; stage speeds
            // relative to it, the slowest replica deciding.
            let bmax = b.iter().copied().max().unwrap_or(1);
            let reference = units[0][0].dev.clone();
            let ref_prof = profile(&reference, bmax)?;
            let stages = (0..vn)
                .map(|vs| {
                    let s = vs % pp;
                    let speed = units
                        .iter()
                        .map(|row| row[s].dev.achieved_flops() / reference.achieved_flops())
                        .fold(f64::INFINITY, f64::min);
                    let memory = units
                        .iter()
                        .map(|row| row[s].dev.memory_bytes)
                        .min()
                        .unwrap_or(0);
                    // Chunks share the device's memory.
                    StageSpec {
                        speed,
                        memory_bytes: memory / v as u64,
                        in_flight: cfg.schedule.in_flight(s, pp, m),
                    }
                })
                .collect();
            let problem = PartitionProblem {
                profile: &ref_prof,
                stages,
                min_blocks_per_stage: cfg.min_blocks_per_stage,
                boundary_s: 0.0,
            };
            problem.solve()?.partition
        }
    };

    let mut vst = Vec::with_capacity(dp);
    let mut tp_link = Vec::with_capacity(dp * pp);
    let mut tied_grad_bytes = 0.0;
    for d in 0..dp {
        for s in 0..pp {
            let group: Vec<usize> = (0..tp).map(|t| cfg.rank(d, t, s)).collect();
            tp_link.push((topo.group_link(&group), topo.group_link_kind(&group)));
        }
        let mut row = Vec::with_capacity(vn);
        for vs in 0..vn {
            let s = vs % pp;
            let prof = profile(&units[d][s].dev, b[d])?;
            let (tl, _) = tp_link[d * pp + s];
            let range = partition.range(vs);
            let layers = &prof.layers[range.clone()];
            let holds_head = range.end == prof.len() && vn > 1;
            let mut st = VStage {
                fwd: 0.0,
                bwd: 0.0,
                tp_fwd: 0.0,
                tp_bwd: 0.0,
                tp_bytes_fwd: 0.0,
                tp_bytes_bwd: 0.0,
                out_bytes: layers.last().map_or(0.0, |l| l.out_bytes as f64),
                act_bytes: 0.0,
                state_bytes: 0.0,
                params: 0.0,
                grads_rev: Vec::with_capacity(layers.len()),
            };
            for l in layers {
                st.fwd += l.fwd_s;
                st.bwd += l.bwd_s;
                for &x in &l.tp_fwd_allreduce_bytes {
                    let (t, sent) = all_reduce_cost(tp, x as f64, &tl);
                    st.tp_fwd += t;
                    st.tp_bytes_fwd += sent * tp as f64;
                }
                for &x in &l.tp_bwd_allreduce_bytes {
                    let (t, sent) = all_reduce_cost(tp, x as f64, &tl);
                    st.tp_bwd += t;
                    st.tp_bytes_bwd += sent * tp as f64;
                }
                st.act_bytes += l.act_bytes as f64;
                st.state_bytes += l.state_bytes as f64;
                st.params += l.param_bytes as f64 / f64::from(cfg.shape.precision.param_bytes);
            }
            if holds_head {
                let head = &prof.layers[prof.len() - 1];
                st.state_bytes += head.tied_copy_state_bytes as f64;
                tied_grad_bytes = head.tied_copy_grad_bytes as f64;
            }
            for l in layers.iter().rev() {
                let extra = if holds_head && l.kind == crate::shape::LayerKind::Head {
                    l.tied_copy_grad_bytes as f64
                } else {
                    0.0
                };
                st.grads_rev.push((l.bwd_s, l.grad_bytes as f64 + extra));
            }
            row.push(st);
        }
        vst.push(row);
    }
    Ok(Prepared {
        units,
        vst,
        partition,
        b,
        tp_link,
        tied_grad_bytes,
    })
}

/// A collective on the DP/embedding communication streams.
struct Collective {
    members: Vec<(usize, usize)>, // (replica, stage)
    ready: f64,
    dur: f64,
    kind: EventKind,
    chunk: usize,
    after: Vec<usize>, // collectives that must finish first
}

fn run_step(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    slow: &[f64],
) -> Result<SimResult, BalanceError> {
    let Mesh { dp, tp, pp } = cfg.mesh;
    let v = cfg.schedule.chunks();
    let vn = pp * v;
    let m = cfg.micro_batches;
    let topo = &cluster.topology;
    let mut bytes = CommBytes::default();
    let rec = cfg.record_timeline;
    let mut timeline = Vec::new();

    let ops: Vec<Vec<Op>> = (0..pp)
        .map(|s| cfg.schedule.ops(s, pp, m))
        .collect::<Result<_, _>>()
        .map_err(|r| cfg.layout_err(r))?;

    // Link between the devices of two virtual stages of replica d.
    let pp_link = |d: usize, a: usize, b: usize| -> Option<(LinkClass, LinkKind)> {
        let (sa, sb) = (a % pp, b % pp);
        if sa == sb {
            return None;
        }
        let (ra, rb) = (cfg.rank(d, 0, sa), cfg.rank(d, 0, sb));
        let k = topo.link_kind(ra, rb);
        Some((topo.link(k), k))
    };

    // ---- pipeline compute ----
    let nan = f64::NAN;
    let mut f_done = vec![vec![vec![nan; m]; vn]; dp];
    let mut b_done = vec![vec![vec![nan; m]; vn]; dp];
    let mut busy = vec![vec![0.0f64; pp]; dp]; // compute only
    let mut occupied = vec![vec![0.0f64; pp]; dp]; // compute + TP comm
    let mut last_b = vec![vec![vec![(0.0f64, 0.0f64); v]; pp]; dp]; // (start, factor) of last backward per chunk
    let mut act_peak = vec![vec![0.0f64; pp]; dp];
    for d in 0..dp {
        let mut next = vec![0usize; pp];
        let mut free = vec![0.0f64; pp];
        let mut act_now = vec![0.0f64; pp];
        let mut remaining: usize = ops.iter().map(Vec::len).sum();
        while remaining > 0 {
            let mut progressed = false;
            for s in 0..pp {
                while next[s] < ops[s].len() {
                    let op = ops[s][next[s]];
                    let vs = op.chunk * pp + s;
                    let mb = op.micro_batch;
                    let factor = slow[cfg.rank(d, 0, s)];
                    let st = &prep.vst[d][vs];
                    let dep = if op.forward {
                        if vs == 0 {
                            Some(0.0)
                        } else {
                            let t = f_done[d][vs - 1][mb];
                            (!t.is_nan()).then(|| {
                                t + pp_link(d, vs - 1, vs).map_or(0.0, |(l, _)| {
                                    link::p2p_time(prep.vst[d][vs - 1].out_bytes, &l)
                                })
                            })
                        }
                    } else if vs + 1 == vn {
                        let t = f_done[d][vs][mb];
                        (!t.is_nan()).then_some(t)
                    } else {
                        let t = b_done[d][vs + 1][mb];
                        (!t.is_nan()).then(|| {
                            t + pp_link(d, vs + 1, vs)
                                .map_or(0.0, |(l, _)| link::p2p_time(st.out_bytes, &l))
                        })
                    };
                    let Some(ready) = dep else { break };
                    let start = free[s].max(ready);
                    let (compute, comm) = if op.forward {
                        (st.fwd * factor, st.tp_fwd)
                    } else {
                        (st.bwd * factor, st.tp_bwd)
                    };
                    let end = start + compute + comm;
                    let rank = prep.units[d][s].rank;
                    let kind = if op.forward {
                        EventKind::Forward
                    } else {
                        EventKind::Backward
                    };
                    if rec {
                        timeline.push(Event {
                            rank,
                            replica: d,
                            stage: s,
                            kind,
                            micro_batch: Some(mb),
                            chunk: op.chunk,
                            start_s: start,
                            end_s: start + compute,
                        });
                    }
                    if comm > 0.0 && rec {
                        timeline.push(Event {
                            rank,
                            replica: d,
                            stage: s,
                            kind: EventKind::TpComm,
                            micro_batch: Some(mb),
                            chunk: op.chunk,
                            start_s: start + compute,
                            end_s: end,
                        });
                    }
                    let (_, tk) = prep.tp_link[d * pp + s];
                    bytes.add(
                        "tp",
                        tk,
                        if op.forward {
                            st.tp_bytes_fwd
                        } else {
                            st.tp_bytes_bwd
                        },
                    );
                    // Pipeline send of this op's output (forward) or input gradient (backward).
                    let send_to = if op.forward {
                        (vs + 1 < vn).then(|| vs + 1)
                    } else {
                        vs.checked_sub(1)
                    };
                    if let Some(to) = send_to {
                        if let Some((l, k)) = pp_link(d, vs, to) {
                            let payload = if op.forward {
                                st.out_bytes
                            } else {
                                prep.vst[d][to].out_bytes
                            };
                            bytes.add("pp", k, payload * tp as f64);
                            if rec {
                                timeline.push(Event {
                                    rank,
                                    replica: d,
                                    stage: s,
                                    kind: EventKind::PpTransfer,
                                    micro_batch: Some(mb),
                                    chunk: op.chunk,
                                    start_s: end,
                                    end_s: end + link::p2p_time(payload, &l),
                                });
                            }
                        }
                    }
                    if op.forward {
                        f_done[d][vs][mb] = end;
                        act_now[s] += st.act_bytes;
                        act_peak[d][s] = act_peak[d][s].max(act_now[s]);
                    } else {
                        b_done[d][vs][mb] = end;
                        act_now[s] -= st.act_bytes;
                        last_b[d][s][op.chunk] = (start, factor);
                    }
                    busy[d][s] += compute;
                    occupied[d][s] += compute + comm;
                    free[s] = end;
                    next[s] += 1;
                    remaining -= 1;
                    progressed = true;
                }
            }
            if !progressed {
                return Err(cfg.layout_err(format!("schedule deadlocked in replica {d}")));
            }
        }
    }
    let compute_end: Vec<Vec<f64>> = (0..dp)
        .map(|d| {
            (0..pp)
                .map(|s| {
                    (0..v)
                        .map(|c| b_done[d][c * pp + s].iter().copied().fold(0.0, f64::max))
                        .fold(0.0, f64::max)
                })
                .collect()
        })
        .collect();

    // ---- gradient synchronisation ----
    let mut colls: Vec<Collective> = Vec::new();
    let tied = cfg.shape.tied_head && vn > 1 && prep.tied_grad_bytes > 0.0;
    let head_stage = (vn - 1) % pp;
    let mut tied_idx = vec![None; dp];
    // Ready times of each layer-gradient bucket: grads of chunk c are final during the last
    // backward of c, layer by layer in reverse.
    let mut buckets: Vec<Vec<Vec<(f64, f64, bool)>>> = vec![vec![Vec::new(); pp]; dp]; // (ready, bytes, has_tied)
    for d in 0..dp {
        if tied {
            let emb_ready = {
                let (start, f) = last_b[d][0][0];
                start + prep.vst[d][0].bwd * f + prep.vst[d][0].tp_bwd
            };
            let chunk = (vn - 1) / pp;
            let (hs, hf) = last_b[d][head_stage][chunk];
            let head_grad = prep.vst[d][vn - 1].grads_rev.first().map_or(0.0, |g| g.0);
            let head_ready = hs + head_grad * hf;
            let l = topo.link_kind(cfg.rank(d, 0, 0), cfg.rank(d, 0, head_stage));
            let (t, sent) = all_reduce_cost(2, prep.tied_grad_bytes, &topo.link(l));
            bytes.add("dp", l, 2.0 * sent * tp as f64);
            tied_idx[d] = Some(colls.len());
            colls.push(Collective {
                members: vec![(d, 0), (d, head_stage)],
                ready: emb_ready.max(head_ready),
                dur: t,
                kind: EventKind::TiedSync,
                chunk: 0,
                after: Vec::new(),
            });
        }
        for s in 0..pp {
            for c in 0..v {
                let vs = c * pp + s;
                let st = &prep.vst[d][vs];
                let (start, f) = last_b[d][s][c];
                let total_bwd: f64 = st.grads_rev.iter().map(|g| g.0).sum();
                let op_len = st.bwd * f + st.tp_bwd;
                let mut acc_t = 0.0;
                let mut acc_b = 0.0;
                let n_layers = st.grads_rev.len();
                let mut has_tied = false;
                for (i, &(lb, gb)) in st.grads_rev.iter().enumerate() {
                    acc_t += lb;
                    acc_b += gb;
                    let layer = prep.partition.range(vs).end - 1 - i;
                    has_tied |= tied && (layer == 0 || layer + 1 == cfg.shape.n_partition_layers());
                    if acc_b >= cfg.bucket_bytes as f64 || i + 1 == n_layers {
                        let frac = if total_bwd > 0.0 {
                            acc_t / total_bwd
                        } else {
                            1.0
                        };
                        buckets[d][s].push((start + frac * op_len, acc_b, has_tied));
                        acc_b = 0.0;
                        has_tied = false;
                    }
                }
            }
            buckets[d][s].sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    let local_sgd = matches!(cfg.dp_mode, DpMode::LocalSgd { .. });
    if dp > 1 && !local_sgd {
        let comp = &cfg.compression;
        let gb = f64::from(cfg.shape.precision.grad_bytes);
        let compress_s = |dev: &DeviceSpec, raw: f64| {
            let elems = raw / gb;
            dev.roofline_s(
                elems * comp.flops_per_element,
                elems * gb * comp.memory_passes,
            )
        };
        for s in 0..pp {
            let group: Vec<usize> = (0..dp).map(|d| cfg.rank(d, 0, s)).collect();
            let lk = topo.group_link_kind(&group);
            let lc = topo.link(lk);
            let n_b = buckets[0][s].len();
            for k in 0..n_b {
                let raw = buckets[0][s][k].1;
                let wire = raw * comp.wire_ratio;
                let (t, sent) = match comp.aggregation {
                    Aggregation::AllReduce => all_reduce_cost(dp, wire, &lc),
                    Aggregation::GatherThenSum => (
                        link::all_gather_time(dp, wire * dp as f64, &lc),
                        link::ring_gather_scatter_bytes_per_rank(dp, wire * dp as f64),
                    ),
                };
                let cs = (0..dp)
                    .map(|d| compress_s(&prep.units[d][s].dev, raw))
                    .fold(0.0, f64::max);
                bytes.add("dp", lk, sent * (dp * tp) as f64);
                let has_tied = buckets[0][s][k].2;
                match cfg.dp_mode {
                    DpMode::Sync => {
                        let ready = (0..dp).map(|d| buckets[d][s][k].0).fold(0.0, f64::max);
                        let after: Vec<usize> = if has_tied {
                            tied_idx.iter().flatten().copied().collect()
                        } else {
                            Vec::new()
                        };
                        colls.push(Collective {
                            members: (0..dp).map(|d| (d, s)).collect(),
                            ready,
                            dur: t + cs,
                            kind: EventKind::DpComm,
                            chunk: 0,
                            after,
                        });
                    }
                    // Local SGD exchanges no gradients (see the parameter average below).
                    DpMode::LocalSgd { .. } => {}
                    DpMode::Async { .. } => {
                        for d in 0..dp {
                            let after: Vec<usize> = if has_tied {
                                tied_idx[d].into_iter().collect()
                            } else {
                                Vec::new()
                            };
                            colls.push(Collective {
                                members: vec![(d, s)],
                                ready: buckets[d][s][k].0,
                                dur: t + cs,
                                kind: EventKind::DpComm,
                                chunk: 0,
                                after,
                            });
                        }
                    }
                }
            }
        }
    }
    // Schedule collectives in order of readiness on per-device comm streams.
    let mut order: Vec<usize> = (0..colls.len()).collect();
    // A dependency is never later in this order: its key is at most the dependent's and,
    // pushed first, it wins ties.
    let key = |i: usize| {
        colls[i]
            .after
            .iter()
            .fold(colls[i].ready, |k, &j| k.max(colls[j].ready))
    };
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    let mut stream = vec![vec![0.0f64; pp]; dp];
    let mut coll_end = vec![0.0f64; colls.len()];
    for &i in &order {
        let c = &colls[i];
        let mut start = c.ready;
        for &j in &c.after {
            start = start.max(coll_end[j]);
        }
        for &(d, s) in &c.members {
            start = start.max(stream[d][s]);
        }
        let end = start + c.dur;
        coll_end[i] = end;
        for &(d, s) in &c.members {
            stream[d][s] = end;
            if rec {
                timeline.push(Event {
                    rank: prep.units[d][s].rank,
                    replica: d,
                    stage: s,
                    kind: c.kind,
                    micro_batch: None,
                    chunk: c.chunk,
                    start_s: start,
                    end_s: end,
                });
            }
        }
    }

    // ---- optimizer and step end ----
    let mut dev_end = vec![vec![0.0f64; pp]; dp];
    let mut opt_s = vec![vec![0.0f64; pp]; dp];
    let mut state = vec![vec![0.0f64; pp]; dp];
    for d in 0..dp {
        for s in 0..pp {
            let (params, st_bytes) = (0..v).fold((0.0, 0.0), |acc, c| {
                let x = &prep.vst[d][c * pp + s];
                (acc.0 + x.params, acc.1 + x.state_bytes)
            });
            state[d][s] = st_bytes;
            let dev = &prep.units[d][s].dev;
            // AdamW: ~12 FLOPs per parameter, state read and written once.
            let o = dev.roofline_s(12.0 * params, 2.0 * st_bytes) * slow[prep.units[d][s].rank];
            let start = compute_end[d][s].max(stream[d][s]);
            opt_s[d][s] = o;
            dev_end[d][s] = start + o;
            if rec {
                timeline.push(Event {
                    rank: prep.units[d][s].rank,
                    replica: d,
                    stage: s,
                    kind: EventKind::Optimizer,
                    micro_batch: None,
                    chunk: 0,
                    start_s: start,
                    end_s: start + o,
                });
            }
        }
    }
    let replica_end: Vec<f64> = dev_end
        .iter()
        .map(|row| row.iter().copied().fold(0.0, f64::max))
        .collect();
    let (replica_step_s, step_s, samples_per_s) = match cfg.dp_mode {
        DpMode::Sync => {
            let t = replica_end.iter().copied().fold(0.0, f64::max);
            (vec![t; dp], t, cfg.global_batch as f64 / t)
        }
        DpMode::LocalSgd { sync_every } => {
            // Between averages every replica runs at its own pace; at the average all wait
            // for the slowest, then all-reduce the parameters stage by stage (in parallel).
            let k = f64::from(sync_every.max(1));
            let mut avg = 0.0f64;
            if dp > 1 {
                for s in 0..pp {
                    let group: Vec<usize> = (0..dp).map(|d| cfg.rank(d, 0, s)).collect();
                    let lk = topo.group_link_kind(&group);
                    let param_bytes = (0..v).map(|c| prep.vst[0][c * pp + s].params).sum::<f64>()
                        * f64::from(cfg.shape.precision.param_bytes);
                    let (t, sent) = all_reduce_cost(dp, param_bytes, &topo.link(lk));
                    bytes.add("dp", lk, sent * (dp * tp) as f64 / k);
                    avg = avg.max(t);
                }
            }
            let t = replica_end.iter().copied().fold(0.0, f64::max) + avg / k;
            (vec![t; dp], t, cfg.global_batch as f64 / t)
        }
        DpMode::Async { .. } => {
            let sps: f64 = (0..dp)
                .map(|d| (m * prep.b[d]) as f64 / replica_end[d])
                .sum();
            (replica_end.clone(), cfg.global_batch as f64 / sps, sps)
        }
    };

    // ---- metrics ----
    let world = cfg.mesh.world();
    let mut utilization = vec![0.0; world];
    let mut peak_memory = vec![0u64; world];
    let mut fits = true;
    let mut bubbles = Vec::with_capacity(dp * pp);
    let mut bubble_per_stage = Vec::with_capacity(pp);
    let mut breakdown = StepBreakdown::default();
    for d in 0..dp {
        let span = compute_end[d].iter().copied().fold(0.0, f64::max);
        for s in 0..pp {
            let u = (busy[d][s] + opt_s[d][s]) / replica_step_s[d];
            breakdown.compute_s += busy[d][s];
            breakdown.tp_comm_s += occupied[d][s] - busy[d][s];
            breakdown.pipeline_idle_s += (compute_end[d][s] - occupied[d][s]).max(0.0);
            breakdown.optimizer_s += opt_s[d][s];
            breakdown.sync_s += (replica_step_s[d] - compute_end[d][s] - opt_s[d][s]).max(0.0);
            // Two DP buckets in flight as communication buffers (never more than the
            // device's gradients).
            let comm_buf = if dp > 1 {
                let grads: f64 = (0..v)
                    .flat_map(|c| prep.vst[d][c * pp + s].grads_rev.iter().map(|g| g.1))
                    .sum();
                (2.0 * cfg.bucket_bytes as f64).min(grads)
            } else {
                0.0
            };
            let mem = (state[d][s] + act_peak[d][s] + comm_buf).ceil() as u64;
            for t in 0..tp {
                let r = cfg.rank(d, t, s);
                utilization[r] = u;
                peak_memory[r] = mem;
                fits &= mem <= cluster.devices[r].memory_bytes;
            }
            let bub = if span > 0.0 {
                1.0 - occupied[d][s] / span
            } else {
                0.0
            };
            // Float residue of a stage busy for the whole span is no bubble.
            let bub = if bub < 1e-12 { 0.0 } else { bub };
            bubbles.push(bub);
            if d == 0 {
                bubble_per_stage.push(bub);
            }
        }
    }
    let units = (dp * pp) as f64;
    breakdown.compute_s /= units;
    breakdown.tp_comm_s /= units;
    breakdown.pipeline_idle_s /= units;
    breakdown.optimizer_s /= units;
    breakdown.sync_s /= units;
    let utilization_mean = utilization.iter().sum::<f64>() / world as f64;
    let utilization_min = utilization.iter().copied().fold(f64::INFINITY, f64::min);
    let peak: f64 = (0..world).map(|r| cluster.devices[r].peak_flops).sum();
    let model_flops = samples_per_s * cfg.shape.seq_len as f64 * cfg.shape.train_flops_per_token();
    Ok(SimResult {
        layout: cfg.label(),
        step_s,
        samples_per_s,
        tokens_per_s: samples_per_s * cfg.shape.seq_len as f64,
        utilization,
        utilization_mean,
        utilization_min,
        mfu: model_flops / peak,
        bubble: bubbles.iter().sum::<f64>() / bubbles.len() as f64,
        bubble_per_stage,
        bytes,
        peak_memory_bytes: peak_memory,
        fits,
        partition: prep.partition.clone(),
        replica_micro_batch: prep.b.clone(),
        replica_step_s,
        breakdown,
        timeline,
    })
}

/// Simulates one training step of `cfg` on `cluster`.
pub fn simulate(cfg: &SimConfig, cluster: &Cluster) -> Result<SimResult, BalanceError> {
    let prep = prepare(cfg, cluster)?;
    let slow = vec![1.0; cluster.len()];
    run_step(cfg, cluster, &prep, &slow)
}

/// The outcome of many simulated steps with per-step jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiStepResult {
    /// Wall time of each step (sync) or of each step of the slowest replica's progress
    /// (async: completion of step `i` by every replica minus that of step `i - 1`).
    pub step_s: Vec<f64>,
    /// Total wall time.
    pub total_s: f64,
    /// Sequences per second over the run.
    pub samples_per_s: f64,
    /// Largest number of steps a replica ran ahead of the slowest (async).
    pub max_lead: u32,
}

/// Simulates `steps` steps; each device's compute is slowed by a factor drawn uniformly
/// from `[1, 1 + jitter]` per step (stragglers, noise). Async DP lets replicas run ahead of
/// the slowest by at most `max_staleness` steps (stale-synchronous parallel).
pub fn simulate_steps(
    cfg: &SimConfig,
    cluster: &Cluster,
    steps: usize,
    jitter: f64,
    seed: u64,
) -> Result<MultiStepResult, BalanceError> {
    if steps == 0 || !(jitter.is_finite() && jitter >= 0.0) {
        return Err(cfg.layout_err(format!(
            "steps {steps} must be >= 1 and jitter {jitter} >= 0"
        )));
    }
    let prep = prepare(cfg, cluster)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dp = cfg.mesh.dp;
    // done[d][i]: completion time of replica d's step i.
    let mut done: Vec<Vec<f64>> = vec![Vec::with_capacity(steps); dp];
    let mut max_lead = 0u32;
    for i in 0..steps {
        let slow: Vec<f64> = (0..cluster.len())
            .map(|_| 1.0 + rng.random_range(0.0..=jitter))
            .collect();
        let out = run_step(cfg, cluster, &prep, &slow)?;
        match cfg.dp_mode {
            DpMode::Sync | DpMode::LocalSgd { .. } => {
                let prev = done[0].last().copied().unwrap_or(0.0);
                for row in done.iter_mut() {
                    row.push(prev + out.step_s);
                }
            }
            DpMode::Async { max_staleness } => {
                let k = max_staleness as usize;
                let gate = if i > k {
                    (0..dp)
                        .map(|d| done[d][i - 1 - k])
                        .fold(f64::INFINITY, f64::min)
                } else {
                    0.0
                };
                for d in 0..dp {
                    let own = done[d].last().copied().unwrap_or(0.0);
                    done[d].push(own.max(gate) + out.replica_step_s[d]);
                }
            }
        }
        // Lead: how many steps the fastest replica has finished beyond the slowest at the
        // moment the slowest finishes step i.
        let slowest_now = (0..dp).map(|d| done[d][i]).fold(0.0, f64::max);
        for row in &done {
            let ahead = row.iter().filter(|&&t| t <= slowest_now).count() as u32;
            max_lead = max_lead.max(ahead.saturating_sub(i as u32 + 1));
        }
    }
    let all: Vec<f64> = (0..steps)
        .map(|i| (0..dp).map(|d| done[d][i]).fold(0.0, f64::max))
        .collect();
    let step_s: Vec<f64> = all
        .iter()
        .enumerate()
        .map(|(i, &t)| t - if i == 0 { 0.0 } else { all[i - 1] })
        .collect();
    let total_s = (0..dp).map(|d| done[d][steps - 1]).fold(0.0, f64::max);
    Ok(MultiStepResult {
        step_s,
        total_s,
        samples_per_s: (steps * cfg.global_batch) as f64 / total_s,
        max_lead,
    })
}

/// Draws a step's timeline as SVG (one row per pipeline device of the first 4 replicas).
pub fn timeline_svg(result: &SimResult) -> String {
    use std::fmt::Write as _;
    let rows: Vec<(usize, usize)> = {
        let mut r: Vec<(usize, usize)> = result
            .timeline
            .iter()
            .filter(|e| e.replica < 4)
            .map(|e| (e.replica, e.stage))
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    let end = result
        .timeline
        .iter()
        .map(|e| e.end_s)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let (w, row_h, left) = (1200.0, 22.0, 110.0);
    let h = row_h * rows.len() as f64 + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="monospace" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<text x="4" y="14">simulated: {} — step {:.4} s</text>"#,
        result.layout, result.step_s
    );
    for (i, &(d, s)) in rows.iter().enumerate() {
        let y = 24.0 + i as f64 * row_h;
        let _ = write!(svg, r#"<text x="4" y="{}">dp{d} stage{s}</text>"#, y + 14.0);
        for e in result
            .timeline
            .iter()
            .filter(|e| e.replica == d && e.stage == s)
        {
            let (color, dy, hh) = match e.kind {
                EventKind::Forward => ("#4c78a8", 0.0, row_h - 4.0),
                EventKind::Backward => ("#72b7b2", 0.0, row_h - 4.0),
                EventKind::TpComm => ("#e45756", 0.0, row_h - 4.0),
                EventKind::Optimizer => ("#b279a2", 0.0, row_h - 4.0),
                EventKind::DpComm => ("#f58518", row_h - 8.0, 4.0),
                EventKind::TiedSync => ("#9d755d", row_h - 8.0, 4.0),
                EventKind::PpTransfer => continue,
            };
            let x = left + (w - left - 10.0) * e.start_s / end;
            let ww = ((w - left - 10.0) * (e.end_s - e.start_s) / end).max(0.5);
            let _ = write!(
                svg,
                r#"<rect x="{x:.2}" y="{:.2}" width="{ww:.2}" height="{hh}" fill="{color}"/>"#,
                y + dy
            );
        }
    }
    svg.push_str("</svg>");
    svg
}
