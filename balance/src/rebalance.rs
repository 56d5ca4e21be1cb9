//! Online balancing: a pipeline rebalancer fed measured stage times every N steps, and the
//! heterogeneous data-parallel batch split.
//!
//! The rebalancer smooths each stage's measured time with an EWMA and attributes the
//! difference between measured and profiled time to the stage's *device* (a speed factor:
//! slower hardware, thermal throttling, a noisy neighbour); the speed estimates are smoothed
//! too and survive migrations, since they belong to devices, not to partitions. A window
//! counts towards a proposal when (1) the imbalance `max/mean - 1` of the smoothed stage
//! times exceeds a threshold, (2) re-partitioning under the estimated speeds shortens the
//! slowest stage by at least `min_gain` (relative, both partitions judged under the same
//! estimates), and (3) the time saved over `horizon_steps` steps exceeds the time to migrate
//! the moved layers' parameters and optimizer state. Only after `patience` such windows in a
//! row, all proposing the same partition, does it propose (hysteresis: a noisy window resets
//! the count). The gain must also beat what measurement noise can fake: each device's
//! window-to-window speed jitter is tracked (an EWMA of squared relative differences of
//! consecutive windows), and the required gain grows by `noise_margin` standard errors of the
//! smoothed speed difference of two stages, so noisy measurements never shuffle layers
//! between partitions that are equally good in truth. After the trainer migrates, it calls
//! [`Rebalancer::commit`], which restarts the stage-time smoothing so the old partition's
//! times never mix with the new one's.

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::BalanceError;
use crate::partition::{imbalance, Partition, PartitionProblem, StageSpec};

fn bad(msg: String) -> BalanceError {
    BalanceError::InvalidMeasurement(msg)
}

/// Tuning of the rebalancer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RebalanceConfig {
    /// Weight of the newest window in the EWMA, in (0, 1].
    pub ewma_alpha: f64,
    /// Imbalance (`max/mean - 1` of smoothed stage times) that counts as imbalanced.
    pub imbalance_threshold: f64,
    /// Consecutive imbalanced windows with a paying proposal required before proposing.
    pub patience: u32,
    /// Least relative reduction of the slowest stage worth proposing.
    pub min_gain: f64,
    /// Steps over which the saved time must repay the migration.
    pub horizon_steps: f64,
    /// Bytes/s at which stage state migrates (the PP link).
    pub migration_bw: f64,
    /// Micro-batches per step (turns per-micro-batch gain into per-step gain).
    pub micro_batches: u32,
    /// Fewest transformer blocks per stage (see [`PartitionProblem::min_blocks_per_stage`]).
    pub min_blocks_per_stage: usize,
    /// Standard errors of measurement noise added to `min_gain` (0: ignore noise). With
    /// `σ` the largest per-device relative speed jitter between windows, the required
    /// relative gain is `min_gain + noise_margin · √2 · σ · √(α / (2 − α))`.
    pub noise_margin: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            ewma_alpha: 0.3,
            imbalance_threshold: 0.1,
            patience: 3,
            min_gain: 0.05,
            horizon_steps: 1000.0,
            migration_bw: 10e9,
            micro_batches: 8,
            min_blocks_per_stage: 1,
            noise_margin: 2.0,
        }
    }
}

impl RebalanceConfig {
    fn validate(&self) -> Result<(), BalanceError> {
        let pos = [
            ("ewma_alpha", self.ewma_alpha),
            ("horizon_steps", self.horizon_steps),
            ("migration_bw", self.migration_bw),
        ];
        for (name, v) in pos {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(format!("{name} = {v} must be positive and finite")));
            }
        }
        if self.ewma_alpha > 1.0 {
            return Err(bad(format!(
                "ewma_alpha = {} must be at most 1",
                self.ewma_alpha
            )));
        }
        for (name, v) in [
            ("imbalance_threshold", self.imbalance_threshold),
            ("min_gain", self.min_gain),
            ("noise_margin", self.noise_margin),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(format!("{name} = {v} must be finite and >= 0")));
            }
        }
        if self.patience == 0 || self.micro_batches == 0 {
            return Err(bad("patience and micro_batches must be at least 1".into()));
        }
        Ok(())
    }
}

/// Per-worker measurement jitter: an EWMA of half the squared relative difference of
/// consecutive raw speed measurements (for independent noise of variance `σ²` that is `σ²`;
/// a level shift counts once instead of for as long as the smoothing takes to follow it).
#[derive(Debug, Clone, Default)]
struct Jitter {
    last: Option<Vec<f64>>,
    var: Option<Vec<f64>>,
}

impl Jitter {
    fn observe(&mut self, raw: &[f64], alpha: f64) {
        if let Some(last) = &self.last {
            let now: Vec<f64> = raw
                .iter()
                .zip(last)
                .map(|(x, l)| {
                    let d = (x - l) / l;
                    0.5 * d * d
                })
                .collect();
            self.var = Some(match self.var.take() {
                None => now,
                Some(v) => v
                    .iter()
                    .zip(&now)
                    .map(|(v, x)| (1.0 - alpha) * v + alpha * x)
                    .collect(),
            });
        }
        self.last = Some(raw.to_vec());
    }

    /// `z · √2 · σ_max · √(α / (2 − α))`: `z` standard errors of the difference of two
    /// EWMA-smoothed speeds (0 before two windows were seen).
    fn margin(&self, alpha: f64, z: f64) -> f64 {
        let max_var = self
            .var
            .as_ref()
            .map_or(0.0, |v| v.iter().copied().fold(0.0, f64::max));
        z * (2.0 * max_var * alpha / (2.0 - alpha)).sqrt()
    }
}

/// A proposed re-partition and why it pays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The new partition.
    pub partition: Partition,
    /// Its predicted per-micro-batch stage times under the estimated speeds.
    pub predicted_stage_s: Vec<f64>,
    /// Slowest stage of the current partition under the estimated speeds.
    pub current_bottleneck_s: f64,
    /// Predicted slowest stage after migration.
    pub predicted_bottleneck_s: f64,
    /// Estimated relative speed of each stage's device.
    pub estimated_speeds: Vec<f64>,
    /// Layers that change stage: `(layer, from_stage, to_stage)`.
    pub moves: Vec<(usize, usize, usize)>,
    /// State bytes (weights, gradients, optimizer) to move.
    pub migration_bytes: u64,
    /// `migration_bytes / migration_bw`.
    pub migration_s: f64,
    /// Seconds saved per step: `(current - predicted) * micro_batches`, both under the
    /// estimated speeds.
    pub gain_per_step_s: f64,
}

/// Why the rebalancer kept the current partition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum KeepReason {
    /// Imbalance is under the threshold.
    Balanced,
    /// Imbalanced with a paying proposal for fewer than `patience` windows in a row.
    Waiting {
        /// Consecutive such windows so far.
        streak: u32,
    },
    /// No partition is better by the required gain (`min_gain` plus the noise margin).
    NoBetterPartition,
    /// Better, but the migration would not pay off within the horizon.
    NotWorthMigrating,
}

/// The outcome of one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// Keep the current partition.
    Keep {
        /// Smoothed imbalance.
        imbalance: f64,
        /// Why.
        reason: KeepReason,
    },
    /// Migrate to this partition (then call [`Rebalancer::commit`]).
    Migrate(Proposal),
}

/// The online pipeline rebalancer.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    cfg: RebalanceConfig,
    profile: CostProfile,
    stages: Vec<StageSpec>,
    current: Partition,
    ewma: Option<Vec<f64>>,
    speeds: Option<Vec<f64>>,
    jitter: Jitter,
    streak: u32,
    /// The partition the current streak proposes.
    target: Option<Partition>,
}

impl Rebalancer {
    /// A rebalancer for `current` over `profile` (per-layer costs at speed 1) with the
    /// stages' memory limits and in-flight counts in `stages` (their `speed` is ignored:
    /// speeds are estimated from measurements).
    pub fn new(
        cfg: RebalanceConfig,
        profile: CostProfile,
        stages: Vec<StageSpec>,
        current: Partition,
    ) -> Result<Self, BalanceError> {
        cfg.validate()?;
        profile.validate()?;
        if stages.len() != current.stages() || current.n_layers() != profile.len() {
            return Err(bad(format!(
                "partition has {} stages over {} layers, but {} stage specs and {} profiled layers",
                current.stages(),
                current.n_layers(),
                stages.len(),
                profile.len()
            )));
        }
        Ok(Self {
            cfg,
            profile,
            stages,
            current,
            ewma: None,
            speeds: None,
            jitter: Jitter::default(),
            streak: 0,
            target: None,
        })
    }

    /// The relative gain a proposal needs now: `min_gain` plus the noise margin.
    pub fn required_gain(&self) -> f64 {
        self.cfg.min_gain
            + self
                .jitter
                .margin(self.cfg.ewma_alpha, self.cfg.noise_margin)
    }

    /// The partition in force.
    pub fn current(&self) -> &Partition {
        &self.current
    }

    /// Smoothed stage times, once a window has been observed.
    pub fn smoothed(&self) -> Option<&[f64]> {
        self.ewma.as_deref()
    }

    /// Feeds one window's measured mean forward+backward compute seconds per micro-batch
    /// of each stage, and decides.
    pub fn observe(&mut self, stage_s: &[f64]) -> Result<Decision, BalanceError> {
        let s = self.current.stages();
        if stage_s.len() != s {
            return Err(bad(format!("{} stage times for {s} stages", stage_s.len())));
        }
        if let Some(j) = stage_s.iter().position(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(bad(format!(
                "stage {j}: time {} must be positive and finite",
                stage_s[j]
            )));
        }
        let a = self.cfg.ewma_alpha;
        let smooth = |prev: Option<Vec<f64>>, now: Vec<f64>| match prev {
            None => now,
            Some(p) => p
                .iter()
                .zip(&now)
                .map(|(p, x)| (1.0 - a) * p + a * x)
                .collect(),
        };
        let ewma = smooth(self.ewma.take(), stage_s.to_vec());
        // Device speeds: profiled time of what each stage holds over what it took. They
        // belong to the devices, so their smoothing survives migrations.
        let now_speeds: Vec<f64> = (0..s)
            .map(|j| {
                let base = self.profile.train_s(self.current.range(j));
                let prev = self.speeds.as_ref().map_or(1.0, |v| v[j]);
                if base > 0.0 {
                    base / stage_s[j]
                } else {
                    prev
                }
            })
            .collect();
        self.jitter.observe(&now_speeds, a);
        let speeds = smooth(self.speeds.take(), now_speeds);
        self.speeds = Some(speeds.clone());
        let imb = imbalance(&ewma);
        self.ewma = Some(ewma);
        if imb <= self.cfg.imbalance_threshold {
            self.streak = 0;
            self.target = None;
            return Ok(Decision::Keep {
                imbalance: imb,
                reason: KeepReason::Balanced,
            });
        }

        let problem = PartitionProblem {
            profile: &self.profile,
            stages: self
                .stages
                .iter()
                .zip(&speeds)
                .map(|(st, &speed)| StageSpec { speed, ..*st })
                .collect(),
            min_blocks_per_stage: self.cfg.min_blocks_per_stage,
            boundary_s: 0.0,
        };
        let plan = problem.solve()?;
        // Compare like with like: the current partition under the same speed estimates.
        let current_b = problem.evaluate(&self.current)?.bottleneck_s();
        let new_b = plan.bottleneck_s();
        if plan.partition == self.current || (current_b - new_b) < self.required_gain() * current_b
        {
            self.streak = 0;
            self.target = None;
            return Ok(Decision::Keep {
                imbalance: imb,
                reason: KeepReason::NoBetterPartition,
            });
        }
        let mut moves = Vec::new();
        let mut bytes: u64 = 0;
        for (l, layer) in self.profile.layers.iter().enumerate() {
            let (from, to) = match (self.current.stage_of(l), plan.partition.stage_of(l)) {
                (Some(f), Some(t)) => (f, t),
                _ => return Err(BalanceError::Partition(format!("layer {l} has no stage"))),
            };
            if from != to {
                moves.push((l, from, to));
                bytes = bytes.saturating_add(layer.state_bytes);
            }
        }
        let migration_s = bytes as f64 / self.cfg.migration_bw;
        let gain_per_step_s = (current_b - new_b) * f64::from(self.cfg.micro_batches);
        if gain_per_step_s * self.cfg.horizon_steps <= migration_s {
            self.streak = 0;
            self.target = None;
            return Ok(Decision::Keep {
                imbalance: imb,
                reason: KeepReason::NotWorthMigrating,
            });
        }
        // Hysteresis: imbalanced *and* a paying proposal of the same partition for
        // `patience` windows in a row.
        if self.target.as_ref() != Some(&plan.partition) {
            self.streak = 0;
            self.target = Some(plan.partition.clone());
        }
        self.streak += 1;
        if self.streak < self.cfg.patience {
            return Ok(Decision::Keep {
                imbalance: imb,
                reason: KeepReason::Waiting {
                    streak: self.streak,
                },
            });
        }
        Ok(Decision::Migrate(Proposal {
            partition: plan.partition,
            predicted_stage_s: plan.stage_s,
            current_bottleneck_s: current_b,
            predicted_bottleneck_s: new_b,
            estimated_speeds: speeds,
            moves,
            migration_bytes: bytes,
            migration_s,
            gain_per_step_s,
        }))
    }

    /// Adopts a partition the trainer has migrated to; smoothing restarts.
    pub fn commit(&mut self, partition: Partition) -> Result<(), BalanceError> {
        if partition.stages() != self.current.stages()
            || partition.n_layers() != self.current.n_layers()
        {
            return Err(bad(format!(
                "committed partition has {} stages over {} layers, expected {} over {}",
                partition.stages(),
                partition.n_layers(),
                self.current.stages(),
                self.current.n_layers()
            )));
        }
        self.current = partition;
        self.ewma = None;
        self.streak = 0;
        self.target = None;
        Ok(())
    }
}

/// Per-worker batch sizes for heterogeneous data parallelism and the matching weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpSplit {
    /// Samples per worker; they sum to the global batch exactly.
    pub batch: Vec<usize>,
    /// `batch[i] / global`: scale worker `i`'s *mean* gradient by this and **sum** over
    /// workers to get the global mean gradient exactly (instead of averaging).
    pub weights: Vec<f64>,
}

impl DpSplit {
    /// Predicted step time (the slowest worker) for worker speeds in samples/s.
    pub fn step_s(&self, speeds: &[f64]) -> f64 {
        self.batch
            .iter()
            .zip(speeds)
            .map(|(&b, &v)| b as f64 / v)
            .fold(0.0, f64::max)
    }
}

/// Splits `global_batch` samples over workers in proportion to their measured `speeds`
/// (samples/s, or any proportional measure) by largest remainders, every worker getting
/// at least one sample. Errors if a speed is not positive or there are more workers than
/// samples.
pub fn split_batch(global_batch: usize, speeds: &[f64]) -> Result<DpSplit, BalanceError> {
    let n = speeds.len();
    if n == 0 {
        return Err(bad("no workers".into()));
    }
    if global_batch < n {
        return Err(bad(format!(
            "global batch {global_batch} is smaller than the {n} workers"
        )));
    }
    if let Some(i) = speeds.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(bad(format!(
            "worker {i}: speed {} must be positive and finite",
            speeds[i]
        )));
    }
    let total: f64 = speeds.iter().sum();
    let quota: Vec<f64> = speeds
        .iter()
        .map(|v| global_batch as f64 * v / total)
        .collect();
    let mut batch: Vec<usize> = quota.iter().map(|q| (q.floor() as usize).max(1)).collect();
    let mut sum: usize = batch.iter().sum();
    // Hand out what is missing by largest remainder, or take back from the workers most
    // above their quota (never below one sample); ties go to the lower index.
    while sum < global_batch {
        let i = (0..n)
            .max_by(|&a, &b| {
                (quota[a] - batch[a] as f64)
                    .total_cmp(&(quota[b] - batch[b] as f64))
                    .then(b.cmp(&a))
            })
            .unwrap_or(0);
        batch[i] += 1;
        sum += 1;
    }
    while sum > global_batch {
        let i = (0..n)
            .filter(|&i| batch[i] > 1)
            .max_by(|&a, &b| {
                (batch[a] as f64 - quota[a])
                    .total_cmp(&(batch[b] as f64 - quota[b]))
                    .then(b.cmp(&a))
            })
            .ok_or_else(|| bad("cannot give every worker a sample".into()))?;
        batch[i] -= 1;
        sum -= 1;
    }
    let weights = batch
        .iter()
        .map(|&b| b as f64 / global_batch as f64)
        .collect();
    Ok(DpSplit { batch, weights })
}

/// Re-splits the DP batch from measured worker step times, with EWMA smoothing and
/// hysteresis so noise does not reshuffle batches: a new split is adopted only after
/// `patience` windows in a row (3 by default) in which it would shorten the step by more
/// than `min_gain` plus `noise_margin` standard errors of the measurement jitter (as in
/// [`RebalanceConfig::noise_margin`]; 2 by default).
#[derive(Debug, Clone)]
pub struct DpBalancer {
    global_batch: usize,
    alpha: f64,
    min_gain: f64,
    patience: u32,
    noise_margin: f64,
    split: DpSplit,
    speeds: Option<Vec<f64>>,
    jitter: Jitter,
    streak: u32,
}

impl DpBalancer {
    /// Starts from an even split over `workers`.
    pub fn new(
        global_batch: usize,
        workers: usize,
        alpha: f64,
        min_gain: f64,
    ) -> Result<Self, BalanceError> {
        let alpha_ok = alpha.is_finite() && alpha > 0.0 && alpha <= 1.0;
        let gain_ok = min_gain.is_finite() && min_gain >= 0.0;
        if !(alpha_ok && gain_ok) {
            return Err(bad(format!(
                "alpha {alpha} must be in (0, 1] and min_gain {min_gain} >= 0"
            )));
        }
        let split = split_batch(global_batch, &vec![1.0; workers])?;
        Ok(Self {
            global_batch,
            alpha,
            min_gain,
            patience: 3,
            noise_margin: 2.0,
            split,
            speeds: None,
            jitter: Jitter::default(),
            streak: 0,
        })
    }

    /// Sets the hysteresis: windows in a row a re-split must pay (at least 1) and the
    /// noise margin in standard errors (0 ignores noise).
    pub fn with_hysteresis(
        mut self,
        patience: u32,
        noise_margin: f64,
    ) -> Result<Self, BalanceError> {
        if patience == 0 || !(noise_margin.is_finite() && noise_margin >= 0.0) {
            return Err(bad(format!(
                "patience {patience} must be >= 1 and noise_margin {noise_margin} >= 0"
            )));
        }
        self.patience = patience;
        self.noise_margin = noise_margin;
        Ok(self)
    }

    /// The split in force.
    pub fn split(&self) -> &DpSplit {
        &self.split
    }

    /// Feeds each worker's measured compute seconds for its current share; returns the new
    /// split once one has paid for `patience` windows in a row (see the type's docs).
    pub fn observe(&mut self, worker_s: &[f64]) -> Result<Option<DpSplit>, BalanceError> {
        let n = self.split.batch.len();
        if worker_s.len() != n {
            return Err(bad(format!(
                "{} worker times for {n} workers",
                worker_s.len()
            )));
        }
        if let Some(i) = worker_s.iter().position(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(bad(format!(
                "worker {i}: time {} must be positive and finite",
                worker_s[i]
            )));
        }
        let now: Vec<f64> = self
            .split
            .batch
            .iter()
            .zip(worker_s)
            .map(|(&b, &t)| b as f64 / t)
            .collect();
        self.jitter.observe(&now, self.alpha);
        let speeds = match self.speeds.take() {
            None => now,
            Some(p) => p
                .iter()
                .zip(&now)
                .map(|(p, x)| (1.0 - self.alpha) * p + self.alpha * x)
                .collect(),
        };
        let candidate = split_batch(self.global_batch, &speeds)?;
        let (old, new) = (self.split.step_s(&speeds), candidate.step_s(&speeds));
        self.speeds = Some(speeds);
        let required = self.min_gain + self.jitter.margin(self.alpha, self.noise_margin);
        if candidate == self.split || old - new <= required * old {
            self.streak = 0;
            return Ok(None);
        }
        self.streak += 1;
        if self.streak < self.patience {
            return Ok(None);
        }
        self.streak = 0;
        self.split = candidate.clone();
        Ok(Some(candidate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::LayerCost;
    use crate::shape::LayerKind;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn profile(times: &[f64]) -> CostProfile {
        let n = times.len();
        let layers = (0..n)
            .map(|i| {
                let kind = match i {
                    0 => LayerKind::Embedding,
                    i if i + 1 == n => LayerKind::Head,
                    i => LayerKind::Block(i as u32 - 1),
                };
                LayerCost::measured(
                    kind,
                    times[i] / 3.0,
                    times[i] * 2.0 / 3.0,
                    1 << 20,
                    1 << 22,
                    1 << 20,
                    1 << 16,
                )
            })
            .collect();
        CostProfile::measured(1, layers).unwrap()
    }

    fn stage_specs(s: usize) -> Vec<StageSpec> {
        vec![
            StageSpec {
                speed: 1.0,
                memory_bytes: u64::MAX,
                in_flight: 1
            };
            s
        ]
    }

    /// True stage times of `part` under `speeds`, with multiplicative noise.
    fn measure(
        prof: &CostProfile,
        part: &Partition,
        speeds: &[f64],
        noise: f64,
        rng: &mut ChaCha8Rng,
    ) -> Vec<f64> {
        (0..part.stages())
            .map(|j| {
                prof.train_s(part.range(j)) / speeds[j] * (1.0 + rng.random_range(-noise..=noise))
            })
            .collect()
    }

    #[test]
    fn converges_to_the_balanced_partition_and_stays_there_under_noise() {
        let mut times = vec![0.2];
        times.extend([1.0; 12]);
        times.push(3.0);
        let prof = profile(&times);
        let speeds = [1.0, 1.0, 0.5, 1.0];
        let cfg = RebalanceConfig::default();
        // The optimum under the true speeds, for comparison.
        let truth = PartitionProblem {
            profile: &prof,
            stages: speeds
                .iter()
                .map(|&speed| StageSpec {
                    speed,
                    memory_bytes: u64::MAX,
                    in_flight: 1,
                })
                .collect(),
            min_blocks_per_stage: 1,
            boundary_s: 0.0,
        };
        let best = truth.solve().unwrap().bottleneck_s();
        for seed in 0..20 {
            let start = Partition::uniform(12, 4).unwrap();
            let mut rb = Rebalancer::new(cfg, prof.clone(), stage_specs(4), start).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut migrations = Vec::new();
            for w in 0..1000 {
                let m = measure(&prof, rb.current(), &speeds, 0.05, &mut rng);
                if let Decision::Migrate(p) = rb.observe(&m).unwrap() {
                    assert!(p.predicted_bottleneck_s < p.current_bottleneck_s);
                    migrations.push(w);
                    rb.commit(p.partition).unwrap();
                }
            }
            let reached = truth.evaluate(rb.current()).unwrap().bottleneck_s();
            assert!(
                reached <= best * (1.0 + cfg.min_gain),
                "seed {seed}: reached {reached}, best {best}"
            );
            assert!(
                !migrations.is_empty() && migrations.len() <= 2,
                "seed {seed}: migrations at {migrations:?}"
            );
            assert!(
                migrations.iter().all(|&w| w < 50),
                "seed {seed}: late migration at {migrations:?}"
            );
        }
    }

    #[test]
    fn balanced_pipeline_under_noise_never_migrates() {
        let prof = profile(&[0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]);
        let part = Partition::from_blocks_per_stage(&[3, 3]).unwrap();
        let mut rb = Rebalancer::new(
            RebalanceConfig::default(),
            prof.clone(),
            stage_specs(2),
            part.clone(),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..2000 {
            // +-15% noise: single windows are often "imbalanced", the smoothed ones are not
            // for long, and no other partition is better anyway.
            let m = measure(&prof, &part, &[1.0, 1.0], 0.15, &mut rng);
            assert!(!matches!(rb.observe(&m).unwrap(), Decision::Migrate(_)));
        }
    }

    #[test]
    fn a_single_spike_does_not_trigger_but_a_persistent_one_does() {
        let prof = profile(&[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        let part = Partition::from_blocks_per_stage(&[2, 2]).unwrap();
        // Unsmoothed, noise-free windows: the jitter margin (which would read the spike as
        // noise) is off, so this checks the patience logic alone.
        let cfg = RebalanceConfig {
            ewma_alpha: 1.0,
            patience: 3,
            noise_margin: 0.0,
            ..RebalanceConfig::default()
        };
        let mut rb = Rebalancer::new(cfg, prof, stage_specs(2), part).unwrap();
        assert!(matches!(
            rb.observe(&[2.0, 2.0]).unwrap(),
            Decision::Keep {
                reason: KeepReason::Balanced,
                ..
            }
        ));
        assert!(matches!(
            rb.observe(&[6.0, 2.0]).unwrap(),
            Decision::Keep {
                reason: KeepReason::Waiting { streak: 1 },
                ..
            }
        ));
        assert!(matches!(
            rb.observe(&[2.0, 2.0]).unwrap(),
            Decision::Keep {
                reason: KeepReason::Balanced,
                ..
            }
        ));
        rb.observe(&[6.0, 2.0]).unwrap();
        rb.observe(&[6.0, 2.0]).unwrap();
        match rb.observe(&[6.0, 2.0]).unwrap() {
            Decision::Migrate(p) => {
                assert_eq!(p.partition.blocks_per_stage(), vec![1, 3]);
                assert_eq!(p.moves, vec![(2, 0, 1)]);
            }
            d => panic!("expected a migration, got {d:?}"),
        }
    }

    #[test]
    fn migration_that_cannot_pay_off_is_refused() {
        let prof = profile(&[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        let part = Partition::from_blocks_per_stage(&[2, 2]).unwrap();
        let cfg = RebalanceConfig {
            ewma_alpha: 1.0,
            patience: 1,
            horizon_steps: 1.0,
            migration_bw: 1.0,
            ..Default::default()
        };
        let mut rb = Rebalancer::new(cfg, prof, stage_specs(2), part).unwrap();
        assert!(matches!(
            rb.observe(&[6.0, 2.0]).unwrap(),
            Decision::Keep {
                reason: KeepReason::NotWorthMigrating,
                ..
            }
        ));
    }

    #[test]
    fn bad_measurements_are_errors() {
        let prof = profile(&[0.0, 1.0, 1.0, 0.0]);
        let part = Partition::from_blocks_per_stage(&[1, 1]).unwrap();
        let mut rb =
            Rebalancer::new(RebalanceConfig::default(), prof, stage_specs(2), part).unwrap();
        assert!(rb
            .observe(&[1.0])
            .unwrap_err()
            .to_string()
            .contains("1 stage times for 2 stages"));
        assert!(rb
            .observe(&[1.0, f64::NAN])
            .unwrap_err()
            .to_string()
            .contains("stage 1"));
        assert!(split_batch(3, &[1.0; 4]).is_err());
        assert!(split_batch(8, &[1.0, 0.0])
            .unwrap_err()
            .to_string()
            .contains("worker 1"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn dp_split_sums_exactly_and_is_proportional(
            global in 1usize..4096,
            speeds in proptest::collection::vec(0.1f64..10.0, 1..9),
        ) {
            prop_assume!(global >= speeds.len());
            let split = split_batch(global, &speeds).unwrap();
            prop_assert_eq!(split.batch.iter().sum::<usize>(), global);
            let total: f64 = speeds.iter().sum();
            for (b, v) in split.batch.iter().zip(&speeds) {
                let q = global as f64 * v / total;
                prop_assert!(*b >= 1);
                // Largest remainder stays within one sample of the quota unless the
                // one-sample floor pushed others down.
                prop_assert!((*b as f64 - q).abs() < 1.0 + speeds.len() as f64, "b {} q {}", b, q);
            }
            prop_assert!((split.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }

        #[test]
        fn weighted_mean_gradients_equal_the_global_mean(
            speeds in proptest::collection::vec(0.5f64..4.0, 2..6),
            seed in 0u64..1000,
        ) {
            let global = 64;
            let split = split_batch(global, &speeds).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let per_sample: Vec<f64> = (0..global).map(|_| rng.random_range(-1.0..1.0)).collect();
            let global_mean = per_sample.iter().sum::<f64>() / global as f64;
            let mut at = 0;
            let mut combined = 0.0;
            for (b, w) in split.batch.iter().zip(&split.weights) {
                let local_mean = per_sample[at..at + b].iter().sum::<f64>() / *b as f64;
                combined += w * local_mean;
                at += b;
            }
            prop_assert!((combined - global_mean).abs() < 1e-12);
        }
    }

    #[test]
    fn dp_balancer_moves_work_to_the_fast_worker_once() {
        let mut bal = DpBalancer::new(96, 3, 0.5, 0.05).unwrap();
        let true_speed = [1.0, 1.0, 2.0]; // samples per second
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut changes = 0;
        for _ in 0..200 {
            let t: Vec<f64> = bal
                .split()
                .batch
                .iter()
                .zip(true_speed)
                .map(|(&b, v)| b as f64 / v * (1.0 + rng.random_range(-0.03..0.03)))
                .collect();
            if bal.observe(&t).unwrap().is_some() {
                changes += 1;
            }
        }
        assert_eq!(bal.split().batch, vec![24, 24, 48]);
        assert!(changes <= 2, "{changes} re-splits");
    }
}
