//! `cargo xtask bench fusion`: the fusion ablation (issue 15) — ID only, +text, +graph,
//! +text+graph — each trained to early stopping on `configs/ml100k.toml` for every seed;
//! test NDCG@10, HR@10, MRR@10 as mean ± std, the same over test users whose target is a
//! cold item (bottom popularity quintile of the training split), and training samples/s of
//! each measured side by side (`meshrec bench`, rounds alternating over the variants).
//! Writes `target/bench/fusion.{json,md}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cmd::{bench_dir, build_meshrec_release, meshrec_bench};
use crate::recipe::{metric_stats, metrics_of, train_ml100k_with};
use crate::{data, minilm};

/// The variants and the `--set`s that make them.
const VARIANTS: [(&str, &[&str]); 4] = [
    ("id", &[]),
    ("text", &["features.text=true"]),
    ("graph", &["features.graph=true"]),
    ("text+graph", &["features.text=true", "features.graph=true"]),
];
/// The PyTorch peer's mean test NDCG@10 over seeds 0/1/2 (`../shared/peer/README.md`).
const PEER_NDCG10: f64 = 0.108;

struct Row {
    variant: &'static str,
    seed: u64,
    test: BTreeMap<String, f64>,
    cold_test: BTreeMap<String, f64>,
    cold_users: u64,
    samples_per_s: f64,
    best_epoch: u64,
    wall_s: f64,
}

/// The release binary, copied so every run of the bench uses the same build even while
/// the sources change.
fn frozen_binary(dir: &Path) -> Result<PathBuf> {
    let built = build_meshrec_release()?;
    let frozen = dir.join("meshrec");
    std::fs::copy(&built, &frozen)
        .with_context(|| format!("copying the binary to {}", frozen.display()))?;
    Ok(frozen)
}

fn train(
    bin: &Path,
    variant: &'static str,
    sets: &[&str],
    seed: u64,
    extra: &[String],
    out: &Path,
) -> Result<Row> {
    let name = format!("{}-seed{seed}", variant.replace('+', "-"));
    let sets: Vec<String> = sets
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect();
    let summary = train_ml100k_with(Command::new(bin), &name, seed, &sets, out)?;
    let what = out.join(&name).join("summary.json").display().to_string();
    Ok(Row {
        variant,
        seed,
        test: metrics_of(&summary["test"], &what)?,
        cold_test: metrics_of(&summary["test_cold"], &what)?,
        cold_users: summary["test_cold_users"].as_u64().unwrap_or(0),
        samples_per_s: summary["samples_per_s"].as_f64().unwrap_or(f64::NAN),
        best_epoch: summary["best_epoch"].as_u64().unwrap_or(0),
        wall_s: summary["wall_seconds"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Samples per second of each variant by `meshrec bench` (20 steps after 3 warm-up), three
/// rounds alternating over the variants; the median round per variant.
fn throughput(bin: &Path, dir: &Path) -> Result<BTreeMap<&'static str, f64>> {
    let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for round in 0..3 {
        for (variant, sets) in VARIANTS {
            let out = dir.join(format!("bench-{}-{round}.json", variant.replace('+', "-")));
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let v = meshrec_bench(Command::new(bin), &sets, 20, &out)?;
            let s = v["samples_per_s"]
                .as_f64()
                .with_context(|| format!("{} has no samples_per_s", out.display()))?;
            samples.entry(variant).or_default().push(s);
        }
    }
    Ok(samples
        .into_iter()
        .map(|(k, mut xs)| {
            xs.sort_by(f64::total_cmp);
            (k, xs[xs.len() / 2])
        })
        .collect())
}

type Stats = BTreeMap<String, (f64, f64)>;

fn stats(rows: &[Row], variant: &str, pick: fn(&Row) -> &BTreeMap<String, f64>) -> Stats {
    metric_stats(rows.iter().filter(move |r| r.variant == variant).map(pick))
}

pub fn bench(seeds: &[u64], extra: &[String]) -> Result<()> {
    if seeds.is_empty() {
        bail!("give at least one seed");
    }
    if data::verify_ml100k(&crate::workspace::root().join("data/ml-100k")).is_err() {
        data::fetch_ml100k(None)?;
    }
    if !minilm::present() {
        minilm::fetch_minilm()?;
    } else {
        // The encoder must match sentence-transformers wherever the bench runs.
        minilm::check()?;
    }
    let dir = bench_dir().join("fusion-runs");
    std::fs::create_dir_all(&dir)?;
    let bin = frozen_binary(&dir)?;
    let mut rows = Vec::new();
    for &seed in seeds {
        for (variant, sets) in VARIANTS {
            rows.push(train(&bin, variant, sets, seed, extra, &dir)?);
        }
    }
    let speed = throughput(&bin, &dir)?;
    report(&rows, &speed, seeds, extra)
}

fn report(
    rows: &[Row],
    speed: &BTreeMap<&str, f64>,
    seeds: &[u64],
    extra: &[String],
) -> Result<()> {
    let test: BTreeMap<&str, Stats> = VARIANTS
        .iter()
        .map(|(v, _)| (*v, stats(rows, v, |r| &r.test)))
        .collect();
    let cold: BTreeMap<&str, Stats> = VARIANTS
        .iter()
        .map(|(v, _)| (*v, stats(rows, v, |r| &r.cold_test)))
        .collect();
    let ndcg = |s: &BTreeMap<&str, Stats>, v: &str| s[v]["ndcg@10"];
    let (id, tg) = (ndcg(&test, "id"), ndcg(&test, "text+graph"));
    let gain = tg.0 / id.0 - 1.0;
    let cold_gain = ndcg(&cold, "text+graph").0 / ndcg(&cold, "id").0.max(1e-12) - 1.0;
    let noise = id.1.max(tg.1);
    let targets = [
        (
            format!("ID-only >= the PyTorch SASRec ({PEER_NDCG10}): {:.4}", id.0),
            id.0 >= PEER_NDCG10,
        ),
        (
            format!("text+graph >= +10% over ID-only: {:+.1}%", 100.0 * gain),
            gain >= 0.10,
        ),
        (
            format!(
                "text+graph above text ({:.4}) and graph ({:.4}): {:.4}",
                ndcg(&test, "text").0,
                ndcg(&test, "graph").0,
                tg.0
            ),
            tg.0 > ndcg(&test, "text").0 && tg.0 > ndcg(&test, "graph").0,
        ),
        (
            format!(
                "gap to ID-only ({:.4}) larger than one std ({noise:.4})",
                tg.0 - id.0
            ),
            tg.0 - id.0 > noise,
        ),
        (
            format!(
                "larger gain on cold items: {:+.1}% vs {:+.1}%",
                100.0 * cold_gain,
                100.0 * gain
            ),
            cold_gain > gain,
        ),
    ];
    let cell = |s: (f64, f64)| format!("{:.4} ± {:.4}", s.0, s.1);
    let cold_users = rows.first().map_or(0, |r| r.cold_users);
    let mut md = format!(
        "# Fusion ablation on ml-100k (test split, history excluded, ties against the target)\n\n\
         `configs/ml100k.toml`{}, seeds {seeds:?}; text: all-MiniLM-L6-v2 of \"title (year) | genres\"; \
         graph: user–item (training split), item–genre, user–attribute, 2 LightGCN layers. \
         Cold: the {cold_users} test users whose target is in the bottom popularity quintile.\n\n\
         | variant | NDCG@10 | HR@10 | MRR@10 | cold NDCG@10 | cold HR@10 | samples/s (bench, median of 3) |\n\
         |---|---|---|---|---|---|---|\n",
        if extra.is_empty() { String::new() } else { format!(" with {}", extra.join(", ")) },
    );
    for (v, _) in VARIANTS {
        md.push_str(&format!(
            "| {v} | {} | {} | {} | {} | {} | {:.0} |\n",
            cell(test[v]["ndcg@10"]),
            cell(test[v]["hr@10"]),
            cell(test[v]["mrr@10"]),
            cell(cold[v]["ndcg@10"]),
            cell(cold[v]["hr@10"]),
            speed.get(v).copied().unwrap_or(f64::NAN),
        ));
    }
    md.push_str("\n| variant | seed | best epoch | NDCG@10 | HR@10 | cold NDCG@10 | run samples/s | wall s |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.0} | {:.0} |\n",
            r.variant,
            r.seed,
            r.best_epoch,
            r.test["ndcg@10"],
            r.test["hr@10"],
            r.cold_test["ndcg@10"],
            r.samples_per_s,
            r.wall_s
        ));
    }
    md.push_str("\nTargets:\n");
    for (what, met) in &targets {
        md.push_str(&format!(
            "- {what} — **{}**\n",
            if *met { "met" } else { "missed" }
        ));
    }
    let json = json!({
        "config": "configs/ml100k.toml",
        "sets": extra,
        "seeds": seeds,
        "cold_definition": "test users whose target's training count is at most the 20th-percentile count of the catalogue",
        "rows": rows.iter().map(|r| json!({
            "variant": r.variant,
            "seed": r.seed,
            "test": r.test,
            "cold_test": r.cold_test,
            "cold_users": r.cold_users,
            "samples_per_s": r.samples_per_s,
            "best_epoch": r.best_epoch,
            "wall_s": r.wall_s,
        })).collect::<Vec<_>>(),
        "samples_per_s_bench": speed,
        "summary": VARIANTS.iter().map(|(v, _)| (v.to_string(), json!({
            "test": test[v].iter().map(|(k, (m, s))| (k.clone(), json!({"mean": m, "std": s}))).collect::<BTreeMap<_, _>>(),
            "cold_test": cold[v].iter().map(|(k, (m, s))| (k.clone(), json!({"mean": m, "std": s}))).collect::<BTreeMap<_, _>>(),
        }))).collect::<BTreeMap<_, _>>(),
        "targets": targets.iter().map(|(w, m)| json!({"target": w, "met": m})).collect::<Vec<_>>(),
    });
    std::fs::write(bench_dir().join("fusion.md"), &md)?;
    std::fs::write(
        bench_dir().join("fusion.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("{md}");
    Ok(())
}
