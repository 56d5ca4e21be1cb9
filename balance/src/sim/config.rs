//! What the simulator simulates: a model, a layout on a cluster, a schedule, the DP mode and
//! compressor, and the balancing switches.

use meshrec_pipeline::{Coord, DpMode, Mesh, Recompute, Schedule, ScheduleSpec, ZeroStage};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::cost::CostProfile;
use crate::error::BalanceError;
use crate::partition::Partition;
use crate::shape::{ActivationPolicy, ModelShape};
use crate::sim::compression::Compression;

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The model.
    pub shape: ModelShape,
    /// The layout (its axis order decides which ranks share a node).
    pub mesh: Mesh,
    /// The pipeline schedule: the same [`meshrec_pipeline::Schedule`] the executor runs.
    pub schedule: ScheduleSpec,
    /// Micro-batches per step per replica.
    pub micro_batches: usize,
    /// Sequences per step over the whole job; a multiple of `micro_batches` with at least
    /// one sequence per replica per micro-batch.
    pub global_batch: usize,
    /// DP synchronisation.
    pub dp_mode: DpMode,
    /// DP gradient compression.
    pub compression: Compression,
    /// ZeRO sharding of the optimizer state (and gradients) over each DP group (sync DP).
    #[serde(default)]
    pub zero: ZeroStage,
    /// Activation recomputation in every block.
    #[serde(default)]
    pub recompute: Recompute,
    /// Sequence parallelism inside each TP group (no effect with `tp == 1`).
    #[serde(default)]
    pub sequence_parallel: bool,
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
        schedule: ScheduleSpec,
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
            zero: ZeroStage::Off,
            recompute: Recompute::None,
            sequence_parallel: false,
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
        self.mesh.rank(Coord {
            dp: d,
            tp: t,
            pp: s,
        })
    }

    /// `dp2·tp2·pp2 1f1b m8 sync none` (`rev` appended for reversed stages, the ZeRO
    /// stage where one is on).
    pub fn label(&self) -> String {
        format!(
            "{}{} {} m{} {} {}{}{}{}",
            self.mesh,
            if self.reverse_stages { " rev" } else { "" },
            self.schedule,
            self.micro_batches,
            self.dp_mode,
            self.compression.name,
            if self.zero == ZeroStage::Off {
                String::new()
            } else {
                format!(" {}", self.zero)
            },
            if self.recompute == Recompute::None {
                String::new()
            } else {
                format!(" recompute-{}", self.recompute)
            },
            if self.activation_policy().sequence_parallel {
                " sp"
            } else {
                ""
            }
        )
    }

    /// What blocks keep for backward under this configuration.
    pub fn activation_policy(&self) -> ActivationPolicy {
        ActivationPolicy {
            recompute: self.recompute,
            sequence_parallel: self.sequence_parallel && self.mesh.tp > 1,
        }
    }

    /// The ZeRO stage in effect: none with one replica or outside sync DP.
    pub fn effective_zero(&self) -> ZeroStage {
        if self.mesh.dp > 1 && self.dp_mode == DpMode::Sync {
            self.zero
        } else {
            ZeroStage::Off
        }
    }

    /// The pipeline schedule of one replica, built and checked.
    pub fn pipeline_schedule(&self) -> Result<Schedule, BalanceError> {
        self.schedule
            .build(self.mesh.pp, self.micro_batches)
            .map_err(|e| self.layout_err(e.to_string()))
    }

    pub(crate) fn layout_err(&self, reason: String) -> BalanceError {
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
        if m.world_size() > cluster.len() {
            return Err(self.layout_err(format!(
                "needs {} devices, cluster {} has {}",
                m.world_size(),
                cluster.name,
                cluster.len()
            )));
        }
        m.check_model(&self.shape.dims(), self.schedule.virtual_stages)
            .map_err(|e| self.layout_err(e.to_string()))?;
        self.pipeline_schedule()?;
        let virt = self.schedule.chunks(m.pp);
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
