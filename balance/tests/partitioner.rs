//! The stage partitioner against an independent brute force on random small cases (heavy
//! embedding and catalogue-sized head, heterogeneous speeds, memory limits, boundary costs),
//! and the rule that no stage is ever empty, through the public API only.

use meshrec_balance::cost::{CostProfile, LayerCost};
use meshrec_balance::partition::{Partition, PartitionProblem, StageSpec};
use meshrec_balance::shape::LayerKind;
use meshrec_balance::{BalanceError, DeviceSpec, ModelShape};
use proptest::prelude::*;

/// One layer's numbers: forward+backward seconds, resident state bytes, activation bytes.
#[derive(Debug, Clone, Copy)]
struct L {
    time: f64,
    state: u64,
    act: u64,
}

fn profile(layers: &[L], tied_copy: u64) -> CostProfile {
    let n = layers.len();
    let costs = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let kind = match i {
                0 => LayerKind::Embedding,
                i if i + 1 == n => LayerKind::Head,
                i => LayerKind::Block(i as u32 - 1),
            };
            let mut c =
                LayerCost::measured(kind, l.time / 3.0, 2.0 * l.time / 3.0, 0, l.state, l.act, 0);
            if kind == LayerKind::Head {
                c.tied_copy_state_bytes = tied_copy;
            }
            c
        })
        .collect();
    CostProfile::measured(1, costs).unwrap()
}

/// The best bottleneck over every contiguous split, computed here from the raw numbers
/// (not through `PartitionProblem::evaluate`): stage `j` over layers `a..b` takes
/// `Σ time / speed_j` (+ `boundary` unless last) and needs `Σ state + in_flight_j · Σ act`
/// (+ the tied embedding copy when it holds the head and is not stage 0); middle stages need
/// at least `max(1, min_blocks)` blocks, the end stages `min_blocks`.
fn brute_force(
    layers: &[L],
    tied_copy: u64,
    stages: &[StageSpec],
    min_blocks: usize,
    boundary: f64,
) -> Option<(f64, Vec<usize>)> {
    let n = layers.len();
    let s = stages.len();
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut bounds = vec![0usize];
    fn rec(
        at: usize,
        left: usize,
        n: usize,
        bounds: &mut Vec<usize>,
        visit: &mut dyn FnMut(&[usize]),
    ) {
        if left == 0 {
            if at == n {
                visit(bounds);
            }
            return;
        }
        for next in at + 1..=n {
            bounds.push(next);
            rec(next, left - 1, n, bounds, visit);
            bounds.pop();
        }
    }
    let mut visit = |b: &[usize]| {
        let mut worst = 0.0f64;
        for j in 0..s {
            let (lo, hi) = (b[j], b[j + 1]);
            let blocks = (lo..hi).filter(|&l| l != 0 && l != n - 1).count();
            let need = if j == 0 || j + 1 == s {
                min_blocks
            } else {
                min_blocks.max(1)
            };
            if blocks < need {
                return;
            }
            let time: f64 = layers[lo..hi].iter().map(|l| l.time).sum::<f64>() / stages[j].speed
                + if j + 1 < s { boundary } else { 0.0 };
            let mut mem: u128 = layers[lo..hi]
                .iter()
                .map(|l| u128::from(l.state))
                .sum::<u128>()
                + u128::from(stages[j].in_flight)
                    * layers[lo..hi]
                        .iter()
                        .map(|l| u128::from(l.act))
                        .sum::<u128>();
            if j > 0 && hi == n {
                mem += u128::from(tied_copy);
            }
            if mem > u128::from(stages[j].memory_bytes) {
                return;
            }
            worst = worst.max(time);
        }
        if best.as_ref().is_none_or(|(t, _)| worst < *t) {
            best = Some((worst, b.to_vec()));
        }
    };
    rec(0, s, n, &mut bounds, &mut visit);
    best
}

fn layer_strategy() -> impl Strategy<Value = L> {
    (0.05f64..3.0, 1u64..40, 0u64..20).prop_map(|(time, state, act)| L { time, state, act })
}

proptest! {
    // No regression files: a failure prints its shrunk case.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The dynamic program finds the brute-force optimum (or both find nothing), and what
    /// it returns has no empty stage, obeys the block rule and fits every device.
    #[test]
    fn optimal_against_brute_force(
        blocks in proptest::collection::vec(layer_strategy(), 1..7),
        emb_scale in 0.0f64..4.0,
        head_scale in 0.5f64..20.0,
        n_stages in 1usize..6,
        speeds in proptest::collection::vec(0.25f64..4.0, 5),
        mem in proptest::collection::vec(60u64..900, 5),
        in_flight in proptest::collection::vec(1u32..5, 5),
        min_blocks in 0usize..3,
        boundary in 0.0f64..1.5,
        tied_copy in 0u64..60,
    ) {
        // Embedding and head much heavier than a block, as with a large catalogue.
        let mut layers = vec![L { time: emb_scale, state: 30, act: 2 }];
        layers.extend(blocks.iter().copied());
        layers.push(L { time: head_scale, state: 5, act: 4 });
        let prof = profile(&layers, tied_copy);
        let stages: Vec<StageSpec> = (0..n_stages)
            .map(|j| StageSpec { speed: speeds[j], memory_bytes: mem[j], in_flight: in_flight[j] })
            .collect();
        let problem = PartitionProblem {
            profile: &prof,
            stages: stages.clone(),
            min_blocks_per_stage: min_blocks,
            boundary_s: boundary,
        };
        let expect = brute_force(&layers, tied_copy, &stages, min_blocks, boundary);
        match (problem.solve(), expect) {
            (Ok(plan), Some((best, _))) => {
                prop_assert!((plan.bottleneck_s() - best).abs() <= 1e-9 * best.max(1.0),
                    "dp {} vs brute force {best}", plan.bottleneck_s());
                let p = &plan.partition;
                prop_assert_eq!(p.stages(), n_stages);
                prop_assert_eq!(p.n_layers(), layers.len());
                let blocks_per_stage = p.blocks_per_stage();
                for j in 0..n_stages {
                    prop_assert!(!p.range(j).is_empty(), "stage {} empty in {:?}", j, p.bounds());
                    let need = if j == 0 || j + 1 == n_stages { min_blocks } else { min_blocks.max(1) };
                    prop_assert!(blocks_per_stage[j] >= need, "{:?}", blocks_per_stage);
                    prop_assert!(plan.stage_memory[j] <= stages[j].memory_bytes);
                }
                // The embedding opens the first stage and the head closes the last.
                prop_assert_eq!(p.stage_of(0), Some(0));
                prop_assert_eq!(p.stage_of(layers.len() - 1), Some(n_stages - 1));
            }
            (Err(_), None) => {}
            (got, want) => prop_assert!(false, "dp {:?} vs brute force {:?}",
                got.map(|p| p.bottleneck_s()), want),
        }
    }

    /// Uniform and block-count partitions never produce an empty stage: they are errors
    /// instead.
    #[test]
    fn no_constructor_makes_an_empty_stage(
        n_blocks in 0usize..12,
        stages in 0usize..14,
        counts in proptest::collection::vec(0usize..3, 0..8),
    ) {
        match Partition::uniform(n_blocks, stages) {
            Ok(p) => {
                prop_assert!(stages >= 1 && stages <= n_blocks);
                prop_assert!(p.blocks_per_stage().iter().all(|&b| b >= 1));
                let bp = p.blocks_per_stage();
                let (lo, hi) = (bp.iter().min().unwrap(), bp.iter().max().unwrap());
                prop_assert!(hi - lo <= 1);
            }
            Err(_) => prop_assert!(stages == 0 || stages > n_blocks),
        }
        if let Ok(p) = Partition::from_blocks_per_stage(&counts) {
            for j in 0..p.stages() {
                prop_assert!(!p.range(j).is_empty());
            }
            prop_assert_eq!(p.blocks_per_stage(), counts.clone());
        } else {
            // Only an empty list, a lone zero, or a zero strictly inside is refused.
            let inner_zero = counts.len() > 2 && counts[1..counts.len() - 1].contains(&0);
            prop_assert!(counts.is_empty() || counts == [0] || inner_zero, "{:?}", counts);
        }
    }
}

#[test]
fn real_model_profile_gives_the_head_stage_fewer_blocks() {
    // The 1B preset on an A100: the 600k-item head costs dozens of blocks, so with 4
    // stages the last one gets the fewest blocks, and the bottleneck is far below uniform.
    let shape = ModelShape::preset_1b();
    let prof = CostProfile::modelled(&shape, &DeviceSpec::a100_80gb(), 4, 1).unwrap();
    let head = prof.layers.last().unwrap().train_s();
    let block = prof.layers[1].train_s();
    assert!(head > 20.0 * block, "head {head} block {block}");
    let problem = PartitionProblem::uniform(&prof, 4);
    let best = problem.solve().unwrap();
    let blocks = best.partition.blocks_per_stage();
    assert_eq!(blocks.iter().sum::<usize>(), 32);
    assert!(blocks.iter().all(|&b| b >= 1), "{blocks:?}");
    assert_eq!(blocks[3], *blocks.iter().min().unwrap(), "{blocks:?}");
    let uniform = problem
        .evaluate(&Partition::uniform(32, 4).unwrap())
        .unwrap();
    assert!(best.bottleneck_s() < uniform.bottleneck_s());
    // With min_blocks 0 the head may sit alone on the last stage.
    let alone = PartitionProblem {
        min_blocks_per_stage: 0,
        ..PartitionProblem::uniform(&prof, 4)
    }
    .solve()
    .unwrap();
    assert_eq!(alone.partition.blocks_per_stage()[3], 0);
    assert_eq!(alone.partition.range(3), 33..34);
}

#[test]
fn memory_that_cannot_hold_the_model_is_an_out_of_memory_error() {
    let layers = vec![
        L {
            time: 1.0,
            state: 100,
            act: 0
        };
        5
    ];
    let prof = profile(&layers, 0);
    let problem = PartitionProblem {
        profile: &prof,
        stages: vec![
            StageSpec {
                speed: 1.0,
                memory_bytes: 150,
                in_flight: 1
            };
            3
        ],
        min_blocks_per_stage: 1,
        boundary_s: 0.0,
    };
    // 500 bytes over 3 stages of 150: impossible.
    let e = problem.solve().unwrap_err();
    assert!(
        matches!(
            e,
            BalanceError::OutOfMemory {
                layers: 5,
                stages: 3,
                ..
            }
        ),
        "{e}"
    );
}
