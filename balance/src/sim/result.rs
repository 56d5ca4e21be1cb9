//! What a simulation returns: step time and throughput, utilization, bubble, bytes by
//! group and link, memory, where the time goes, and the timeline. All modelled.

use meshrec_comm::cost::LinkKind;
use meshrec_pipeline::{Axis, StageTimeline};
use serde::{Deserialize, Serialize};

use crate::partition::Partition;

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
    pub(crate) fn add(&mut self, group: Axis, kind: LinkKind, bytes: f64) {
        match group {
            Axis::Dp => self.dp += bytes,
            Axis::Tp => self.tp += bytes,
            Axis::Pp => self.pp += bytes,
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

/// One part of a [`StepBreakdown`], named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StepPart {
    /// [`StepBreakdown::compute_s`].
    Compute,
    /// [`StepBreakdown::tp_comm_s`].
    TpAllReduce,
    /// [`StepBreakdown::pipeline_idle_s`].
    PipelineIdle,
    /// [`StepBreakdown::sync_s`].
    DpSync,
    /// [`StepBreakdown::optimizer_s`].
    Optimizer,
}

impl StepPart {
    /// Every part, in the breakdown's order.
    pub const ALL: [StepPart; 5] = [
        StepPart::Compute,
        StepPart::TpAllReduce,
        StepPart::PipelineIdle,
        StepPart::DpSync,
        StepPart::Optimizer,
    ];

    /// `compute`, `TP all-reduce`, `pipeline idle`, `DP sync/wait`, `optimizer`.
    pub fn label(&self) -> &'static str {
        match self {
            StepPart::Compute => "compute",
            StepPart::TpAllReduce => "TP all-reduce",
            StepPart::PipelineIdle => "pipeline idle",
            StepPart::DpSync => "DP sync/wait",
            StepPart::Optimizer => "optimizer",
        }
    }
}

impl std::fmt::Display for StepPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl StepBreakdown {
    /// Seconds spent in `part`.
    pub fn part(&self, part: StepPart) -> f64 {
        match part {
            StepPart::Compute => self.compute_s,
            StepPart::TpAllReduce => self.tp_comm_s,
            StepPart::PipelineIdle => self.pipeline_idle_s,
            StepPart::DpSync => self.sync_s,
            StepPart::Optimizer => self.optimizer_s,
        }
    }

    /// The sum of the parts: the mean device's step time.
    pub fn total_s(&self) -> f64 {
        StepPart::ALL.iter().map(|&p| self.part(p)).sum()
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
    /// Of which weights, gradients and optimizer state (ZeRO-sharded where configured),
    /// per global rank.
    #[serde(default)]
    pub state_bytes: Vec<u64>,
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
    /// What each pipeline device did in the step, one timeline per (replica, stage) in
    /// replica-major order, labelled `dp{d} pp{s}`, `rank` its TP rank 0's global rank.
    pub timeline: Vec<StageTimeline>,
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
