//! Elastic training on the local engine: a lost replica (error, panic, hang, during a
//! checkpoint, after its update) leaves and the survivors continue to the end from memory;
//! a replica joins; below `min_dp` the run stops with a checkpoint. With dropout off, the
//! survivors' loss curve is the uninterrupted run's: the partial step is redone on the
//! re-split global batch, nothing else is lost. Every test is bounded in time.

use std::time::{Duration, Instant};

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::elastic::train_elastic_local;
use meshrec_trainer::metrics::Summary;
use meshrec_trainer::{checkpoint_shard, hybrid};

mod common;

/// Each run here takes a few seconds; a hang would take forever.
const BOUND: Duration = Duration::from_secs(120);

/// `elastic.timeout_s` of these runs: the bound every detection is held to.
const TIMEOUT_S: f64 = 2.0;

fn config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut all = vec![
        "model.dropout=0.0",
        "elastic.enabled=true",
        "elastic.timeout_s=2.0",
        // The tests of this file run side by side on two cores: a step may take far longer
        // than the last one without anything being wrong. Only the hang test tightens it.
        "elastic.hang_factor=50",
        "checkpoint.every_steps=2",
    ];
    all.extend_from_slice(extra);
    common::synthetic_config(dir, name, &all)
}

fn run(cfg: &RunConfig) -> (Result<Summary, String>, Duration) {
    let device = test_device().autodiff();
    let start = Instant::now();
    let r = train_elastic_local(cfg, &device, "cpu", None).map_err(|e| e.to_string());
    let took = start.elapsed();
    assert!(took < BOUND, "took {took:?}");
    (r, took)
}

/// The step losses of a run, by step.
fn losses(dir: &std::path::Path, name: &str) -> Vec<(u64, f64)> {
    common::metrics(dir, name, "step")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The uninterrupted run of the same layout without elastic (dropout off, same seed).
fn reference(dir: &std::path::Path, extra: &[&str]) -> Vec<(u64, f64)> {
    let mut all = vec!["model.dropout=0.0", "checkpoint.every_steps=2"];
    all.extend_from_slice(extra);
    let cfg = common::synthetic_config(dir, "reference", &all);
    hybrid::train_local(&cfg, &test_device().autodiff(), "cpu", None).unwrap();
    losses(dir, "reference")
}

/// Same steps, same losses (to float reassociation: the batch is split differently).
fn assert_same_curve(got: &[(u64, f64)], want: &[(u64, f64)]) {
    assert_eq!(
        got.iter().map(|s| s.0).collect::<Vec<_>>(),
        want.iter().map(|s| s.0).collect::<Vec<_>>(),
        "every step once, none lost or repeated"
    );
    for ((step, a), (_, b)) in got.iter().zip(want) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "step {step}: loss {a} vs uninterrupted {b}"
        );
    }
}

const DP2_PP2: [&str; 3] = ["parallel.dp=2", "parallel.pp=2", "parallel.micro_batches=2"];

#[test]
fn a_replica_lost_mid_step_on_dp2_pp2_leaves_and_the_rest_train_on_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = DP2_PP2.to_vec();
    extra.extend(["fault.crash_step=5", "fault.crash_rank=3"]);
    let (r, _) = run(&config(dir.path(), "loss", &extra));
    let summary = r.unwrap();
    assert_eq!(summary.epochs_run, 3, "trained to the end");
    let events = &summary.membership;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e.kind.as_str(), e.dp_before, e.dp_after, e.step),
        ("loss", 2, 1, 5)
    );
    let coord = meshrec_pipeline::Mesh::new(2, 1, 2).unwrap().coord(3);
    assert!(
        e.causes[0].contains(&format!("world rank 3 ({coord})")) && e.causes[0].contains("crash"),
        "{:?}",
        e.causes
    );
    let detect = e.detect_s.expect("an injected fault's time is known");
    assert!(
        detect <= TIMEOUT_S,
        "detected after {detect} s (timeout {TIMEOUT_S} s)"
    );
    assert!(e.recovery_s.is_some());
    assert_same_curve(
        &losses(dir.path(), "loss"),
        &reference(dir.path(), &DP2_PP2),
    );
}

#[test]
fn a_replica_panicking_on_dp3_tp2_leaves_and_the_rest_train_on() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["parallel.dp=3", "parallel.tp=2", "train.batch_size=18"];
    let mut extra = base.to_vec();
    extra.extend([
        "fault.crash_step=4",
        "fault.crash_rank=2",
        "fault.crash_kind=\"panic\"",
    ]);
    let (r, _) = run(&config(dir.path(), "panic", &extra));
    let summary = r.unwrap();
    assert_eq!(summary.epochs_run, 3);
    let e = &summary.membership[0];
    assert_eq!((e.dp_before, e.dp_after, e.step), (3, 2, 4));
    assert!(
        e.causes[0].contains("world rank 2") && e.causes[0].contains("panicked"),
        "{:?}",
        e.causes
    );
    assert_same_curve(&losses(dir.path(), "panic"), &reference(dir.path(), &base));
}

#[test]
fn a_rank_dying_after_its_update_has_the_step_redone_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = DP2_PP2.to_vec();
    extra.extend([
        "fault.crash_step=6",
        "fault.crash_rank=1",
        "fault.crash_at=\"after_update\"",
    ]);
    let (r, _) = run(&config(dir.path(), "rollback", &extra));
    let summary = r.unwrap();
    let e = &summary.membership[0];
    // Whether the survivors had applied step 6 when the abort reached them is a race (the
    // rule itself is tested in `membership`); either way step 6 is redone once.
    assert_eq!(e.step, 6, "{e:?}");
    assert_same_curve(
        &losses(dir.path(), "rollback"),
        &reference(dir.path(), &DP2_PP2),
    );
}

#[test]
fn a_rank_dying_while_a_checkpoint_is_written_leaves_every_checkpoint_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = DP2_PP2.to_vec();
    extra.extend([
        "fault.crash_step=4",
        "fault.crash_rank=0",
        "fault.crash_at=\"checkpoint\"",
        "checkpoint.keep=10",
    ]);
    let (r, _) = run(&config(dir.path(), "ckpt", &extra));
    let summary = r.unwrap();
    assert_eq!(summary.membership[0].dp_after, 1);
    // The leader itself died: a new one finished the run and its checkpoints.
    let root = dir.path().join("ckpt").join("checkpoints");
    let mut verified = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.join("manifest.json").is_file() {
            checkpoint_shard::load(&path).unwrap();
            verified += 1;
        }
    }
    assert!(verified >= 3, "{verified} checkpoints");
}

#[test]
fn a_hung_rank_is_found_by_its_stalled_progress_and_its_replica_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = run(&config(
        dir.path(),
        "hang",
        &[
            "parallel.dp=2",
            "fault.crash_step=6",
            "fault.crash_rank=1",
            "fault.crash_kind=\"hang\"",
            "elastic.hang_factor=5",
        ],
    ));
    let summary = r.unwrap();
    assert_eq!(summary.epochs_run, 3);
    let e = &summary.membership[0];
    assert!(
        e.causes[0].contains("world rank 1") && e.causes[0].contains("hung"),
        "{:?}",
        e.causes
    );
    let detect = e.detect_s.unwrap();
    assert!(
        detect <= TIMEOUT_S,
        "a hang found after {detect} s (timeout {TIMEOUT_S} s)"
    );
}

#[test]
fn a_replica_joins_at_a_step_boundary_and_takes_its_peers_state() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["parallel.pp=2", "parallel.micro_batches=2"];
    let mut extra = base.to_vec();
    extra.extend(["elastic.max_dp=2", "elastic.join_step=5"]);
    let (r, _) = run(&config(dir.path(), "join", &extra));
    let summary = r.unwrap();
    let e = &summary.membership[0];
    assert_eq!(
        (e.kind.as_str(), e.dp_before, e.dp_after, e.step),
        ("join", 1, 2, 5)
    );
    // Had the newcomer started from anything but its peers' parameters and moments, the
    // averaged gradients would leave the one-replica curve.
    assert_same_curve(&losses(dir.path(), "join"), &reference(dir.path(), &base));
    for row in common::metrics(dir.path(), "join", "step") {
        let (step, p) = (row["step"].as_u64().unwrap(), &row["parallel"]);
        let (min, max) = (
            p["dp_rows_min"].as_u64().unwrap(),
            p["dp_rows_max"].as_u64().unwrap(),
        );
        if step <= 5 {
            assert!(
                min == max && max >= 12,
                "step {step}: one replica holds the batch"
            );
        } else {
            assert!(
                max <= 8 && max - min <= 1,
                "step {step}: the batch re-split over two"
            );
        }
    }
}

#[test]
fn below_min_dp_the_run_stops_with_a_clear_error_and_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = DP2_PP2.to_vec();
    extra.extend([
        "fault.crash_step=5",
        "fault.crash_rank=2",
        "elastic.min_dp=2",
    ]);
    let (r, _) = run(&config(dir.path(), "below", &extra));
    let err = r.unwrap_err();
    assert!(
        err.contains("below elastic.min_dp 2") && err.contains("world rank 2"),
        "{err}"
    );
    assert!(err.contains("step 5"), "{err}");
    let (_, manifest, _) = checkpoint_shard::load(&dir.path().join("below")).unwrap();
    assert_eq!(
        manifest.progress.step, 5,
        "the survivors saved where they stood"
    );
    assert_eq!(manifest.layout.dp, 1);
}
