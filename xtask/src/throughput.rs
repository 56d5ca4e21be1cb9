//! `cargo xtask bench train [--peer]`: meshrec's training throughput on the shipped `small`
//! ml-100k config (`meshrec bench`: 20 steps after 3 warm-up, one device), the machine's
//! measured f32 matrix-product peak and the fraction of it the step reaches; with `--peer`,
//! the PyTorch peer's `bench` (same shape, batch 256, 2 threads) in three rounds
//! alternating with meshrec's, and the median of the per-round ratios. Writes
//! `target/bench/train.json`.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd::{bench_dir, build_meshrec_release, meshrec_bench};
use crate::workspace::root;
use crate::{data, peer};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One `meshrec bench` run's JSON.
fn meshrec_round(bin: &std::path::Path, round: usize) -> Result<Value> {
    let out = bench_dir().join(format!("train-round{round}.json"));
    meshrec_bench(Command::new(bin), &[], 20, &out)
}

/// One peer `bench` run: its samples per second.
fn peer_round() -> Result<f64> {
    let inter = root().join("data/ml-100k/ml-100k.inter");
    let lines = peer::run(&[
        "bench".into(),
        "--inter".into(),
        inter.display().to_string(),
        "--threads".into(),
        "2".into(),
    ])?;
    lines
        .iter()
        .rev()
        .find_map(|l| l["samples_per_s"].as_f64())
        .context("the peer's bench printed no samples_per_s")
}

pub fn bench(with_peer: bool) -> Result<()> {
    if data::verify_ml100k(&root().join("data/ml-100k")).is_err() {
        data::fetch_ml100k(None)?;
    }
    if with_peer {
        // Fail before the long part when the peer cannot run.
        peer::python()?;
    }
    let bin = build_meshrec_release()?;
    let rounds = if with_peer { 3 } else { 1 };
    let (mut ours, mut theirs, mut ratios, mut peaks, mut fractions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = Value::Null;
    for round in 0..rounds {
        let m = meshrec_round(&bin, round)?;
        let s = m["samples_per_s"].as_f64().context("no samples_per_s")?;
        ours.push(s);
        peaks.push(m["peak_gflops"].as_f64().unwrap_or(f64::NAN));
        fractions.push(m["fraction_of_peak"].as_f64().unwrap_or(f64::NAN));
        if with_peer {
            let p = peer_round()?;
            eprintln!("bench train: round {round}: meshrec {s:.0}, peer {p:.0} samples/s");
            theirs.push(p);
            ratios.push(s / p);
        }
        last = m;
    }
    let mut report = json!({
        "samples_per_s": median(ours.clone()),
        "samples_per_s_rounds": ours,
        "peak_gflops": median(peaks),
        "peak_is": last["peak_is"],
        "flops_per_sample": last["flops_per_sample"],
        "flops_are": last["flops_are"],
        "fraction_of_peak": median(fractions),
        "preset": last["preset"],
        "batch": last["batch"],
        "threads": last["threads"],
    });
    if with_peer {
        report["peer_samples_per_s"] = json!(median(theirs.clone()));
        report["peer_samples_per_s_rounds"] = json!(theirs);
        report["ratio_vs_peer"] = json!(median(ratios.clone()));
        report["ratio_rounds"] = json!(ratios);
        report["peer"] = json!("../shared/peer/sasrec_torch.py bench --threads 2 (PyTorch eager, same shape, batch 256)");
    }
    // Issue 16's targets, each named met or missed beside what this run measured.
    let mut targets = vec![(
        "fraction_of_peak",
        0.35,
        report["fraction_of_peak"].as_f64(),
    )];
    if with_peer {
        targets.push(("ratio_vs_peer", 1.5, report["ratio_vs_peer"].as_f64()));
    }
    report["targets"] = json!(targets
        .iter()
        .map(|&(key, bar, measured)| {
            let met = measured.is_some_and(|m| m >= bar);
            eprintln!(
                "bench train: target {key} >= {bar}: measured {:.3}: {}",
                measured.unwrap_or(f64::NAN),
                if met { "met" } else { "missed" }
            );
            json!({ "key": key, "at_least": bar, "measured": measured, "met": met })
        })
        .collect::<Vec<_>>());
    let path = bench_dir().join("train.json");
    std::fs::create_dir_all(bench_dir())?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report["samples_per_s"].as_f64().is_some_and(f64::is_finite) {
        bail!("bench train measured nothing");
    }
    Ok(())
}
