//! `cargo xtask bench strategies`: the paper's comparison, **measured** on this machine —
//! one device, DP-only, TP-only, PP-only and hybrid layouts of the same world size, each
//! with synchronous and asynchronous DP and with no compression and top-k 1% with error
//! feedback, on a fixed model and global batch of ML-100K. Then the convergence side: a
//! few epochs of dp 2 in each DP mode with valid NDCG@10 per epoch.
//!
//! Writes `strategies.json` and `strategies.md` into `--out` (default `target/bench`).

use std::fmt::Write as _;
use std::path::PathBuf;

use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::hybrid;
use meshrec_trainer::measure::{measure_layout, Measured};
use serde_json::json;

const WARMUP: usize = 2;
const STEPS: usize = 8;
const WORLD: usize = 4;

struct Args {
    out: PathBuf,
    data: String,
    convergence_epochs: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        out: PathBuf::from("target/bench"),
        data: "data/ml-100k".into(),
        convergence_epochs: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--data" => a.data = value()?,
            "--convergence-epochs" => {
                a.convergence_epochs = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(a)
}

/// The fixed workload: `small` with 4 heads and 4 blocks (so tp 4 and pp 4 divide it),
/// global batch 128.
fn base(data: &str) -> Vec<String> {
    [
        format!("data.path=\"{data}\""),
        "model.preset=small".into(),
        "model.n_heads=4".into(),
        "model.n_layers=4".into(),
        "train.batch_size=128".into(),
        "train.lr=0.001".into(),
        "dp.bucket_mb=1.0".into(),
    ]
    .to_vec()
}

fn config(sets: &[String]) -> Result<RunConfig, String> {
    RunConfig::from_toml("", "bench_strategies", sets).map_err(|e| e.to_string())
}

struct Layout {
    name: &'static str,
    dp: usize,
    tp: usize,
    pp: usize,
    micro_batches: usize,
}

const LAYOUTS: [Layout; 7] = [
    Layout {
        name: "single device",
        dp: 1,
        tp: 1,
        pp: 1,
        micro_batches: 1,
    },
    Layout {
        name: "DP 4",
        dp: 4,
        tp: 1,
        pp: 1,
        micro_batches: 1,
    },
    Layout {
        name: "TP 4",
        dp: 1,
        tp: 4,
        pp: 1,
        micro_batches: 1,
    },
    Layout {
        name: "PP 4",
        dp: 1,
        tp: 1,
        pp: 4,
        micro_batches: 8,
    },
    Layout {
        name: "DP 2 × TP 2",
        dp: 2,
        tp: 2,
        pp: 1,
        micro_batches: 1,
    },
    Layout {
        name: "DP 2 × PP 2",
        dp: 2,
        tp: 1,
        pp: 2,
        micro_batches: 4,
    },
    Layout {
        name: "TP 2 × PP 2",
        dp: 1,
        tp: 2,
        pp: 2,
        micro_batches: 4,
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    std::fs::create_dir_all(&args.out)?;
    let device = test_device().autodiff();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::new();
    writeln!(
        md,
        "MEASURED on this machine ({cores} cores): `small` preset with 4 heads and 4 blocks, ML-100K, global batch 128 × 50, \
         {WARMUP} warm-up + {STEPS} measured steps per row, local engine (threads). Multi-device rows use {WORLD} ranks: \
         on {cores} cores each rank gets {:.1} of a core, so the ratios compare layouts at equal total compute, not scaling.\n",
        cores as f64 / WORLD as f64
    )?;
    writeln!(md, "| layout | DP mode | compression | samples/s | vs single | step ms | util mean | util min | bubble | MB/step DP | MB/step TP | MB/step PP | compr. ratio | staleness max |")?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut rows = Vec::new();
    let mut single = None;
    for layout in &LAYOUTS {
        let modes: &[(&str, &str)] = if layout.dp > 1 {
            &[
                ("sync", "none"),
                ("sync", "topk"),
                ("async", "none"),
                ("async", "topk"),
            ]
        } else {
            &[("sync", "none")]
        };
        for (mode, compress) in modes {
            let mut sets = base(&args.data);
            sets.extend([
                format!("parallel.dp={}", layout.dp),
                format!("parallel.tp={}", layout.tp),
                format!("parallel.pp={}", layout.pp),
                format!("parallel.micro_batches={}", layout.micro_batches),
                format!("dp.mode={mode}"),
                format!("compress.method={compress}"),
                "compress.ratio=0.01".into(),
            ]);
            let cfg = config(&sets)?;
            let m: Measured = measure_layout(&cfg, &device, WARMUP, STEPS)?;
            let base_sps = *single.get_or_insert(m.samples_per_s);
            let measured_mesh = m.parallel.is_some();
            let p = m.parallel.unwrap_or_default();
            // One device has no mesh measurements: shown as "-".
            let cell = |x: String| if measured_mesh { x } else { "-".into() };
            let compression = if *compress == "topk" {
                "top-k 1% + EF"
            } else {
                "none"
            };
            let mb = |b: u64| b as f64 / 1e6;
            writeln!(
                md,
                "| {} | {mode} | {compression} | {:.0} | {:.2}× | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
                layout.name,
                m.samples_per_s,
                m.samples_per_s / base_sps,
                m.step_s * 1e3,
                cell(format!("{:.2}", p.utilization_mean)),
                cell(format!("{:.2}", p.utilization_min)),
                cell(format!("{:.2}", p.bubble)),
                cell(format!("{:.2}", mb(p.comm_bytes_dp))),
                cell(format!("{:.2}", mb(p.comm_bytes_tp))),
                cell(format!("{:.2}", mb(p.comm_bytes_pp))),
                cell(format!("{:.1}", p.compression_ratio)),
                cell(p.staleness_max.to_string()),
            )?;
            println!(
                "{} {mode} {compression}: {:.0} samples/s",
                layout.name, m.samples_per_s
            );
            rows.push(json!({
                "layout": layout.name,
                "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
                "micro_batches": layout.micro_batches,
                "dp_mode": mode,
                "compression": compression,
                "samples_per_s": m.samples_per_s,
                "ratio_to_single": m.samples_per_s / base_sps,
                "step_s": m.step_s,
                "utilization_mean": p.utilization_mean,
                "utilization_min": p.utilization_min,
                "bubble": p.bubble,
                "comm_bytes_dp": p.comm_bytes_dp,
                "comm_bytes_tp": p.comm_bytes_tp,
                "comm_bytes_pp": p.comm_bytes_pp,
                "compression_ratio": p.compression_ratio,
                "staleness_max": p.staleness_max,
                "loss_first": m.loss_first,
                "loss_last": m.loss_last,
            }));
        }
    }

    // Convergence: what each DP mode costs in accuracy for what it saves in waiting.
    let mut convergence = Vec::new();
    if args.convergence_epochs > 0 {
        let tmp = std::env::temp_dir().join("meshrec-bench-strategies");
        let _ = std::fs::remove_dir_all(&tmp);
        writeln!(
            md,
            "\nConvergence, dp 2 (one core per rank), `small`, batch 256, {} epochs: valid NDCG@10 per epoch.\n",
            args.convergence_epochs
        )?;
        let header: Vec<String> = (1..=args.convergence_epochs)
            .map(|e| format!("ep {e}"))
            .collect();
        writeln!(md, "| DP mode | samples/s | {} |", header.join(" | "))?;
        writeln!(md, "|---|---|{}", "---|".repeat(header.len()))?;
        for (name, extra) in [
            ("sync", &["dp.mode=sync"][..]),
            (
                "async, max staleness 2",
                &["dp.mode=async", "dp.max_staleness=2"][..],
            ),
            (
                "local SGD, every 4 steps",
                &["dp.mode=local_sgd", "dp.sync_every=4"][..],
            ),
            (
                "sync, top-k 1% + EF",
                &[
                    "dp.mode=sync",
                    "compress.method=topk",
                    "compress.ratio=0.01",
                ][..],
            ),
            (
                "async, top-k 1% + EF",
                &[
                    "dp.mode=async",
                    "compress.method=topk",
                    "compress.ratio=0.01",
                ][..],
            ),
        ] {
            let run_name = name.replace([' ', ',', '%', '+'], "_");
            let mut sets = vec![
                format!("data.path=\"{}\"", args.data),
                "model.preset=small".into(),
                "model.dropout=0.2".into(),
                "train.batch_size=256".into(),
                "train.warmup_steps=50".into(),
                format!("train.epochs={}", args.convergence_epochs),
                "train.patience=0".into(),
                "parallel.dp=2".into(),
                format!("output.dir=\"{}\"", tmp.display()),
                format!("output.name={run_name}"),
            ];
            sets.extend(extra.iter().map(|s| s.to_string()));
            let cfg = config(&sets)?;
            let summary = hybrid::train_local(&cfg, &device, "cpu", None)?;
            let text = std::fs::read_to_string(tmp.join(&run_name).join("metrics.jsonl"))?;
            let ndcg: Vec<f64> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["kind"] == "epoch")
                .filter_map(|v| v["valid"]["ndcg@10"].as_f64())
                .collect();
            let cells: Vec<String> = ndcg.iter().map(|x| format!("{x:.4}")).collect();
            writeln!(
                md,
                "| {name} | {:.0} | {} |",
                summary.samples_per_s,
                cells.join(" | ")
            )?;
            println!(
                "{name}: {:.0} samples/s, valid NDCG@10 {cells:?}",
                summary.samples_per_s
            );
            convergence.push(json!({
                "dp_mode": name,
                "samples_per_s": summary.samples_per_s,
                "valid_ndcg10_per_epoch": ndcg,
                "test": summary.test,
            }));
        }
    }
    let report = json!({
        "measured": true,
        "machine_cores": cores,
        "world": WORLD,
        "warmup_steps": WARMUP,
        "measured_steps": STEPS,
        "rows": rows,
        "convergence": convergence,
    });
    std::fs::write(
        args.out.join("strategies.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("strategies.md"), &md)?;
    println!("\n{md}");
    Ok(())
}
