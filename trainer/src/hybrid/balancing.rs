//! Online balancing of a mesh from measured step times: the pipeline rebalancer (moves
//! blocks between stages when stage times stay imbalanced) and the speed-proportional DP
//! batch split. Every rank shares its window's times so all make the same decisions.

use meshrec_balance::{
    split_batch, CostProfile, Decision, DeviceSpec, DpBalancer, Partition, Proposal,
    RebalanceConfig, Rebalancer, StageSpec,
};
use meshrec_comm::{Communicator, ReduceOp};
use meshrec_model::ModelConfig;
use meshrec_parallel::layout::Layout;
use meshrec_pipeline::Coord;

use crate::config::{BalanceSection, RunConfig};
use crate::error::RunError;

/// Sums over a balancing window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    steps: u64,
    /// Forward + backward seconds per micro-batch.
    compute_s: f64,
    /// Seconds from the step's start to the end of its pipeline schedule (what a replica
    /// makes the others wait for).
    worker_s: f64,
}

/// The balancers `[balance]` turns on, and what they measured in the current window.
pub struct OnlineBalancer {
    section: BalanceSection,
    micro_batches: usize,
    rebalancer: Option<Rebalancer>,
    dp_balancer: Option<DpBalancer>,
    /// The replicas' speed weights once the DP balancer has them.
    dp_weights: Option<Vec<f64>>,
    window: Window,
}

impl OnlineBalancer {
    pub fn new(
        config: &RunConfig,
        model_config: &ModelConfig,
        layout: &Layout,
    ) -> Result<Self, RunError> {
        let p = &config.parallel;
        let section = config.balance.clone();
        let rebalancer = if section.rebalance {
            // Relative layer costs from the model's shape (the measured stage times correct
            // them); stage state fits: the model is small next to host memory.
            let micro_rows = (config.train.batch_size / p.dp / p.micro_batches).max(1);
            let profile = CostProfile::modelled(
                &model_config.shape(&config.model.preset),
                &DeviceSpec::cpu_default(),
                micro_rows as u64,
                p.tp as u32,
            )?;
            let stages = (0..p.pp)
                .map(|s| StageSpec {
                    speed: 1.0,
                    memory_bytes: u64::MAX / 4,
                    in_flight: (p.pp - s) as u32,
                })
                .collect();
            let cfg = RebalanceConfig {
                imbalance_threshold: section.imbalance_threshold,
                patience: section.patience,
                noise_margin: section.noise_margin,
                micro_batches: p.micro_batches as u32,
                ..RebalanceConfig::default()
            };
            let current = Partition::from_blocks_per_stage(&layout.partition)?;
            Some(Rebalancer::new(cfg, profile, stages, current)?)
        } else {
            None
        };
        let dp_balancer = if section.dp_split {
            Some(
                DpBalancer::new(config.train.batch_size, p.dp, 0.3, 0.05)
                    .and_then(|b| b.with_hysteresis(section.patience, section.noise_margin))?,
            )
        } else {
            None
        };
        Ok(Self {
            section,
            micro_batches: p.micro_batches,
            rebalancer,
            dp_balancer,
            dp_weights: None,
            window: Window::default(),
        })
    }

    /// Rows of a batch of `n` per DP replica of `dp`: speed-proportional once the DP
    /// balancer has weights (every replica keeping at least one row per micro-batch), else
    /// equal. The gradient sum over all rows divided by the global target count is the
    /// same whatever the split, so an uneven split weights each replica by its rows.
    pub fn split_of(&self, n: usize, dp: usize) -> Vec<usize> {
        let equal = || (0..dp).map(|r| meshrec_comm::chunk_len(n, dp, r)).collect();
        match &self.dp_weights {
            Some(w) => match split_batch(n, w) {
                Ok(split) if split.batch.iter().all(|&b| b >= self.micro_batches) => split.batch,
                _ => equal(),
            },
            None => equal(),
        }
    }

    /// Replica `replica`'s rows of a batch of `n` split over `dp` replicas.
    pub fn replica_rows(&self, n: usize, dp: usize, replica: usize) -> std::ops::Range<usize> {
        let split = self.split_of(n, dp);
        let start: usize = split[..replica].iter().sum();
        start..start + split[replica]
    }

    /// Counts a step into the window: its seconds up to the end of the pipeline schedule
    /// and its forward + backward seconds.
    pub fn record(&mut self, worker_s: f64, pipeline_compute_s: f64) {
        self.window.steps += 1;
        self.window.worker_s += worker_s;
        self.window.compute_s += pipeline_compute_s / self.micro_batches as f64;
    }

    /// At the end of each window (collective over `world`): the DP balancer may re-split the
    /// batch, and the pipeline rebalancer may propose a new partition, which the caller
    /// carries out and then [`OnlineBalancer::commit`]s.
    pub fn window_end(
        &mut self,
        step: u64,
        world: &dyn Communicator,
        coord: Coord,
        pp: usize,
        dp: usize,
    ) -> Result<Option<Proposal>, RunError> {
        if self.rebalancer.is_none() && self.dp_balancer.is_none() {
            return Ok(None);
        }
        if !(step + 1).is_multiple_of(self.section.window_steps) {
            return Ok(None);
        }
        let leader = world.rank() == 0;
        let w = std::mem::take(&mut self.window);
        let n = w.steps.max(1) as f64;
        let mut times = vec![0.0f32; pp + dp];
        times[coord.pp] = (w.compute_s / n) as f32;
        times[pp + coord.dp] = (w.worker_s / n) as f32;
        world.all_reduce(&mut times, ReduceOp::Max)?;
        let seconds =
            |t: &[f32]| -> Vec<f64> { t.iter().map(|&x| f64::from(x).max(1e-9)).collect() };
        let (stage_s, worker_s) = (seconds(&times[..pp]), seconds(&times[pp..]));
        if let Some(b) = self.dp_balancer.as_mut() {
            if let Some(split) = b.observe(&worker_s)? {
                if leader {
                    tracing::info!(step, rows = ?split.batch, "DP split follows measured replica speeds");
                }
                self.dp_weights = Some(split.weights);
            }
        }
        let Some(rebalancer) = self.rebalancer.as_mut() else {
            return Ok(None);
        };
        match rebalancer.observe(&stage_s)? {
            Decision::Migrate(proposal) => {
                if leader {
                    tracing::info!(
                        step,
                        to = ?proposal.partition.blocks_per_stage(),
                        stage_ms = ?stage_s.iter().map(|s| (s * 1e4).round() / 10.0).collect::<Vec<_>>(),
                        "rebalancing the pipeline"
                    );
                }
                Ok(Some(proposal))
            }
            decision => {
                if leader {
                    tracing::debug!(step, ?stage_s, ?decision, "pipeline balance kept");
                }
                Ok(None)
            }
        }
    }

    /// The proposal has been carried out.
    pub fn commit(&mut self, proposal: Proposal) -> Result<(), RunError> {
        if let Some(r) = self.rebalancer.as_mut() {
            r.commit(proposal.partition)?;
        }
        Ok(())
    }
}
