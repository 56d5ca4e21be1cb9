//! The online rebalancer over a long run with measurement noise: quiet while the pipeline
//! is balanced, one migration (rarely two) soon after a device slows down, converging to
//! within `min_gain` of the optimum for the true speeds, no oscillation afterwards, and the
//! same when the device recovers; the heterogeneous DP split likewise.

use meshrec_balance::cost::{CostProfile, LayerCost};
use meshrec_balance::partition::{Partition, PartitionProblem, StageSpec};
use meshrec_balance::rebalance::{Decision, DpBalancer, RebalanceConfig, Rebalancer};
use meshrec_balance::shape::LayerKind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Embedding 0.3, 16 unit blocks, a head as heavy as 6 blocks (a large catalogue).
fn profile() -> CostProfile {
    let mut times = vec![0.3];
    times.extend([1.0; 16]);
    times.push(6.0);
    let n = times.len();
    let layers = times
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let kind = match i {
                0 => LayerKind::Embedding,
                i if i + 1 == n => LayerKind::Head,
                i => LayerKind::Block(i as u32 - 1),
            };
            LayerCost::measured(
                kind,
                t / 3.0,
                2.0 * t / 3.0,
                1 << 20,
                1 << 22,
                1 << 20,
                1 << 16,
            )
        })
        .collect();
    CostProfile::measured(4, layers).unwrap()
}

fn specs(speeds: &[f64]) -> Vec<StageSpec> {
    speeds
        .iter()
        .map(|&speed| StageSpec {
            speed,
            memory_bytes: u64::MAX,
            in_flight: 1,
        })
        .collect()
}

fn optimum(prof: &CostProfile, speeds: &[f64]) -> (Partition, f64) {
    let plan = PartitionProblem {
        stages: specs(speeds),
        ..PartitionProblem::uniform(prof, speeds.len())
    }
    .solve()
    .unwrap();
    let b = plan.bottleneck_s();
    (plan.partition, b)
}

fn true_bottleneck(prof: &CostProfile, part: &Partition, speeds: &[f64]) -> f64 {
    PartitionProblem {
        stages: specs(speeds),
        ..PartitionProblem::uniform(prof, speeds.len())
    }
    .evaluate(part)
    .unwrap()
    .bottleneck_s()
}

/// Runs `windows` windows at `speeds`, each stage's measurement carrying uniform
/// multiplicative noise of ±`noise`; returns the windows (relative) at which it migrated
/// and every partition it adopted.
fn run(
    rb: &mut Rebalancer,
    prof: &CostProfile,
    speeds: &[f64],
    windows: usize,
    noise: f64,
    rng: &mut ChaCha8Rng,
) -> (Vec<usize>, Vec<Partition>) {
    let mut at = Vec::new();
    let mut adopted = Vec::new();
    for w in 0..windows {
        let part = rb.current().clone();
        let measured: Vec<f64> = (0..part.stages())
            .map(|j| {
                let jitter = if noise > 0.0 {
                    rng.random_range(-noise..=noise)
                } else {
                    0.0
                };
                prof.train_s(part.range(j)) / speeds[j] * (1.0 + jitter)
            })
            .collect();
        if let Decision::Migrate(p) = rb.observe(&measured).unwrap() {
            assert!(p.predicted_bottleneck_s < p.current_bottleneck_s);
            assert!(!p.moves.is_empty() && p.migration_bytes > 0);
            at.push(w);
            adopted.push(p.partition.clone());
            rb.commit(p.partition).unwrap();
        }
    }
    (at, adopted)
}

#[test]
fn converges_after_a_slowdown_and_a_recovery_and_never_oscillates() {
    let prof = profile();
    let cfg = RebalanceConfig::default();
    let even = [1.0; 4];
    let slow = [1.0, 1.0, 0.6, 1.0];
    let (start, _) = optimum(&prof, &even);
    let (_, best_slow) = optimum(&prof, &slow);
    let (_, best_even) = optimum(&prof, &even);
    for noise in [0.0, 0.05, 0.1] {
        for seed in 0..8 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut rb = Rebalancer::new(cfg, prof.clone(), specs(&even), start.clone()).unwrap();
            let ctx = format!("noise {noise} seed {seed}");

            // Balanced: nothing to do, however noisy single windows look.
            let (at, _) = run(&mut rb, &prof, &even, 300, noise, &mut rng);
            assert!(at.is_empty(), "{ctx}: migrated while balanced at {at:?}");
            assert_eq!(rb.current(), &start);

            // Stage 2's device slows to 60%: it migrates soon, once (rarely twice as the
            // speed estimate settles), and reaches the optimum for the true speeds.
            let (at, adopted) = run(&mut rb, &prof, &slow, 600, noise, &mut rng);
            assert!(
                !at.is_empty() && at.len() <= 2,
                "{ctx}: migrations at {at:?}"
            );
            // Detection takes longer the noisier the windows (the noise margin); without
            // noise it is one migration straight to the optimum.
            assert!(
                at[0] >= cfg.patience as usize - 1 && at[0] < 80,
                "{ctx}: first migration at {at:?}"
            );
            assert!(at.iter().all(|&w| w < 100), "{ctx}: late migration {at:?}");
            if noise == 0.0 {
                assert_eq!(at.len(), 1, "{ctx}: {at:?}");
            }
            let reached = true_bottleneck(&prof, rb.current(), &slow);
            assert!(
                reached <= best_slow * (1.0 + cfg.min_gain),
                "{ctx}: {reached} vs optimum {best_slow}"
            );
            // No A -> B -> A.
            assert!(!adopted.contains(&start), "{ctx}: went back to the start");

            // The device recovers: at most two migrations, early, and balanced again.
            let before = rb.current().clone();
            let (at, adopted) = run(&mut rb, &prof, &even, 600, noise, &mut rng);
            assert!(at.len() <= 2, "{ctx}: migrations after recovery at {at:?}");
            assert!(at.iter().all(|&w| w < 100), "{ctx}: late migration {at:?}");
            assert!(!adopted.contains(&before), "{ctx}: oscillated back");
            let reached = true_bottleneck(&prof, rb.current(), &even);
            assert!(
                reached <= best_even * (1.0 + cfg.min_gain) * (1.0 + noise),
                "{ctx}: {reached} vs optimum {best_even}"
            );
        }
    }
}

#[test]
fn heavy_noise_on_a_balanced_pipeline_never_migrates() {
    // ±25% per window: single windows are often 25% "imbalanced"; the smoothed times and
    // `patience` keep it from moving layers that are already placed optimally.
    let prof = profile();
    let even = [1.0; 4];
    let (start, _) = optimum(&prof, &even);
    for seed in 0..10 {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        let mut rb = Rebalancer::new(
            RebalanceConfig::default(),
            prof.clone(),
            specs(&even),
            start.clone(),
        )
        .unwrap();
        let (at, _) = run(&mut rb, &prof, &even, 2000, 0.25, &mut rng);
        assert!(at.is_empty(), "seed {seed}: migrated at {at:?}");
    }
}

#[test]
fn without_hysteresis_noise_would_move_layers() {
    // The same noise with patience 1, no smoothing and no minimum gain does migrate: the
    // previous test's quiet is the hysteresis at work, not a lack of opportunity.
    let prof = profile();
    let even = [1.0; 4];
    let (start, _) = optimum(&prof, &even);
    let cfg = RebalanceConfig {
        ewma_alpha: 1.0,
        patience: 1,
        min_gain: 0.0,
        imbalance_threshold: 0.0,
        noise_margin: 0.0,
        ..RebalanceConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut rb = Rebalancer::new(cfg, prof.clone(), specs(&even), start).unwrap();
    let (at, _) = run(&mut rb, &prof, &even, 200, 0.25, &mut rng);
    assert!(at.len() > 5, "only {} migrations", at.len());
}

#[test]
fn dp_split_follows_a_slow_worker_once_and_then_holds_under_noise() {
    let mut bal = DpBalancer::new(256, 4, 0.3, 0.05).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut speeds = [2.0, 2.0, 2.0, 2.0];
    let mut changes = Vec::new();
    let mut slow_share = Vec::new();
    for w in 0..600 {
        if w == 200 {
            speeds[3] = 1.0; // worker 3 halves its speed
        }
        let t: Vec<f64> = bal
            .split()
            .batch
            .iter()
            .zip(speeds)
            .map(|(&b, v)| b as f64 / v * (1.0 + rng.random_range(-0.08..0.08)))
            .collect();
        if let Some(split) = bal.observe(&t).unwrap() {
            changes.push(w);
            slow_share.push(split.batch[3]);
        }
    }
    // Nothing while the workers are equal; after the slowdown a few re-splits while the
    // smoothed speed follows (each moving work off the slow worker: a monotone staircase,
    // never back), then nothing for the remaining 300+ windows of noise.
    assert!(
        changes.iter().all(|&w| w >= 200),
        "re-split while even: {changes:?}"
    );
    assert!(!changes.is_empty() && changes.len() <= 4, "{changes:?}");
    assert!(
        changes.iter().all(|&w| w < 240),
        "late re-split {changes:?}"
    );
    assert!(
        slow_share.windows(2).all(|w| w[1] < w[0]),
        "not monotone: {slow_share:?}"
    );
    let b = &bal.split().batch;
    assert_eq!(b.iter().sum::<usize>(), 256);
    // Proportional to 2:2:2:1 within the hysteresis band.
    let ideal = 256.0 / 7.0;
    assert!((b[3] as f64 - ideal).abs() <= 0.15 * ideal, "{b:?}");
    for &x in &b[..3] {
        assert!(
            (x as f64 - 2.0 * ideal).abs() <= 0.15 * 2.0 * ideal,
            "{b:?}"
        );
    }
    let w = &bal.split().weights;
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}
