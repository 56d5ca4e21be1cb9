//! The seam between the training loop and what runs the steps (one device, or one rank of
//! a mesh): the [`Stepper`] trait and what a step reports.

use meshrec_model::data::Batch;
use meshrec_model::Recommender;
use meshrec_parallel::dp::DpTraffic;
use serde::Serialize;

use std::path::Path;

use crate::checkpoint::{write_entry, FileEntry, Manifest, Progress, ShardIndex, TrainState};
use crate::checkpoint_shard::{assemble, shard_file, RankShard};
use crate::error::RunError;
use crate::faults::FaultPoint;

/// What the training loop needs from whatever runs the steps: one device, or one rank of a
/// device mesh. Calls are collective on a mesh: every rank makes them in the same order.
pub trait Stepper {
    /// One optimizer step on the global batch at learning rate `lr`.
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError>;
    /// The full model with the current parameters (gathered from the shards on a mesh).
    fn full_model(&mut self) -> Result<Recommender, RunError>;
    /// Whether this rank evaluates, writes the run's files and logs.
    fn is_leader(&self) -> bool;
    /// The leader's early-stopping decision, on every rank, with the leader's progress
    /// (early stopping's state included), so that any rank can take over as leader.
    fn leader_decides_stop(
        &mut self,
        stop: bool,
        progress: &mut Progress,
    ) -> Result<bool, RunError>;
    /// A point of the run where an injected fault may strike (a checkpoint being written).
    fn fault_point(&mut self, point: FaultPoint, step: u64) -> Result<(), RunError> {
        let _ = (point, step);
        Ok(())
    }
    /// The full training state (gathered from the shards; the leader gets it).
    fn export_state(&mut self) -> Result<Option<TrainState>, RunError>;
    /// Takes up a saved state; compressor memories only when `same_layout`.
    fn import_state(&mut self, state: &TrainState, same_layout: bool) -> Result<(), RunError>;

    /// Writes this rank's shard of the training state (and, `with_compressor`, its
    /// compressor memories) into the checkpoint folder `tmp` being written; the leader gets
    /// every rank's files and the index. Collective. One device writes its whole state as
    /// the one shard.
    fn write_shards(
        &mut self,
        tmp: &Path,
        with_compressor: bool,
    ) -> Result<Option<(Vec<FileEntry>, ShardIndex)>, RunError> {
        let _ = with_compressor;
        let Some(state) = self.export_state()? else {
            return Ok(None);
        };
        let shard = RankShard::whole(&state);
        let bytes = shard
            .to_bytes()
            .map_err(|e| crate::checkpoint::bad(&tmp.join(shard_file(0)), e))?;
        let files = vec![write_entry(tmp, &shard_file(0), &bytes)?];
        let index = ShardIndex {
            shards: vec![shard_file(0)],
            shapes: state.shapes.clone(),
            optimizer_steps: state.optimizer_steps,
            partition: state.partition.clone(),
        };
        Ok(Some((files, index)))
    }

    /// Takes up a sharded checkpoint's state. One device assembles the whole state (it
    /// holds all of it anyway); a mesh rank reads only what overlaps its slices.
    fn import_shards(
        &mut self,
        dir: &Path,
        manifest: &Manifest,
        index: &ShardIndex,
        same_layout: bool,
    ) -> Result<(), RunError> {
        let state = assemble(dir, manifest, index)?;
        self.import_state(&state, same_layout)
    }
}

/// One optimizer step's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Loss summed over `loss_targets` targets (the global batch, or this replica's rows
    /// when replicas do not meet every step).
    pub loss_sum: f64,
    pub loss_targets: usize,
    /// Targets of the global batch (for throughput).
    pub targets: usize,
    /// The gradient was not finite: the optimizer step was skipped.
    pub skipped: bool,
    /// Measured on a mesh: utilization, bubble, bytes by group, staleness, compression.
    pub parallel: Option<ParallelStepStats>,
    /// The pipeline repartition the online rebalancer carried out after this step.
    pub migration: Option<Migration>,
    /// What each world rank holds after the step's update, counted from its buffers (a
    /// mesh's ranks; empty on one device).
    pub memory: Vec<HeldMemory>,
}

/// The bytes one rank holds for its training state after a step's update, counted from the
/// buffers themselves (parameter tensors' elements, gradient and AdamW moment buffers'
/// allocations), never from the formulas the planner uses: `balance::shape` is tested
/// against these counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HeldMemory {
    pub param_bytes: u64,
    pub grad_bytes: u64,
    pub optimizer_bytes: u64,
}

impl HeldMemory {
    pub fn total_bytes(&self) -> u64 {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }

    /// The larger of each kind.
    pub fn max(self, other: Self) -> Self {
        Self {
            param_bytes: self.param_bytes.max(other.param_bytes),
            grad_bytes: self.grad_bytes.max(other.grad_bytes),
            optimizer_bytes: self.optimizer_bytes.max(other.optimizer_bytes),
        }
    }
}

/// A pipeline repartition by the online rebalancer: the new blocks per stage, and the
/// slowest stage's time per micro-batch before and after as the rebalancer modelled it
/// from measured stage times (MODELLED, not measured).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Migration {
    pub blocks_per_stage: Vec<usize>,
    pub modelled_bottleneck_before_s: f64,
    pub modelled_bottleneck_after_s: f64,
}

/// What one step of a mesh measured (DESIGN.md's definitions).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ParallelStepStats {
    /// Per rank compute-busy / wall: mean and min over ranks (over the ranks of one DP
    /// replica in async mode, where replicas do not meet every step).
    pub utilization_mean: f64,
    pub utilization_min: f64,
    /// Mean over ranks of the idle fraction outside forward and backward.
    pub bubble: f64,
    /// Bytes rank 0 sent in the step, by group.
    pub comm_bytes_dp: u64,
    pub comm_bytes_tp: u64,
    pub comm_bytes_pp: u64,
    /// Dense gradient bytes over the compressor's wire bytes on the DP group (1 = dense),
    /// over the reductions applied (none in some async steps: then 1).
    pub compression_ratio: f64,
    /// The DP reductions' dense and wire (payload) bytes behind the ratio.
    pub dp_dense_bytes: u64,
    pub dp_wire_bytes: u64,
    /// Updates applied in the step and how many other updates each missed (0 in sync DP).
    pub updates_applied: u64,
    pub staleness_mean: f64,
    pub staleness_max: u64,
    /// Pipeline re-partitions done by the online rebalancer.
    pub migrations: u64,
    /// Rows of the global batch of the smallest and largest DP replica's share.
    pub dp_rows_min: u64,
    pub dp_rows_max: u64,
}

impl ParallelStepStats {
    pub(crate) fn add(&mut self, other: &Self) {
        self.utilization_mean += other.utilization_mean;
        self.utilization_min += other.utilization_min;
        self.bubble += other.bubble;
        self.comm_bytes_dp += other.comm_bytes_dp;
        self.comm_bytes_tp += other.comm_bytes_tp;
        self.comm_bytes_pp += other.comm_bytes_pp;
        self.dp_dense_bytes += other.dp_dense_bytes;
        self.dp_wire_bytes += other.dp_wire_bytes;
        self.updates_applied += other.updates_applied;
        self.staleness_mean += other.staleness_mean * other.updates_applied as f64;
        self.staleness_max = self.staleness_max.max(other.staleness_max);
        self.migrations += other.migrations;
        self.dp_rows_min += other.dp_rows_min;
        self.dp_rows_max += other.dp_rows_max;
    }

    pub(crate) fn mean_of(sum: &Self, steps: u64) -> Self {
        let n = steps.max(1);
        Self {
            utilization_mean: sum.utilization_mean / n as f64,
            utilization_min: sum.utilization_min / n as f64,
            bubble: sum.bubble / n as f64,
            comm_bytes_dp: sum.comm_bytes_dp / n,
            comm_bytes_tp: sum.comm_bytes_tp / n,
            comm_bytes_pp: sum.comm_bytes_pp / n,
            compression_ratio: DpTraffic {
                dense_bytes: sum.dp_dense_bytes,
                wire_bytes: sum.dp_wire_bytes,
                sent_bytes: 0,
            }
            .compression_ratio(),
            dp_dense_bytes: sum.dp_dense_bytes / n,
            dp_wire_bytes: sum.dp_wire_bytes / n,
            updates_applied: sum.updates_applied,
            staleness_mean: sum.staleness_mean / sum.updates_applied.max(1) as f64,
            staleness_max: sum.staleness_max,
            migrations: sum.migrations,
            dp_rows_min: sum.dp_rows_min / n,
            dp_rows_max: sum.dp_rows_max / n,
        }
    }
}
