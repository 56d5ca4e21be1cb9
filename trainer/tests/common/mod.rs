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
