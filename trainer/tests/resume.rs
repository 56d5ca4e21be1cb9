//! Training-state checkpoints end to end: a stopped and resumed run continues bit for bit
//! (one device and a mesh, plain and graph-fused), and a run moved across four layouts mid-training follows the
//! uninterrupted one-device loss curve.

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::{hybrid, train};

mod common;

fn config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut all = vec!["train.epochs=2"];
    all.extend_from_slice(extra);
    common::synthetic_config(dir, name, &all)
}

fn train(cfg: &RunConfig, resume: Option<&std::path::Path>) {
    let device = test_device().autodiff();
    if cfg.parallel.world_size() == 1 {
        train::train(cfg, &device, "cpu", resume).unwrap();
    } else {
        hybrid::train_local(cfg, &device, "cpu", resume).unwrap();
    }
}

/// Losses of every step line, as bits.
fn step_losses(dir: &std::path::Path, name: &str) -> Vec<u64> {
    common::series(dir, name, "step", "loss")
        .iter()
        .map(|l| l.to_bits())
        .collect()
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, layout) in [
        ("single", &[][..]),
        (
            "mesh",
            &["parallel.dp=2", "parallel.pp=2", "parallel.micro_batches=2"][..],
        ),
        // A graph-fused model: its fusion parameters are state like any other, its graph is
        // rebuilt from the data (on the mesh the last stage's tied copy of the fusion too).
        (
            "fused",
            &["features.graph=true", "features.graph_relations=[]"][..],
        ),
        (
            "fused-mesh",
            &[
                "features.graph=true",
                "features.graph_relations=[]",
                "parallel.dp=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
            ][..],
        ),
        // Error-feedback residuals must come back too.
        (
            "compressed",
            &[
                "parallel.dp=2",
                "compress.method=topk",
                "compress.ratio=0.05",
            ][..],
        ),
    ] {
        let whole = format!("{name}-whole");
        train(&config(dir.path(), &whole, layout), None);
        // Stopped mid-epoch (dropout on: its streams must resume too), then resumed.
        let part = format!("{name}-part");
        let mut stop = layout.to_vec();
        stop.push("train.max_steps=5");
        train(&config(dir.path(), &part, &stop), None);
        assert_eq!(step_losses(dir.path(), &part).len(), 5, "{name}");
        let ckpt = dir.path().join(&part);
        train(&config(dir.path(), &part, layout), Some(&ckpt));
        let (want, got) = (
            step_losses(dir.path(), &whole),
            step_losses(dir.path(), &part),
        );
        assert_eq!(got, want, "{name}: step losses after resume differ");
        // Epoch lines too: loss over the whole epoch, validation metrics.
        let epochs = |n: &str| -> Vec<(serde_json::Value, serde_json::Value)> {
            common::metrics(dir.path(), n, "epoch")
                .into_iter()
                .map(|e| (e["loss"].clone(), e["valid"].clone()))
                .collect()
        };
        assert_eq!(epochs(&part), epochs(&whole), "{name}: epoch lines differ");
    }
}

#[test]
fn a_checkpoint_moves_across_layouts() {
    let dir = tempfile::tempdir().unwrap();
    // Dropout off so that every layout computes the one-device step.
    let base = ["model.dropout=0.0", "train.epochs=1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    train(&config(dir.path(), "whole", &with(&[])), None);
    let want = common::series(dir.path(), "whole", "step", "loss");
    let layouts: [(&[&str], &str); 4] = [
        (
            &[
                "parallel.dp=2",
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
            ],
            "train.max_steps=2",
        ),
        (&["parallel.dp=4", "parallel.pp=2"], "train.max_steps=4"),
        (
            &["parallel.tp=2", "parallel.pp=2", "parallel.schedule=gpipe"],
            "train.max_steps=6",
        ),
        (&[], "train.max_steps=0"),
    ];
    for (i, (layout, stop)) in layouts.iter().enumerate() {
        let mut extra = with(layout);
        extra.push(stop);
        let resume = (i > 0).then(|| dir.path().join("moved"));
        train(&config(dir.path(), "moved", &extra), resume.as_deref());
    }
    let got = common::series(dir.path(), "moved", "step", "loss");
    assert_eq!(got.len(), want.len());
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            ((g - w) / w).abs() < 1e-4,
            "step {}: loss {g} after moving layouts vs {w} on one device",
            step + 1
        );
    }
}
