//! The small synthetic run the trainer's end-to-end tests share.

use meshrec_trainer::config::RunConfig;

/// A tiny-model run on 60 synthetic users writing to `dir/name`, with `extra` overrides
/// applied last (they win).
pub fn synthetic_config(dir: &std::path::Path, name: &str, extra: &[&str]) -> RunConfig {
    let mut overrides: Vec<String> = [
        "data.path=synthetic",
        "data.synthetic.users=60",
        "data.synthetic.items=30",
        "data.synthetic.mean_length=10.0",
        "model.preset=tiny",
        "train.epochs=3",
        "train.batch_size=16",
        "train.warmup_steps=2",
        "train.patience=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.push(format!("output.dir=\"{}\"", dir.display()));
    overrides.push(format!("output.name={name}"));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::from_toml("", "test", &overrides).unwrap()
}

/// The lines of `dir/name/metrics.jsonl` of one kind (`step` or `epoch`).
pub fn metrics(dir: &std::path::Path, name: &str, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(name).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// The `key` of every line of one kind, as f64.
#[allow(dead_code)]
pub fn series(dir: &std::path::Path, name: &str, kind: &str, key: &str) -> Vec<f64> {
    metrics(dir, name, kind)
        .iter()
        .map(|v| v[key].as_f64().unwrap())
        .collect()
}

/// Test NDCG@10 of the run's model as initialised, before any training: the bar a trained
/// model must clear by a margin (the ranking of a random embedding).
#[allow(dead_code)]
pub fn untrained_test_ndcg(config: &RunConfig) -> f64 {
    use meshrec_model::data::{EvalSet, EvalSplit};
    let device = meshrec_model::device::test_device();
    let dataset = meshrec_trainer::setup::load_dataset(config).unwrap();
    let (model_config, model) =
        meshrec_trainer::setup::build_model(config, &dataset, &device).unwrap();
    let test = EvalSet::new(&dataset, model_config.max_len, EvalSplit::Test);
    meshrec_trainer::model_io::evaluate(&model, &test, 64, &device).report()["ndcg@10"]
}
