//! Hybrid runs on the local engine: the same data order and, with dropout off, the same
//! loss curve and metrics as one device, whatever the layout; invalid layouts are refused
//! with the key at fault.

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::{hybrid, train};

mod common;

/// Dropout off (so layouts can match one device exactly), two epochs, then `layout`.
fn config(dir: &std::path::Path, name: &str, layout: &[&str]) -> RunConfig {
    let mut extra = vec!["model.dropout=0.0", "train.epochs=2"];
    extra.extend_from_slice(layout);
    common::synthetic_config(dir, name, &extra)
}

fn losses(dir: &std::path::Path, name: &str) -> Vec<f64> {
    common::series(dir, name, "epoch", "loss")
}

#[test]
fn hybrid_layouts_train_like_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let single = train::train(&config(dir.path(), "single", &[]), &device, "cpu", None).unwrap();
    let want = losses(dir.path(), "single");
    for (name, layout) in [
        (
            "dp2tp2pp2",
            &[
                "parallel.dp=2",
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
                "output.timeline_steps=2",
            ][..],
        ),
        (
            "tp2pp2v",
            &[
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
                "parallel.schedule=interleaved",
                "parallel.virtual_stages=2",
            ][..],
        ),
    ] {
        let summary =
            hybrid::train_local(&config(dir.path(), name, layout), &device, "cpu", None).unwrap();
        let got = losses(dir.path(), name);
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                ((g - w) / w).abs() < 1e-3,
                "{name}: epoch loss {g} vs one device {w}"
            );
        }
        // Every epoch reports the mesh's measurements.
        for line in common::metrics(dir.path(), name, "epoch") {
            let p = &line["parallel"];
            let bubble = p["bubble"].as_f64().unwrap();
            let (umean, umin) = (
                p["utilization_mean"].as_f64().unwrap(),
                p["utilization_min"].as_f64().unwrap(),
            );
            assert!((0.0..1.0).contains(&bubble), "{name}: bubble {bubble}");
            assert!(
                0.0 < umin && umin <= umean && umean <= 1.0,
                "{name}: utilization {umin} {umean}"
            );
            assert!(
                p["comm_bytes_tp"].as_u64().unwrap() > 0,
                "{name}: no TP traffic"
            );
            assert!(
                p["comm_bytes_pp"].as_u64().unwrap() > 0,
                "{name}: no PP traffic"
            );
            assert_eq!(
                p["comm_bytes_dp"].as_u64().unwrap() > 0,
                name.starts_with("dp2"),
                "{name}: DP traffic"
            );
        }
        if name == "dp2tp2pp2" {
            // The timeline of steps 2 and 3: every rank's forwards and backwards, drawn.
            let run = dir.path().join(name);
            let svg = std::fs::read_to_string(run.join("timeline.svg")).unwrap();
            assert!(
                svg.contains("<svg") && svg.contains("r7 dp1 tp1 pp1"),
                "rank rows missing"
            );
            let steps: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("timeline.json")).unwrap())
                    .unwrap();
            let steps = steps.as_array().unwrap();
            assert_eq!(steps.len(), 2);
            for stages in steps {
                assert_eq!(stages.as_array().unwrap().len(), 8);
                for stage in stages.as_array().unwrap() {
                    let kinds: Vec<&str> = stage["events"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["kind"].as_str().unwrap())
                        .collect();
                    assert_eq!(
                        kinds.iter().filter(|k| **k == "forward").count(),
                        2,
                        "one forward per micro-batch"
                    );
                    assert_eq!(kinds.iter().filter(|k| **k == "backward").count(), 2);
                }
            }
        }
        let (g, w) = (summary.test["ndcg@10"], single.test["ndcg@10"]);
        assert!((g - w).abs() < 0.02, "{name}: test NDCG@10 {g} vs {w}");
    }
}

#[test]
fn impossible_layouts_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let overrides: Vec<String> = [
        "parallel.schedule=interleaved",
        "parallel.pp=2",
        "parallel.micro_batches=3",
        "parallel.virtual_stages=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = RunConfig::from_toml("", "test", &overrides)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parallel.schedule") && err.contains("multiple of pp"),
        "{err}"
    );
    let cfg = config(dir.path(), "x", &["parallel.tp=3"]);
    let err = hybrid::train_local(&cfg, &test_device().autodiff(), "cpu", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_heads"), "{err}");
}

#[test]
fn local_sgd_trains_and_moves_fewer_dp_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let dp_bytes = |name: &str| -> Vec<u64> {
        common::metrics(dir.path(), name, "epoch")
            .iter()
            .map(|l| l["parallel"]["comm_bytes_dp"].as_u64().unwrap())
            .collect()
    };
    let mesh = [
        "parallel.dp=2",
        "parallel.pp=2",
        "parallel.micro_batches=2",
        "train.epochs=3",
    ];
    hybrid::train_local(&config(dir.path(), "sync", &mesh), &device, "cpu", None).unwrap();
    let mut local: Vec<&str> = mesh.to_vec();
    local.extend(["dp.mode=local_sgd", "dp.sync_every=4"]);
    let summary =
        hybrid::train_local(&config(dir.path(), "local", &local), &device, "cpu", None).unwrap();
    let losses = losses(dir.path(), "local");
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "local SGD loss does not fall: {losses:?}"
    );
    let untrained = common::untrained_test_ndcg(&config(dir.path(), "local", &local));
    let trained = summary.test["ndcg@10"];
    eprintln!("local SGD: test NDCG@10 {trained:.4}, untrained {untrained:.4}");
    assert!(
        trained > 1.25 * untrained,
        "local SGD ranks no better than an untrained model: {trained} vs {untrained}"
    );
    let (sync, local) = (dp_bytes("sync"), dp_bytes("local"));
    for (s, l) in sync.iter().zip(&local) {
        assert!(l < s, "local SGD sent {l} DP bytes per step, sync {s}");
    }
}
