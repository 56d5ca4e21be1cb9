//! `[features]` end to end on synthetic data: a graph-fused run on one device, under data
//! parallelism and in a pipeline (same losses), its cold-item test metrics, and the refusals
//! that name their key.

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::train;

mod common;

const GRAPH: [&str; 3] = [
    "features.graph=true",
    "features.graph_relations=[]",
    "model.dropout=0.0",
];

fn err(overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml("", "test", &o)
        .unwrap_err()
        .to_string()
}

#[test]
fn a_graph_fused_run_trains_and_reports_cold_items() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let fused = train::train(
        &common::synthetic_config(dir.path(), "fused", &GRAPH),
        &device,
        "cpu",
        None,
    )
    .unwrap();
    let plain = train::train(
        &common::synthetic_config(dir.path(), "plain", &["model.dropout=0.0"]),
        &device,
        "cpu",
        None,
    )
    .unwrap();
    assert!(
        fused.params > plain.params,
        "the graph's user nodes are parameters"
    );
    assert_ne!(fused.test, plain.test);
    assert!(fused.test_cold_users > 0 && fused.test_cold.contains_key("ndcg@10"));
    // The same run under dp 2 and under a dp 2 · pp 2 pipeline (the last stage recomputes
    // the fused table) on the mesh executor: the same loss curve.
    let a = common::series(dir.path(), "fused", "step", "loss");
    for (name, layout) in [
        ("dp", &["parallel.dp=2"][..]),
        (
            "dp-pp",
            &["parallel.dp=2", "parallel.pp=2", "parallel.micro_batches=2"][..],
        ),
    ] {
        let run = train::train(
            &common::synthetic_config(dir.path(), name, &[GRAPH.as_slice(), layout].concat()),
            &device,
            "cpu",
            None,
        )
        .unwrap();
        assert_eq!(run.params, fused.params);
        let b = common::series(dir.path(), name, "step", "loss");
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-4 * x.abs().max(1.0),
                "{name}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn fusion_refusals_name_their_key_and_reason() {
    let e = err(&["features.text=true", "parallel.tp=2", "model.preset=tiny"]);
    assert!(e.contains("features.text") && e.contains("tp = 1"), "{e}");
    let e = err(&["features.graph=true", "features.graph_layers=0"]);
    assert!(e.contains("features.graph_layers"), "{e}");
}

#[test]
fn missing_feature_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    // No encoder folder.
    let empty = tempfile::tempdir().unwrap();
    let model = format!("features.text_model=\"{}\"", empty.path().display());
    let config = common::synthetic_config(dir.path(), "t", &["features.text=true", &model]);
    let e = train::train(&config, &device, "cpu", None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("features.text_model") && e.contains("cargo xtask data minilm"),
        "{e}"
    );
    // The synthetic data has no user side file for the attribute relation.
    let config = common::synthetic_config(dir.path(), "g", &["features.graph=true"]);
    let e = train::train(&config, &device, "cpu", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("features.graph_relations"), "{e}");
}
