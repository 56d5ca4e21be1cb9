//! Adaptive balancing inside training: the online rebalancer moves blocks off a pipeline
//! stage that measures slow (a device three times slower) and the speed-proportional DP split
//! shifts rows off a straggler, both without changing the training result.

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::hybrid;

mod common;

fn config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut all = vec!["model.dropout=0.0", "train.epochs=4"];
    all.extend_from_slice(extra);
    common::synthetic_config(dir, name, &all)
}

/// Trains `layout` as is (`fixed`) and with the online rebalancer acting on its first
/// paying proposal (`moving`); returns the blocks moved.
fn fixed_and_moving(dir: &std::path::Path, layout: &[&str]) -> u64 {
    let device = test_device().autodiff();
    hybrid::train_local(&config(dir, "fixed", layout), &device, "cpu", None).unwrap();
    let mut moving = layout.to_vec();
    moving.extend([
        "balance.rebalance=true",
        "balance.window_steps=2",
        "balance.patience=1",
        // Act on the first paying proposal: these tests are about the move, not hysteresis.
        "balance.noise_margin=0.0",
    ]);
    let summary =
        hybrid::train_local(&config(dir, "moving", &moving), &device, "cpu", None).unwrap();
    let migrations: u64 = common::metrics(dir, "moving", "step")
        .iter()
        .map(|s| s["parallel"]["migrations"].as_u64().unwrap())
        .sum();
    assert!(migrations >= 1, "the rebalancer never moved a block");
    assert_eq!(summary.parallel.unwrap().migrations, migrations);
    migrations
}

fn assert_close(dir: &std::path::Path, a: &str, b: &str, tolerance: f64) {
    let (x, y) = (
        common::series(dir, a, "step", "loss"),
        common::series(dir, b, "step", "loss"),
    );
    assert_eq!(x.len(), y.len());
    for (i, (x, y)) in x.iter().zip(&y).enumerate() {
        assert!(
            ((x - y) / y).abs() < tolerance,
            "step {}: {a} loss {x} vs {b} {y}",
            i + 1
        );
    }
}

#[test]
fn rebalancing_moves_blocks_off_a_slow_stage_without_changing_training() {
    let dir = tempfile::tempdir().unwrap();
    // Stage 1 (world rank 1) runs on a device three times slower: with the even [2, 2]
    // partition it is the bottleneck, and moving a block to stage 0 pays.
    let pipeline = [
        "parallel.pp=2",
        "parallel.micro_batches=2",
        "fault.slow_compute=3.0",
        "fault.slow_compute_rank=1",
    ];
    fixed_and_moving(dir.path(), &pipeline);
    // The first move takes a block off the slow stage 1, and the rebalancer's model of the
    // slowest stage (from measured stage times) gets cheaper by it.
    let steps = common::metrics(dir.path(), "moving", "step");
    let first = steps
        .iter()
        .find_map(|s| s.get("migration"))
        .expect("a step line records the migration");
    let blocks: Vec<u64> = first["blocks_per_stage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert!(
        blocks[1] < blocks[0],
        "blocks moved onto the slow stage: {blocks:?}"
    );
    let (before, after) = (
        first["modelled_bottleneck_before_s"].as_f64().unwrap(),
        first["modelled_bottleneck_after_s"].as_f64().unwrap(),
    );
    assert!(
        after < 0.9 * before,
        "the modelled slowest stage did not get cheaper: {before} s -> {after} s"
    );
    assert_close(dir.path(), "moving", "fixed", 1e-5);
}

#[test]
fn the_dp_split_follows_replica_speed_without_changing_training() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    // World rank 1 (DP replica 1) is a straggler.
    let dp = ["parallel.dp=2", "fault.slow_ms=40", "fault.slow_rank=1"];
    hybrid::train_local(&config(dir.path(), "even", &dp), &device, "cpu", None).unwrap();
    let mut split = dp.to_vec();
    split.extend([
        "balance.dp_split=true",
        "balance.window_steps=2",
        "balance.patience=1",
    ]);
    hybrid::train_local(&config(dir.path(), "split", &split), &device, "cpu", None).unwrap();
    let steps = common::metrics(dir.path(), "split", "step");
    let last = &steps.last().unwrap()["parallel"];
    let (min, max) = (
        last["dp_rows_min"].as_u64().unwrap(),
        last["dp_rows_max"].as_u64().unwrap(),
    );
    assert!(
        min + 1 < max,
        "the straggler kept an equal share: {min} vs {max}"
    );
    let even = common::metrics(dir.path(), "even", "step");
    let even = &even.last().unwrap()["parallel"];
    let (min, max) = (
        even["dp_rows_min"].as_u64().unwrap(),
        even["dp_rows_max"].as_u64().unwrap(),
    );
    assert!(max <= min + 1, "an even split is uneven: {min} vs {max}");
    assert_close(dir.path(), "split", "even", 1e-4);
}

/// Moving blocks between stages carries ZeRO's sharded moments along (gathered over DP,
/// re-sharded for the new partition) and the reduce-scattered buckets follow the new
/// chunks: training is unchanged.
#[test]
fn rebalancing_under_zero_2_keeps_training_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let layout = [
        "parallel.dp=2",
        "parallel.pp=2",
        "parallel.micro_batches=2",
        "dp.zero=2",
        "fault.slow_compute=3.0",
        "fault.slow_compute_rank=1",
        "train.epochs=2",
    ];
    fixed_and_moving(dir.path(), &layout);
    assert_close(dir.path(), "moving", "fixed", 1e-5);
}
