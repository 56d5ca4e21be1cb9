//! `cargo xtask bench convergence`: the shipped ml-100k recipe trained to early stopping
//! with dp 2, dense and with each gradient compressor, on paired seeds (same init and data
//! order per seed): the accuracy each compressor costs against the bytes it saves.
//! Writes `target/bench/convergence.{json,md}`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::recipe::{mean_std, metrics_of, read_summary, train_ml100k, METRICS};
use crate::workspace::root;

/// One compressor setting of the bench.
struct Method {
    name: &'static str,
    /// The simulator's name of the compressor (`balance`'s `Compression::name`), under
    /// which the planner's accuracy table records it.
    compression: &'static str,
    sets: &'static [&'static str],
    /// The accuracy bar (>= 0.98x dense NDCG@10) and, where given, the bytes bar (at most
    /// this fraction of the dense bytes) it is held to; `None`: reported only.
    target_bytes: Option<Option<f64>>,
}

const METHODS: [Method; 6] = [
    Method {
        name: "dense",
        compression: "none",
        sets: &[],
        target_bytes: None,
    },
    Method {
        name: "topk 1% + EF",
        compression: "topk1%",
        sets: &["compress.method=\"topk\"", "compress.ratio=0.01"],
        target_bytes: None,
    },
    Method {
        // DGC (Lin et al.): momentum correction with factor masking, sparsity warm-up;
        // AdamW keeps its second moment and drops its own first (the velocity is it).
        // The warm-up is 100 steps (10 epochs here, DGC's is 4): with indices sent as
        // varint gaps top-k 1% costs about 1.25% of the dense bytes, and 100 steps of
        // warm-up is what the rest of the 2% pays for.
        name: "topk 1% + DGC corrections",
        compression: "topk1%",
        sets: &[
            "compress.method=\"topk\"",
            "compress.ratio=0.01",
            "compress.momentum_correction=0.9",
            "compress.warmup_steps=100",
            "train.beta1=0.0",
        ],
        target_bytes: Some(Some(0.02)),
    },
    Method {
        name: "powersgd rank 4",
        compression: "powersgd-r4",
        sets: &["compress.method=\"powersgd\"", "compress.rank=4"],
        target_bytes: Some(None),
    },
    Method {
        // DGC's corrections with coordinates ranked by their accumulated value over their
        // own gradient scale (AdamW's view of them) rather than by magnitude, and a
        // shorter warm-up (60 steps) so that a run stopped early stays within 2% too.
        name: "topk 1% + DGC + normalized selection",
        compression: "topk1%",
        sets: &[
            "compress.method=\"topk\"",
            "compress.ratio=0.01",
            "compress.momentum_correction=0.9",
            "compress.warmup_steps=60",
            "compress.normalized_selection=0.999",
            "train.beta1=0.0",
        ],
        target_bytes: Some(Some(0.02)),
    },
    Method {
        // DGC's corrections with the kept values sent as bf16 (their rounding error stays
        // in the residual): about 3.3 bytes per kept value, top-k 1% at ~0.8% of the dense
        // bytes, which pays for a 200-step (20-epoch) sparsity warm-up within 2%.
        name: "topk 1% + DGC, bf16 values, warm-up 200",
        compression: "topk1%",
        sets: &[
            "compress.method=\"topk\"",
            "compress.ratio=0.01",
            "compress.momentum_correction=0.9",
            "compress.warmup_steps=200",
            "compress.sparse_values=\"bf16\"",
            "train.beta1=0.0",
        ],
        target_bytes: Some(Some(0.02)),
    },
];

/// One run's outcome.
struct Row {
    method: &'static str,
    seed: u64,
    test: BTreeMap<String, f64>,
    /// The best epoch's valid NDCG@10 (what early stopping chose it by).
    valid_ndcg: f64,
    best_epoch: u64,
    /// Compressed over dense DP bytes, from the reductions' own accounting.
    dp_bytes_ratio: f64,
    /// Bytes rank 0 sent on the DP group per step, counted by the engine.
    dp_sent_per_step: f64,
    wall_s: f64,
    /// Read from an earlier invocation's finished run.
    reused: bool,
}

fn row(method: &'static str, seed: u64, summary: &Value, what: &str) -> Result<Row> {
    let par = summary
        .get("parallel")
        .with_context(|| format!("{what} has no `parallel` section (dp 2 expected)"))?;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let ratio = num(par, "compression_ratio")
        .with_context(|| format!("{what}: no parallel.compression_ratio"))?;
    Ok(Row {
        method,
        seed,
        test: metrics_of(&summary["test"], what)?,
        valid_ndcg: summary["valid"]["ndcg@10"]
            .as_f64()
            .with_context(|| format!("{what}: no valid.ndcg@10"))?,
        best_epoch: summary["best_epoch"].as_u64().unwrap_or(0),
        dp_bytes_ratio: 1.0 / ratio,
        dp_sent_per_step: num(par, "comm_bytes_dp").unwrap_or(f64::NAN),
        wall_s: num(summary, "wall_seconds").unwrap_or(f64::NAN),
        reused: false,
    })
}

/// Runs the benchmark over `seeds`, with `sets` applied to every run.
pub fn bench(seeds: &[u64], sets: &[String]) -> Result<()> {
    if seeds.is_empty() {
        bail!("give at least one seed");
    }
    let bench_dir = root().join("target/bench");
    let out_dir = bench_dir.join("convergence-runs");
    std::fs::create_dir_all(&out_dir)?;
    let (mut rows, mut done) = (Vec::new(), Vec::new());
    for &seed in seeds {
        for (i, m) in METHODS.iter().enumerate() {
            let name = format!("conv-m{i}-seed{seed}");
            let run_sets: Vec<String> = ["parallel.dp=2"]
                .iter()
                .chain(m.sets)
                .map(|s| s.to_string())
                .chain(sets.iter().cloned())
                .collect();
            // A finished run of an earlier invocation is reused (delete the folder, or
            // target/bench/convergence-runs, to train it again): the bench takes hours.
            let finished = out_dir.join(&name).join("summary.json");
            let (summary, reused) = if finished.is_file() {
                eprintln!(
                    "bench convergence: {} seed {seed}: reusing {}",
                    m.name,
                    finished.display()
                );
                (read_summary(&finished)?, true)
            } else {
                eprintln!("bench convergence: {} seed {seed}", m.name);
                (train_ml100k(&name, seed, &run_sets, &out_dir)?, false)
            };
            rows.push(Row {
                reused,
                ..row(m.name, seed, &summary, &name)?
            });
        }
        // The tables so far, after every seed: a long bench shows its results as it goes.
        done.push(seed);
        report(&rows, &done, sets, done.len() == seeds.len())?;
    }
    Ok(())
}

/// Writes `convergence.{md,json}` for the seeds `seeds` whose runs are all in `rows`, and,
/// when the bench is `complete` with the shipped recipe, the planner's accuracy table.
fn report(rows: &[Row], seeds: &[u64], sets: &[String], complete: bool) -> Result<()> {
    let bench_dir = root().join("target/bench");
    let of = |method: &'static str| rows.iter().filter(move |r| r.method == method);
    let dense_ndcg: BTreeMap<u64, f64> = of("dense").map(|r| (r.seed, r.test["ndcg@10"])).collect();
    let mut md = format!(
        "# Compression against accuracy (configs/ml100k.toml, dp 2, early stopping{})\n\n\
         Seeds {seeds:?}, paired: every method starts from the same init and data order per seed.\n\n\
         | method | seed | best epoch | NDCG@10 | HR@10 | vs dense | valid NDCG@10 vs dense | DP bytes / dense | DP MB sent / step | wall s |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        if sets.is_empty() {
            String::new()
        } else {
            format!(", with {}", sets.join(", "))
        },
    );
    let dense_valid: BTreeMap<u64, f64> = of("dense").map(|r| (r.seed, r.valid_ndcg)).collect();
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.3}x | {:.3}x | {:.4} | {:.2} | {:.0}{} |\n",
            r.method,
            r.seed,
            r.best_epoch,
            r.test["ndcg@10"],
            r.test["hr@10"],
            r.test["ndcg@10"] / dense_ndcg[&r.seed],
            r.valid_ndcg / dense_valid[&r.seed],
            r.dp_bytes_ratio,
            r.dp_sent_per_step / 1e6,
            r.wall_s,
            if r.reused { " (earlier run)" } else { "" }
        ));
    }
    md.push_str(
        "\n| method | NDCG@10 (mean ± std) | HR@10 | vs dense (ratio of means) | valid NDCG@10 vs dense | DP bytes / dense | target |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let dense_valid_mean = mean_std(&dense_valid.values().copied().collect::<Vec<_>>()).0;
    let dense_mean = mean_std(&dense_ndcg.values().copied().collect::<Vec<_>>()).0;
    let mut summary = Vec::new();
    let mut table_entries = Vec::new();
    for m in &METHODS {
        let ndcg: Vec<f64> = of(m.name).map(|r| r.test["ndcg@10"]).collect();
        let hr: Vec<f64> = of(m.name).map(|r| r.test["hr@10"]).collect();
        let bytes = mean_std(&of(m.name).map(|r| r.dp_bytes_ratio).collect::<Vec<_>>()).0;
        let (mean, std) = mean_std(&ndcg);
        let vs_dense = mean / dense_mean;
        let valid_vs_dense =
            mean_std(&of(m.name).map(|r| r.valid_ndcg).collect::<Vec<_>>()).0 / dense_valid_mean;
        let verdict = match m.target_bytes {
            None => "reference".to_string(),
            Some(bytes_bar) => {
                let acc_ok = vs_dense >= 0.98;
                let bytes_ok = bytes_bar.is_none_or(|b| bytes <= b);
                let bar = match bytes_bar {
                    Some(b) => format!(">= 0.98x dense, <= {:.0}% of its bytes", b * 100.0),
                    None => ">= 0.98x dense".to_string(),
                };
                format!(
                    "{bar}: **{}**",
                    if acc_ok && bytes_ok { "met" } else { "missed" }
                )
            }
        };
        md.push_str(&format!(
            "| {} | {mean:.4} ± {std:.4} | {:.4} | {vs_dense:.3}x | {valid_vs_dense:.3}x | {bytes:.4} | {verdict} |\n",
            m.name,
            mean_std(&hr).0,
        ));
        if m.compression != "none" {
            table_entries.push(json!({
                "compression": m.compression,
                "recipe": m.name,
                "ndcg_vs_dense": vs_dense,
                "dp_bytes_ratio": bytes,
                "seeds": seeds,
            }));
        }
        summary.push(json!({
            "method": m.name,
            "ndcg@10_mean": mean,
            "ndcg@10_std": std,
            "ndcg_vs_dense": vs_dense,
            "valid_ndcg_vs_dense": valid_vs_dense,
            "dp_bytes_ratio": bytes,
            "verdict": verdict,
        }));
    }
    let json = json!({
        "config": "configs/ml100k.toml",
        "dp": 2,
        "sets": sets,
        "metrics": METRICS,
        "rows": rows.iter().map(|r| json!({
            "method": r.method,
            "seed": r.seed,
            "test": r.test,
            "valid_ndcg@10": r.valid_ndcg,
            "best_epoch": r.best_epoch,
            "dp_bytes_ratio": r.dp_bytes_ratio,
            "dp_sent_bytes_per_step": r.dp_sent_per_step,
            "wall_s": r.wall_s,
            "reused": r.reused,
        })).collect::<Vec<_>>(),
        "methods": summary,
    });
    // The planner's committed table (balance/data/compression_accuracy.json), from runs of
    // the shipped recipe only: a run with overrides measures something else.
    if complete && sets.is_empty() {
        let table = json!({
            "source": format!(
                "measured by `cargo xtask bench convergence`: configs/ml100k.toml (small), dp 2, \
                 early stopping, paired seeds {seeds:?}; test NDCG@10 mean relative to the dense run's"
            ),
            "bar": 0.98,
            "entries": table_entries,
        });
        let path = root().join("balance/data/compression_accuracy.json");
        std::fs::write(&path, serde_json::to_string_pretty(&table)? + "\n")?;
        md.push_str(&format!(
            "\nRecorded for the planner in {}.\n",
            path.display()
        ));
    }
    std::fs::write(bench_dir.join("convergence.md"), &md)?;
    std::fs::write(
        bench_dir.join("convergence.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    if complete {
        print!("{md}");
    } else {
        eprintln!(
            "bench convergence: seeds {seeds:?} done, tables so far in {}",
            bench_dir.display()
        );
    }
    Ok(())
}
