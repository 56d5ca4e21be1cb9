//! Contiguous layer-to-stage partitioner: minimises the slowest pipeline stage by dynamic
//! programming (PipeDream, Narayanan et al. 2019), with heterogeneous stage speeds,
//! per-device memory limits, the embedding pinned to the first stage and the head (output
//! projection + softmax over the whole catalogue) to the last, and never an empty stage.
//!
//! Among partitions with the optimal bottleneck it returns the one with the smallest sum
//! of squared stage times (a second DP under the bottleneck bound), so ties break towards
//! balance and the answer is deterministic.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::error::BalanceError;

/// One pipeline stage's device as the partitioner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Relative speed: a stage's time is its layers' profiled time divided by `speed`
    /// (1.0 = the device the profile was taken on).
    pub speed: f64,
    /// Memory available for resident state and stashed activations, bytes.
    pub memory_bytes: u64,
    /// Micro-batches whose activations the stage holds at its peak (GPipe: all `m`;
    /// 1F1B: `pp - stage`; see `meshrec_pipeline::Schedule::peak_in_flight`).
    pub in_flight: u32,
}

/// What to partition and under which constraints.
#[derive(Debug, Clone)]
pub struct PartitionProblem<'a> {
    /// Per-layer costs (embedding, blocks, head).
    pub profile: &'a CostProfile,
    /// One entry per stage, in pipeline order.
    pub stages: Vec<StageSpec>,
    /// Fewest transformer blocks per stage (1 by default: a stage holding only the
    /// embedding or only the head is allowed with 0). Middle stages always get at least
    /// one block, so no stage is ever empty.
    pub min_blocks_per_stage: usize,
    /// Seconds a stage spends per micro-batch sending its output forward and receiving
    /// the gradient back, charged to every stage except the last (0 to ignore).
    pub boundary_s: f64,
}

impl<'a> PartitionProblem<'a> {
    /// `stages` identical stages of speed 1 and unlimited memory.
    pub fn uniform(profile: &'a CostProfile, stages: usize) -> Self {
        Self {
            profile,
            stages: vec![
                StageSpec {
                    speed: 1.0,
                    memory_bytes: u64::MAX,
                    in_flight: 1
                };
                stages
            ],
            min_blocks_per_stage: 1,
            boundary_s: 0.0,
        }
    }
}

/// Stage boundaries over partition layers: stage `j` owns layers `bounds[j]..bounds[j+1]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Partition {
    bounds: Vec<usize>,
}

impl Partition {
    /// From boundaries (`bounds[0] = 0`, strictly increasing, last = number of layers).
    pub fn from_bounds(bounds: Vec<usize>, n_layers: usize) -> Result<Self, BalanceError> {
        if bounds.len() < 2 || bounds[0] != 0 || bounds[bounds.len() - 1] != n_layers {
            return Err(BalanceError::Partition(format!(
                "bounds {bounds:?} must start at 0 and end at {n_layers}"
            )));
        }
        if let Some(w) = bounds.windows(2).position(|w| w[0] >= w[1]) {
            return Err(BalanceError::Partition(format!(
                "stage {w} of bounds {bounds:?} is empty"
            )));
        }
        Ok(Self { bounds })
    }

    /// From transformer-block counts per stage (the form `parallel` takes): the embedding
    /// joins stage 0 and the head the last stage. A zero count is allowed only for the
    /// first or last stage of two or more (it then holds just the embedding or the head).
    pub fn from_blocks_per_stage(blocks: &[usize]) -> Result<Self, BalanceError> {
        let stages = blocks.len();
        if stages == 0 {
            return Err(BalanceError::Partition("no stages".into()));
        }
        for (j, &b) in blocks.iter().enumerate() {
            if b == 0 && (stages == 1 || (j != 0 && j + 1 != stages)) {
                return Err(BalanceError::Partition(format!(
                    "stage {j} of {blocks:?} would be empty"
                )));
            }
        }
        let n_blocks: usize = blocks.iter().sum();
        let mut bounds = Vec::with_capacity(stages + 1);
        bounds.push(0);
        let mut at = 1; // after the embedding
        for (j, &b) in blocks.iter().enumerate() {
            at += b;
            if j + 1 == stages {
                at += 1; // the head
            }
            bounds.push(at);
        }
        Self::from_bounds(bounds, n_blocks + 2)
    }

    /// As even as possible: the first `n_blocks % stages` stages get one block more.
    pub fn uniform(n_blocks: usize, stages: usize) -> Result<Self, BalanceError> {
        if stages == 0 || stages > n_blocks {
            return Err(BalanceError::Partition(format!(
                "cannot split {n_blocks} blocks into {stages} non-empty stages"
            )));
        }
        let blocks: Vec<usize> = (0..stages)
            .map(|j| n_blocks / stages + usize::from(j < n_blocks % stages))
            .collect();
        Self::from_blocks_per_stage(&blocks)
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Number of partition layers covered.
    pub fn n_layers(&self) -> usize {
        self.bounds[self.bounds.len() - 1]
    }

    /// Layers of stage `j`.
    pub fn range(&self, j: usize) -> Range<usize> {
        self.bounds[j]..self.bounds[j + 1]
    }

    /// Boundaries, `stages() + 1` of them.
    pub fn bounds(&self) -> &[usize] {
        &self.bounds
    }

    /// Transformer blocks per stage (embedding and head not counted).
    pub fn blocks_per_stage(&self) -> Vec<usize> {
        let last = self.n_layers() - 1;
        (0..self.stages())
            .map(|j| self.range(j).filter(|&l| l != 0 && l != last).count())
            .collect()
    }

    /// Stage that owns layer `layer`.
    pub fn stage_of(&self, layer: usize) -> Option<usize> {
        (0..self.stages()).find(|&j| self.range(j).contains(&layer))
    }
}

/// A partition with its predicted stage times and memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionPlan {
    /// The partition.
    pub partition: Partition,
    /// Predicted forward + backward seconds per micro-batch of each stage.
    pub stage_s: Vec<f64>,
    /// Predicted peak bytes of each stage.
    pub stage_memory: Vec<u64>,
}

impl PartitionPlan {
    /// The slowest stage's time per micro-batch.
    pub fn bottleneck_s(&self) -> f64 {
        self.stage_s.iter().copied().fold(0.0, f64::max)
    }

    /// `max / mean - 1` of the stage times (0 = perfectly balanced).
    pub fn imbalance(&self) -> f64 {
        imbalance(&self.stage_s)
    }
}

/// `max / mean - 1` of positive times (0 for an empty or all-zero list).
pub fn imbalance(times: &[f64]) -> f64 {
    let n = times.len() as f64;
    let mean = times.iter().sum::<f64>() / n;
    if times.is_empty() || mean <= 0.0 {
        return 0.0;
    }
    times.iter().copied().fold(0.0, f64::max) / mean - 1.0
}

/// Prefix sums for O(1) range costs.
struct Prefix {
    time: Vec<f64>,
    state: Vec<u128>,
    act: Vec<u128>,
}

impl<'a> PartitionProblem<'a> {
    fn validate(&self) -> Result<(), BalanceError> {
        self.profile.validate()?;
        let s = self.stages.len();
        let n_blocks = self.profile.n_blocks();
        if s == 0 {
            return Err(BalanceError::Partition("zero stages requested".into()));
        }
        for (j, st) in self.stages.iter().enumerate() {
            if !(st.speed.is_finite() && st.speed > 0.0) {
                return Err(BalanceError::Partition(format!(
                    "stage {j}: speed {} must be positive and finite",
                    st.speed
                )));
            }
        }
        if !(self.boundary_s.is_finite() && self.boundary_s >= 0.0) {
            return Err(BalanceError::Partition(format!(
                "boundary_s {} is invalid",
                self.boundary_s
            )));
        }
        // Middle stages need a block each; the ends may live on the embedding/head alone
        // only when min_blocks_per_stage is 0.
        let needed = if self.min_blocks_per_stage == 0 {
            s.saturating_sub(2)
        } else {
            s * self.min_blocks_per_stage
        };
        if s == 1 && n_blocks == 0 || needed > n_blocks {
            return Err(BalanceError::Partition(format!(
                "{n_blocks} blocks cannot fill {s} stages with at least {} block(s) each",
                self.min_blocks_per_stage.max(1)
            )));
        }
        Ok(())
    }

    fn prefix(&self) -> Prefix {
        let ls = &self.profile.layers;
        let mut p = Prefix {
            time: vec![0.0; ls.len() + 1],
            state: vec![0; ls.len() + 1],
            act: vec![0; ls.len() + 1],
        };
        for (i, l) in ls.iter().enumerate() {
            p.time[i + 1] = p.time[i] + l.train_s();
            p.state[i + 1] = p.state[i] + u128::from(l.state_bytes);
            p.act[i + 1] = p.act[i] + u128::from(l.act_bytes);
        }
        p
    }

    /// Time and memory of stage `j` holding layers `k..i`, or `None` when the range
    /// violates the block-count rule.
    fn stage_cost(&self, p: &Prefix, j: usize, k: usize, i: usize) -> Option<(f64, u128)> {
        let n = self.profile.len();
        let s = self.stages.len();
        if k >= i {
            return None;
        }
        let blocks = (k..i).filter(|&l| l != 0 && l != n - 1).count();
        let min = if j != 0 && j + 1 != s {
            self.min_blocks_per_stage.max(1)
        } else {
            self.min_blocks_per_stage
        };
        if blocks < min {
            return None;
        }
        let st = &self.stages[j];
        let mut time = (p.time[i] - p.time[k]) / st.speed;
        if j + 1 < s {
            time += self.boundary_s;
        }
        let mut mem = (p.state[i] - p.state[k]) + u128::from(st.in_flight) * (p.act[i] - p.act[k]);
        if j > 0 && i == n {
            mem += u128::from(self.profile.layers[n - 1].tied_copy_state_bytes);
        }
        Some((time, mem))
    }

    fn fits(&self, j: usize, mem: u128) -> bool {
        mem <= u128::from(self.stages[j].memory_bytes)
    }

    /// Predicted stage times and memory of a given partition; errors if the partition
    /// does not match the profile or the stage count, or breaks the block-count rule.
    /// Memory limits are not enforced here (see [`PartitionPlan::stage_memory`]).
    pub fn evaluate(&self, partition: &Partition) -> Result<PartitionPlan, BalanceError> {
        self.validate()?;
        if partition.stages() != self.stages.len() || partition.n_layers() != self.profile.len() {
            return Err(BalanceError::Partition(format!(
                "partition has {} stages over {} layers; problem has {} stages over {} layers",
                partition.stages(),
                partition.n_layers(),
                self.stages.len(),
                self.profile.len()
            )));
        }
        let p = self.prefix();
        let mut stage_s = Vec::with_capacity(partition.stages());
        let mut stage_memory = Vec::with_capacity(partition.stages());
        for j in 0..partition.stages() {
            let r = partition.range(j);
            let (t, m) = self.stage_cost(&p, j, r.start, r.end).ok_or_else(|| {
                BalanceError::Partition(format!(
                    "stage {j} ({r:?}) has fewer than {} block(s)",
                    self.min_blocks_per_stage.max(1)
                ))
            })?;
            stage_s.push(t);
            stage_memory.push(u64::try_from(m).unwrap_or(u64::MAX));
        }
        Ok(PartitionPlan {
            partition: partition.clone(),
            stage_s,
            stage_memory,
        })
    }

    /// The optimal partition (see the module docs).
    pub fn solve(&self) -> Result<PartitionPlan, BalanceError> {
        self.validate()?;
        let n = self.profile.len();
        let s = self.stages.len();
        let p = self.prefix();
        // best[j][i]: min over placements of layers 0..i on stages 0..=j of the slowest stage.
        let inf = f64::INFINITY;
        let mut best = vec![vec![inf; n + 1]; s];
        for i in 1..=n {
            if let Some((t, m)) = self.stage_cost(&p, 0, 0, i) {
                if self.fits(0, m) {
                    best[0][i] = t;
                }
            }
        }
        for j in 1..s {
            for i in (j + 1)..=n {
                let mut b = inf;
                for k in j..i {
                    if best[j - 1][k] >= b {
                        continue;
                    }
                    if let Some((t, m)) = self.stage_cost(&p, j, k, i) {
                        if self.fits(j, m) {
                            b = b.min(best[j - 1][k].max(t));
                        }
                    }
                }
                best[j][i] = b;
            }
        }
        let bottleneck = best[s - 1][n];
        if !bottleneck.is_finite() {
            return Err(self.memory_error(&p));
        }
        // Second pass: least sum of squares with every stage within the optimal bottleneck.
        let bound = bottleneck * (1.0 + 1e-12) + 1e-300;
        let mut sq = vec![vec![inf; n + 1]; s];
        let mut from = vec![vec![usize::MAX; n + 1]; s];
        for i in 1..=n {
            if let Some((t, m)) = self.stage_cost(&p, 0, 0, i) {
                if self.fits(0, m) && t <= bound {
                    sq[0][i] = t * t;
                    from[0][i] = 0;
                }
            }
        }
        for j in 1..s {
            for i in (j + 1)..=n {
                for k in j..i {
                    if !sq[j - 1][k].is_finite() {
                        continue;
                    }
                    if let Some((t, m)) = self.stage_cost(&p, j, k, i) {
                        let v = sq[j - 1][k] + t * t;
                        if self.fits(j, m) && t <= bound && v < sq[j][i] {
                            sq[j][i] = v;
                            from[j][i] = k;
                        }
                    }
                }
            }
        }
        let mut bounds = vec![n];
        let mut i = n;
        for j in (0..s).rev() {
            let k = from[j][i];
            if k == usize::MAX {
                return Err(BalanceError::Partition(
                    "internal: optimal bottleneck not reconstructible".into(),
                ));
            }
            bounds.push(k);
            i = k;
        }
        bounds.reverse();
        let partition = Partition::from_bounds(bounds, n)?;
        self.evaluate(&partition)
    }

    fn memory_error(&self, p: &Prefix) -> BalanceError {
        let n = self.profile.len();
        let total_state = p.state[n];
        let limits: Vec<u64> = self.stages.iter().map(|s| s.memory_bytes).collect();
        let mut detail = format!(
            "resident state {total_state} B plus stashed activations ({} B per micro-batch) over stage limits {limits:?}",
            p.act[n]
        );
        // Name the heaviest single layer if even it alone overflows the largest device.
        let biggest = self
            .profile
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (i, u128::from(l.state_bytes) + u128::from(l.act_bytes)))
            .max_by_key(|x| x.1);
        if let Some((i, b)) = biggest {
            let cap = limits.iter().copied().max().unwrap_or(0);
            if b > u128::from(cap) {
                detail.push_str(&format!(
                    "; layer {i} alone needs {b} B > largest device {cap} B"
                ));
            }
        }
        BalanceError::OutOfMemory {
            layers: n,
            stages: self.stages.len(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::LayerCost;
    use crate::shape::LayerKind;
    use proptest::prelude::*;

    fn profile(times: &[f64], state: &[u64], act: &[u64]) -> CostProfile {
        let n = times.len();
        let layers = (0..n)
            .map(|i| {
                let kind = if i == 0 {
                    LayerKind::Embedding
                } else if i + 1 == n {
                    LayerKind::Head
                } else {
                    LayerKind::Block(i as u32 - 1)
                };
                LayerCost::measured(
                    kind,
                    times[i] / 3.0,
                    times[i] * 2.0 / 3.0,
                    state[i] / 4,
                    state[i],
                    act[i],
                    8,
                )
            })
            .collect();
        CostProfile::measured(1, layers).unwrap()
    }

    /// Every valid partition, by recursion over boundaries.
    fn all_partitions(n: usize, s: usize) -> Vec<Partition> {
        fn rec(at: usize, n: usize, left: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            if left == 0 {
                if at == n {
                    out.push(cur.clone());
                }
                return;
            }
            for next in (at + 1)..=n {
                cur.push(next);
                rec(next, n, left - 1, cur, out);
                cur.pop();
            }
        }
        let mut out = Vec::new();
        rec(0, n, s, &mut vec![0], &mut out);
        out.into_iter()
            .map(|b| Partition::from_bounds(b, n).unwrap())
            .collect()
    }

    fn brute_force(problem: &PartitionProblem<'_>) -> Option<f64> {
        all_partitions(problem.profile.len(), problem.stages.len())
            .iter()
            .filter_map(|p| problem.evaluate(p).ok())
            .filter(|plan| {
                plan.stage_memory
                    .iter()
                    .zip(&problem.stages)
                    .all(|(m, s)| *m <= s.memory_bytes)
            })
            .map(|plan| plan.bottleneck_s())
            .min_by(f64::total_cmp)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn dp_matches_brute_force(
            n_blocks in 1usize..7,
            stages in 1usize..5,
            seed_times in proptest::collection::vec(0.1f64..10.0, 9),
            seed_state in proptest::collection::vec(1u64..100, 9),
            speeds in proptest::collection::vec(0.25f64..4.0, 4),
            mem in proptest::collection::vec(50u64..600, 4),
            min_blocks in 0usize..2,
            boundary in 0.0f64..2.0,
        ) {
            let n = n_blocks + 2;
            let prof = profile(&seed_times[..n], &seed_state[..n], &seed_state[..n]);
            let problem = PartitionProblem {
                profile: &prof,
                stages: (0..stages)
                    .map(|j| StageSpec { speed: speeds[j], memory_bytes: mem[j], in_flight: (stages - j) as u32 })
                    .collect(),
                min_blocks_per_stage: min_blocks,
                boundary_s: boundary,
            };
            let brute = brute_force(&problem);
            match (problem.solve(), brute) {
                (Ok(plan), Some(b)) => {
                    prop_assert!((plan.bottleneck_s() - b).abs() <= 1e-9 * b.max(1.0),
                        "dp {} brute {}", plan.bottleneck_s(), b);
                    // Never an empty stage, and the blocks rule holds.
                    for j in 0..plan.partition.stages() {
                        prop_assert!(!plan.partition.range(j).is_empty());
                    }
                    for (m, s) in plan.stage_memory.iter().zip(&problem.stages) {
                        prop_assert!(*m <= s.memory_bytes);
                    }
                }
                (Err(_), None) => {}
                (dp, bf) => prop_assert!(false, "dp {:?} vs brute {:?}", dp.map(|p| p.bottleneck_s()), bf),
            }
        }
    }

    #[test]
    fn heavy_head_gets_a_stage_of_its_own() {
        // Embedding cheap, 6 unit blocks, a head as heavy as 6 blocks: with 2 stages the
        // head's stage gets no block (min_blocks 0) or the fewest (min_blocks 1).
        let mut times = vec![0.1];
        times.extend([1.0; 6]);
        times.push(6.0);
        let prof = profile(&times, &[1; 8], &[1; 8]);
        let mut pr = PartitionProblem::uniform(&prof, 2);
        pr.min_blocks_per_stage = 0;
        let plan = pr.solve().unwrap();
        assert_eq!(plan.partition.blocks_per_stage(), vec![6, 0]);
        pr.min_blocks_per_stage = 1;
        let plan = pr.solve().unwrap();
        assert_eq!(plan.partition.blocks_per_stage(), vec![5, 1]);
        assert!((plan.bottleneck_s() - 7.0).abs() < 1e-12);
    }

    #[test]
    fn slow_device_gets_fewer_layers() {
        let prof = profile(&[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], &[1; 8], &[1; 8]);
        let mut pr = PartitionProblem::uniform(&prof, 2);
        pr.stages[1].speed = 0.5;
        let plan = pr.solve().unwrap();
        assert_eq!(plan.partition.blocks_per_stage(), vec![4, 2]);
    }

    #[test]
    fn memory_limits_steer_and_then_fail_with_an_error() {
        let prof = profile(&[1.0; 6], &[10, 10, 10, 10, 10, 10], &[1; 6]);
        let mut pr = PartitionProblem::uniform(&prof, 2);
        pr.stages[0].memory_bytes = 25;
        let plan = pr.solve().unwrap();
        assert!(plan.stage_memory[0] <= 25);
        assert_eq!(plan.partition.blocks_per_stage(), vec![1, 3]);
        pr.stages[1].memory_bytes = 25;
        let err = pr.solve().unwrap_err();
        assert!(
            matches!(
                err,
                BalanceError::OutOfMemory {
                    layers: 6,
                    stages: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn too_many_stages_is_an_error_not_an_empty_stage() {
        let prof = profile(&[1.0; 4], &[1; 4], &[1; 4]);
        let err = PartitionProblem::uniform(&prof, 3).solve().unwrap_err();
        assert!(
            err.to_string().contains("2 blocks cannot fill 3 stages"),
            "{err}"
        );
        assert!(Partition::from_blocks_per_stage(&[2, 0, 1]).is_err());
        assert!(Partition::uniform(2, 3).is_err());
    }

    #[test]
    fn blocks_per_stage_round_trips() {
        for blocks in [
            vec![3],
            vec![1, 2],
            vec![0, 3],
            vec![2, 0],
            vec![1, 1, 1, 1],
        ] {
            let p = Partition::from_blocks_per_stage(&blocks).unwrap();
            assert_eq!(p.blocks_per_stage(), blocks);
            assert_eq!(p.n_layers(), blocks.iter().sum::<usize>() + 2);
        }
        assert_eq!(
            Partition::uniform(7, 3).unwrap().blocks_per_stage(),
            vec![3, 2, 2]
        );
    }

    #[test]
    fn tied_embedding_copy_counts_only_off_the_first_stage() {
        let mut prof = profile(&[1.0; 4], &[10; 4], &[0; 4]);
        prof.layers[3].tied_copy_state_bytes = 100;
        let one = PartitionProblem::uniform(&prof, 1).solve().unwrap();
        assert_eq!(one.stage_memory, vec![40]);
        let two = PartitionProblem::uniform(&prof, 2).solve().unwrap();
        assert_eq!(two.stage_memory.iter().sum::<u64>(), 140);
    }
}
