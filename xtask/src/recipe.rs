//! `cargo xtask bench recipe`: the shipped ml-100k config trained to early stopping on
//! several seeds, test metrics as mean and standard deviation, against the PyTorch peer
//! under the same ranking protocol (run here with `--peer`, else its documented figure).
//! Writes `target/bench/recipe.{json,md}`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::workspace::root;

/// The metrics reported, as the summaries name them.
pub(crate) const METRICS: [&str; 3] = ["ndcg@10", "hr@10", "mrr@10"];
/// The peer's test NDCG@10 / HR@10 over seeds 0, 1, 2 as `../shared/peer/README.md`
/// states them, for runs without `--peer`.
const PEER_DOCUMENTED: [(&str, f64); 2] = [("ndcg@10", 0.108), ("hr@10", 0.203)];

/// One training run's outcome.
struct Run {
    system: &'static str,
    seed: u64,
    test: BTreeMap<String, f64>,
    best_epoch: u64,
    wall_s: f64,
}

/// Mean and sample standard deviation.
pub(crate) fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n.max(1.0);
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Mean and standard deviation of each of [`METRICS`] over runs' metric maps.
pub(crate) fn metric_stats<'a>(
    runs: impl Iterator<Item = &'a BTreeMap<String, f64>> + Clone,
) -> BTreeMap<String, (f64, f64)> {
    METRICS
        .iter()
        .map(|k| {
            let xs: Vec<f64> = runs.clone().map(|m| m[*k]).collect();
            (k.to_string(), mean_std(&xs))
        })
        .collect()
}

pub(crate) fn read_summary(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub(crate) fn metrics_of(value: &Value, what: &str) -> Result<BTreeMap<String, f64>> {
    METRICS
        .iter()
        .map(|k| {
            value
                .get(k)
                .and_then(Value::as_f64)
                .map(|v| (k.to_string(), v))
                .with_context(|| format!("{what} has no `{k}`"))
        })
        .collect()
}

fn meshrec_run(seed: u64, sets: &[String], out_dir: &Path) -> Result<Run> {
    let name = format!("recipe-seed{seed}");
    let summary = train_ml100k(&name, seed, sets, out_dir)?;
    let path = out_dir.join(&name).join("summary.json");
    Ok(Run {
        system: "meshrec",
        seed,
        test: metrics_of(&summary["test"], &path.display().to_string())?,
        best_epoch: summary["best_epoch"].as_u64().unwrap_or(0),
        wall_s: summary["wall_seconds"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Trains `configs/ml100k.toml` with `sets` and `seed` into `out_dir/name` (release
/// build, CPU) and returns its `summary.json`.
pub(crate) fn train_ml100k(
    name: &str,
    seed: u64,
    sets: &[String],
    out_dir: &Path,
) -> Result<Value> {
    train_ml100k_with(crate::cmd::meshrec_release(), name, seed, sets, out_dir)
}

/// [`train_ml100k`] with a given `meshrec` (a frozen binary, say).
pub(crate) fn train_ml100k_with(
    mut cmd: std::process::Command,
    name: &str,
    seed: u64,
    sets: &[String],
    out_dir: &Path,
) -> Result<Value> {
    cmd.args([
        "train",
        "--config",
        "configs/ml100k.toml",
        "--device",
        "cpu",
    ]);
    for set in sets.iter().cloned().chain([
        format!("train.seed={seed}"),
        format!("output.name={name}"),
        format!("output.dir=\"{}\"", out_dir.display()),
    ]) {
        cmd.args(["--set", &set]);
    }
    crate::cmd::run(&mut cmd)?;
    read_summary(&out_dir.join(name).join("summary.json"))
}

fn peer_run(seed: u64) -> Result<Run> {
    let lines = crate::peer::run(&[
        "train".into(),
        "--inter".into(),
        "data/ml-100k/ml-100k.inter".into(),
        "--exclude-history".into(),
        "--threads".into(),
        "2".into(),
        "--seed".into(),
        seed.to_string(),
    ])?;
    let last = lines
        .iter()
        .rev()
        .find(|l| l.get("test").is_some())
        .context("the peer printed no final line with `test`")?;
    Ok(Run {
        system: "peer",
        seed,
        test: metrics_of(&last["test"], "the peer's test metrics")?,
        best_epoch: last["best_epoch"].as_u64().unwrap_or(0),
        wall_s: last["wall_s"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Runs the benchmark.
pub fn bench(seeds: &[u64], peer: bool, sets: &[String]) -> Result<()> {
    if seeds.is_empty() {
        bail!("give at least one seed");
    }
    let bench_dir = root().join("target/bench");
    let out_dir = bench_dir.join("recipe-runs");
    std::fs::create_dir_all(&out_dir)?;
    let mut runs = Vec::new();
    for &seed in seeds {
        runs.push(meshrec_run(seed, sets, &out_dir)?);
        if peer {
            runs.push(peer_run(seed)?);
        }
    }
    let stats = |system: &str| {
        metric_stats(
            runs.iter()
                .filter(move |r| r.system == system)
                .map(|r| &r.test),
        )
    };
    let ours = stats("meshrec");
    let (peer_ndcg, peer_source) = if peer {
        (stats("peer")["ndcg@10"].0, "run here, same seeds")
    } else {
        (
            PEER_DOCUMENTED[0].1,
            "documented in ../shared/peer/README.md (seeds 0/1/2), not run here",
        )
    };
    let ratio = ours["ndcg@10"].0 / peer_ndcg;
    let met = ratio >= 1.0;
    let mut md = format!(
        "# ID-only recipe vs the PyTorch peer (test split, history excluded, ties against the target)\n\n\
         Config `configs/ml100k.toml`{}, seeds {:?}.\n\n\
         | system | seed | best epoch | NDCG@10 | HR@10 | MRR@10 | wall s |\n|---|---|---|---|---|---|---|\n",
        if sets.is_empty() {
            String::new()
        } else {
            format!(" with {}", sets.join(", "))
        },
        seeds
    );
    for r in &runs {
        md.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.0} |\n",
            r.system,
            r.seed,
            r.best_epoch,
            r.test["ndcg@10"],
            r.test["hr@10"],
            r.test["mrr@10"],
            r.wall_s
        ));
    }
    md.push_str("\n| system | NDCG@10 | HR@10 | MRR@10 |\n|---|---|---|---|\n");
    let mut systems = vec![("meshrec", ours.clone())];
    if peer {
        systems.push(("peer", stats("peer")));
    }
    for (name, s) in &systems {
        let cell = |k: &str| format!("{:.4} ± {:.4}", s[k].0, s[k].1);
        md.push_str(&format!(
            "| {name} (mean ± std) | {} | {} | {} |\n",
            cell("ndcg@10"),
            cell("hr@10"),
            cell("mrr@10")
        ));
    }
    md.push_str(&format!(
        "\nTarget: meshrec's mean test NDCG@10 >= the peer's ({peer_ndcg:.4}, {peer_source}): \
         {:.4} = {ratio:.3}x — **{}**.\n",
        ours["ndcg@10"].0,
        if met { "met" } else { "missed" }
    ));
    let json = json!({
        "config": "configs/ml100k.toml",
        "sets": sets,
        "rows": runs.iter().map(|r| json!({
            "system": r.system,
            "seed": r.seed,
            "test": r.test,
            "best_epoch": r.best_epoch,
            "wall_s": r.wall_s,
        })).collect::<Vec<_>>(),
        "meshrec": ours.iter().map(|(k, (m, s))| (k.clone(), json!({"mean": m, "std": s}))).collect::<BTreeMap<_, _>>(),
        "peer_ndcg@10": peer_ndcg,
        "peer_source": peer_source,
        "ratio_vs_peer": ratio,
        "target_met": met,
    });
    std::fs::write(bench_dir.join("recipe.md"), &md)?;
    std::fs::write(
        bench_dir.join("recipe.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("{md}");
    Ok(())
}
