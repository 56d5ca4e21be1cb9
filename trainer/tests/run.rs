//! End-to-end single-device runs on synthetic data: files written, checkpoint reloads to the
//! same metrics, seeded runs are deterministic.

use meshrec_model::data::{EvalSet, EvalSplit};
use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::model_io::{evaluate, load_checkpoint, save_checkpoint};
use meshrec_trainer::setup::{build_model, load_dataset};
use meshrec_trainer::train;

mod common;

fn config(dir: &std::path::Path, name: &str) -> RunConfig {
    common::synthetic_config(dir, name, &[])
}

#[test]
fn a_run_writes_its_files_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let a = train::train(&config(dir.path(), "a"), &device, "cpu", None).unwrap();
    let b = train::train(&config(dir.path(), "b"), &device, "cpu", None).unwrap();
    assert_eq!(a.test, b.test);
    assert_eq!(a.epochs_run, 3);
    for key in ["hr@5", "ndcg@10", "mrr@20"] {
        assert!(
            a.test.contains_key(key) && a.valid.contains_key(key),
            "{key}"
        );
    }
    let run_dir = dir.path().join("a");
    let epochs = common::metrics(dir.path(), "a", "epoch");
    assert_eq!(epochs.len(), 3);
    assert!(epochs[0]["samples_per_s"].as_f64().unwrap() > 0.0);
    // A line per step too, numbered from 1, and a checkpoint per epoch (the newest two kept).
    let steps = common::metrics(dir.path(), "a", "step");
    assert_eq!(steps.last().unwrap()["step"], epochs[2]["step"]);
    assert!(steps
        .iter()
        .enumerate()
        .all(|(i, s)| s["step"] == i as u64 + 1));
    let kept: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        summary["test"]["ndcg@10"].as_f64(),
        a.test.get("ndcg@10").copied()
    );

    // The checkpoint reloads into a fresh model and gives the reported test metrics.
    let cfg = config(dir.path(), "a");
    let dataset = load_dataset(&cfg).unwrap();
    let (mc, mut model) = build_model(&cfg, &dataset, &device).unwrap();
    load_checkpoint(&mut model, &a.checkpoint).unwrap();
    let test = EvalSet::new(&dataset, mc.max_len, EvalSplit::Test);
    assert_eq!(evaluate(&model, &test, 64, &device).report(), a.test);
}

#[test]
fn bad_checkpoints_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let cfg = config(dir.path(), "c");
    let dataset = load_dataset(&cfg).unwrap();
    let (mc, mut model) = build_model(&cfg, &dataset, &device).unwrap();
    let missing = load_checkpoint(&mut model, &dir.path().join("none.safetensors")).unwrap_err();
    assert!(missing.to_string().contains("none.safetensors"));
    let path = dir.path().join("bad.safetensors");
    let meta = meshrec_model::checkpoint::CheckpointMeta::new("tiny", &mc, &dataset);
    save_checkpoint(&model, &path, &meta, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_checkpoint(&mut model, &path).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
}

/// `train.residency = "device"` (loss and AdamW as tensor ops; what a GPU backend gets by
/// default) follows the host path's loss curve step for step, and its steps copy only the
/// batch and two scalars between host and device, far less than the host path's.
#[test]
fn a_device_resident_run_follows_the_host_run() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let run = |name: &str, residency: &str| {
        let placed = format!("train.residency=\"{residency}\"");
        let cfg = common::synthetic_config(dir.path(), name, &["model.dropout=0.0", &placed]);
        train::train(&cfg, &device, "cpu", None).unwrap()
    };
    let host = run("host", "host");
    let resident = run("device", "device");
    let losses = |name| common::series(dir.path(), name, "step", "loss");
    let (a, b) = (losses("host"), losses("device"));
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 1e-3 * x.abs(),
            "step {}: {x} vs {y}",
            step + 1
        );
    }
    assert!((host.test["ndcg@10"] - resident.test["ndcg@10"]).abs() < 0.02);
    let moved = |name| common::series(dir.path(), name, "step", "host_transfer_bytes");
    let (host_bytes, device_bytes) = (moved("host"), moved("device"));
    // A batch of 16 sequences of 8 (tiny preset): ids, loss rows and targets are a few KB.
    let most = device_bytes.iter().copied().fold(0.0, f64::max);
    assert!(
        most > 0.0 && most < 8_192.0,
        "device-resident step moved {most} bytes"
    );
    let least_host = host_bytes.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        least_host > 10.0 * most,
        "host path {least_host} vs device {most}"
    );

    let err = RunConfig::from_toml("", "test", &["train.residency=\"gpu\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.residency") && err.contains("`gpu`"),
        "{err}"
    );
}
