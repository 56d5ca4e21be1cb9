//! `cargo xtask validate-sim`: the cluster simulator against this machine. For every layout
//! that runs here, the simulator's step time (SIMULATED, from a per-layer profile MEASURED
//! here with `meshrec profile`'s method) next to the step time MEASURED by running it.
//!
//! Modelling choices stated: each layout's profile is measured at that layout's micro-batch
//! size, alone for one device and as `min(world, cores)` copies at once for a mesh (a rank
//! sharing the machine with busy others); with more ranks than cores the times are scaled
//! by `world / cores` (ranks share the cores evenly; idle ranks in a bubble free theirs in
//! reality, which the model ignores); links are the `cpu` preset's modelled shared memory.
//!
//! Writes `validate-sim.json` (`rows`: `layout`, `predicted_s`, `measured_s`, `error`) and
//! `validate-sim.md` into `--out`. `--quick` runs a tiny synthetic model (for CI).

use std::fmt::Write as _;
use std::path::PathBuf;

use meshrec_balance::simulate_spec;
use meshrec_model::device::test_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::measure::measure_layout;
use meshrec_trainer::profile::measure_profile;
use meshrec_trainer::setup::{dataset_model_config, load_dataset};
use meshrec_trainer::simulate::sim_spec;
use serde_json::json;

/// (name, dp, tp, pp, micro-batches, schedule)
const LAYOUTS: [(&str, usize, usize, usize, usize, &str); 8] = [
    ("single device", 1, 1, 1, 1, "1f1b"),
    ("DP 2", 2, 1, 1, 1, "1f1b"),
    ("TP 2", 1, 2, 1, 1, "1f1b"),
    ("PP 2 1F1B", 1, 1, 2, 4, "1f1b"),
    ("PP 2 GPipe", 1, 1, 2, 4, "gpipe"),
    ("DP 2 × TP 2", 2, 2, 1, 1, "1f1b"),
    ("DP 2 × PP 2", 2, 1, 2, 4, "1f1b"),
    ("TP 2 × PP 2", 1, 2, 2, 4, "1f1b"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = PathBuf::from("target/bench");
    let mut quick = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--quick" => quick = true,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    let base: Vec<String> = if quick {
        [
            "data.path=synthetic",
            "data.synthetic.users=200",
            "data.synthetic.items=100",
            "model.preset=tiny",
            "train.batch_size=32",
        ]
        .map(String::from)
        .to_vec()
    } else {
        [
            "data.path=\"data/ml-100k\"",
            "model.preset=small",
            "model.n_heads=4",
            "model.n_layers=4",
            "train.batch_size=128",
        ]
        .map(String::from)
        .to_vec()
    };
    let (warmup, steps) = if quick { (1, 3) } else { (2, 6) };
    let device = test_device().autodiff();
    let single = RunConfig::from_toml("", "validate_sim", &base)?;
    let repeats = if quick { 2 } else { 5 };
    let mut profiles = std::collections::BTreeMap::new();
    let dataset = load_dataset(&single)?;
    let model = dataset_model_config(&single, &dataset)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::new();
    writeln!(
        md,
        "Simulator validation on this machine ({cores} cores): predicted = SIMULATED from per-layer profiles MEASURED here \
         (at each layout's micro-batch size, min(world, cores) copies at once, times scaled by world / cores beyond that); \
         measured = median step of {steps} steps after {warmup} warm-up, local engine.\n"
    )?;
    writeln!(md, "| layout | predicted ms | measured ms | error |")?;
    writeln!(md, "|---|---|---|---|")?;
    let mut rows = Vec::new();
    for (name, dp, tp, pp, m, schedule) in LAYOUTS {
        let mut sets = base.clone();
        sets.extend([
            format!("parallel.dp={dp}"),
            format!("parallel.tp={tp}"),
            format!("parallel.pp={pp}"),
            format!("parallel.micro_batches={m}"),
            format!("parallel.schedule={schedule}"),
        ]);
        let cfg = RunConfig::from_toml("", "validate_sim", &sets)?;
        let world = dp * tp * pp;
        let micro = cfg.train.batch_size / dp / m;
        let copies = world.min(cores);
        let key = (micro, copies);
        let profile = match profiles.entry(key) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(measure_profile(
                &single, &device, micro, 2, repeats, copies,
            )?),
        };
        let shared = profile.scaled((world as f64 / cores as f64).max(1.0))?;
        let spec = sim_spec(&cfg, &model, "cpu", Some(shared))?;
        let predicted = simulate_spec(&spec)?.result.step_s;
        let measured = measure_layout(&cfg, &device, warmup, steps)?.step_s;
        let error = (predicted - measured) / measured;
        writeln!(
            md,
            "| {name} | {:.1} | {:.1} | {:+.1}% |",
            predicted * 1e3,
            measured * 1e3,
            error * 100.0
        )?;
        println!(
            "{name}: predicted {predicted:.4} s, measured {measured:.4} s ({:+.1}%)",
            error * 100.0
        );
        rows.push(json!({
            "layout": name,
            "dp": dp, "tp": tp, "pp": pp, "micro_batches": m, "schedule": schedule,
            "predicted_s": predicted,
            "measured_s": measured,
            "error": error,
        }));
    }
    let mean_abs = rows
        .iter()
        .map(|r| r["error"].as_f64().unwrap_or(0.0).abs())
        .sum::<f64>()
        / rows.len() as f64;
    writeln!(md, "\nmean |error| {:.1}% (target 10%)", mean_abs * 100.0)?;
    let report = json!({
        "predicted": "simulated",
        "measured": "measured",
        "quick": quick,
        "machine_cores": cores,
        "mean_abs_error": mean_abs,
        "rows": rows,
    });
    std::fs::write(
        out.join("validate-sim.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("validate-sim.md"), &md)?;
    println!("\n{md}");
    Ok(())
}
