//! Sharded checkpoints end to end: each rank writes its own shard; the shards hold exactly
//! the state the gathered checkpoint holds; a run moves across layouts and ZeRO stages
//! through them, following the uninterrupted loss curve; a corrupted, missing or
//! foreign shard is named.

use meshrec_model::device::test_device;
use meshrec_trainer::checkpoint;
use meshrec_trainer::checkpoint_shard;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::{hybrid, train};

mod common;

fn config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut all = vec!["train.epochs=1", "model.dropout=0.0"];
    all.extend_from_slice(extra);
    common::synthetic_config(dir, name, &all)
}

fn train(cfg: &RunConfig, resume: Option<&std::path::Path>) -> Result<(), String> {
    let device = test_device().autodiff();
    let out = if cfg.uses_mesh_executor() {
        hybrid::train_local(cfg, &device, "cpu", resume)
    } else {
        train::train(cfg, &device, "cpu", resume)
    };
    out.map(|_| ()).map_err(|e| e.to_string())
}

/// The checkpoint folder of a finished run.
fn latest(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    checkpoint::resolve(&dir.join(name)).unwrap()
}

#[test]
fn shards_hold_the_gathered_state() {
    let dir = tempfile::tempdir().unwrap();
    let layout = [
        "parallel.dp=2",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.micro_batches=2",
        "dp.zero=2",
        "train.max_steps=3",
    ];
    let mut sharded = layout.to_vec();
    sharded.push("checkpoint.sharded=true");
    train(&config(dir.path(), "gathered", &layout), None).unwrap();
    train(&config(dir.path(), "sharded", &sharded), None).unwrap();
    let ckpt = latest(dir.path(), "sharded");
    for r in 0..8 {
        assert!(
            ckpt.join(format!("shard-rank{r}.bin")).is_file(),
            "rank {r}"
        );
    }
    assert!(!ckpt.join("state.bin").exists());
    let (_, manifest, from_shards) = checkpoint_shard::load(&ckpt).unwrap();
    assert!(manifest.sharded.is_some());
    let (_, _, gathered) = checkpoint_shard::load(&dir.path().join("gathered")).unwrap();
    assert_eq!(from_shards.values, gathered.values);
    assert_eq!(from_shards.adam_m, gathered.adam_m);
    assert_eq!(from_shards.adam_v, gathered.adam_v);
    assert_eq!(from_shards.optimizer_steps, gathered.optimizer_steps);
}

#[test]
fn a_sharded_checkpoint_moves_across_layouts_and_zero_stages() {
    let dir = tempfile::tempdir().unwrap();
    train(&config(dir.path(), "whole", &[]), None).unwrap();
    let want = common::series(dir.path(), "whole", "step", "loss");
    let stages: [(&[&str], &str); 4] = [
        (
            &[
                "parallel.dp=2",
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.micro_batches=2",
                "dp.zero=1",
            ],
            "train.max_steps=2",
        ),
        (
            &["parallel.dp=4", "parallel.pp=2", "dp.zero=2"],
            "train.max_steps=4",
        ),
        (
            &["parallel.tp=2", "parallel.sequence_parallel=true"],
            "train.max_steps=6",
        ),
        (&[], "train.max_steps=0"),
    ];
    for (i, (layout, stop)) in stages.iter().enumerate() {
        let mut extra = layout.to_vec();
        extra.extend([*stop, "checkpoint.sharded=true"]);
        let resume = (i > 0).then(|| dir.path().join("moved"));
        train(&config(dir.path(), "moved", &extra), resume.as_deref()).unwrap();
    }
    let got = common::series(dir.path(), "moved", "step", "loss");
    assert_eq!(got.len(), want.len());
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            ((g - w) / w).abs() < 1e-4,
            "step {}: loss {g} after moving through sharded checkpoints vs {w}",
            step + 1
        );
    }
}

#[test]
fn bad_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let layout = [
        "parallel.dp=2",
        "parallel.tp=2",
        "dp.zero=1",
        "checkpoint.sharded=true",
    ];
    let mut stop = layout.to_vec();
    stop.push("train.max_steps=2");
    let resume_err = |name: &str| -> String {
        let ckpt = dir.path().join(name);
        train(&config(dir.path(), name, &layout), Some(&ckpt)).unwrap_err()
    };
    let fresh = |name: &str| -> std::path::PathBuf {
        train(&config(dir.path(), name, &stop), None).unwrap();
        latest(dir.path(), name)
    };
    // A flipped byte.
    let ckpt = fresh("corrupt");
    let file = ckpt.join("shard-rank1.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let err = resume_err("corrupt");
    assert!(
        err.contains("shard-rank1.bin") && err.contains("SHA-256"),
        "{err}"
    );
    // A shard gone.
    let ckpt = fresh("missing");
    std::fs::remove_file(ckpt.join("shard-rank3.bin")).unwrap();
    let err = resume_err("missing");
    assert!(err.contains("shard-rank3.bin"), "{err}");
    // A manifest that no longer lists one rank's shard: its elements are not covered.
    let ckpt = fresh("unlisted");
    let path = ckpt.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let shards = manifest["sharded"]["shards"].as_array_mut().unwrap();
    shards.retain(|s| s != "shard-rank2.bin");
    std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let err = resume_err("unlisted");
    assert!(err.contains("0 times"), "{err}");
}

#[test]
fn a_sharded_compressed_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    // Dropout on and error-feedback residuals: every stream and memory must come back.
    let layout = [
        "parallel.dp=2",
        "compress.method=\"topk\"",
        "compress.ratio=0.05",
        "model.dropout=0.2",
        "train.epochs=2",
        "checkpoint.sharded=true",
    ];
    train(&config(dir.path(), "whole", &layout), None).unwrap();
    let mut stop = layout.to_vec();
    stop.push("train.max_steps=5");
    train(&config(dir.path(), "part", &stop), None).unwrap();
    let ckpt = latest(dir.path(), "part");
    assert!(ckpt.join("compress-rank1.bin").is_file());
    train(
        &config(dir.path(), "part", &layout),
        Some(&dir.path().join("part")),
    )
    .unwrap();
    let bits = |name: &str| -> Vec<u64> {
        common::series(dir.path(), name, "step", "loss")
            .iter()
            .map(|l| l.to_bits())
            .collect()
    };
    assert_eq!(bits("part"), bits("whole"));
}
