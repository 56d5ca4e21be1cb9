//! `cargo xtask soak`: the fault soak of elastic training. Each trial trains the tiny model
//! on the synthetic data with `[elastic]` on and kills one rank at a random step — on the
//! local engine by an injected error, panic or hang (mid-step while the peers sit in the
//! all-reduce, after the rank's update, or while a checkpoint is written), under
//! `meshrec launch` by SIGKILL of one `mpirun` process — and records whether the loss was
//! detected, how fast, how the run ended, whether it hung (no end within the trial's
//! bound), whether every checkpoint it left verifies, and its final valid NDCG@10 against
//! the uninterrupted run's. Writes `target/bench/soak.{json,md}`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cmd::{bench_dir, cargo, run, target_dir};

/// A trial that has not ended by then hung.
const TRIAL_BOUND: Duration = Duration::from_secs(240);
/// `elastic.timeout_s` of every trial.
const TIMEOUT_S: f64 = 2.0;
/// Seeds of the uninterrupted runs whose spread is the run-to-run noise.
const NOISE_SEEDS: [u64; 3] = [0, 1, 2];

/// The layouts trials draw from: (name, world size, `--set`s).
const LAYOUTS: [(&str, usize, &[&str]); 3] = [
    (
        "dp2·pp2",
        4,
        &["parallel.dp=2", "parallel.pp=2", "parallel.micro_batches=2"],
    ),
    ("dp3", 3, &["parallel.dp=3"]),
    ("dp2·tp2", 4, &["parallel.dp=2", "parallel.tp=2"]),
];

pub struct SoakOptions {
    pub trials: usize,
    pub mpi_trials: usize,
    pub seed: u64,
}

/// One trial's record (the JSON keys the issue names, and a few more).
struct Trial {
    engine: &'static str,
    layout: &'static str,
    fault: String,
    rank: usize,
    step: u64,
    detected: bool,
    hang: bool,
    detect_s: Option<f64>,
    recovery_s: Option<f64>,
    /// The run's median step time (from its `metrics.jsonl`), the unit recovery is held to.
    step_s: Option<f64>,
    outcome: String,
    checkpoint_ok: bool,
    ndcg10: Option<f64>,
    ndcg10_uninterrupted: Option<f64>,
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "engine": self.engine, "layout": self.layout, "fault": self.fault,
            "rank": self.rank, "step": self.step, "detected": self.detected,
            "hang": self.hang, "detect_s": self.detect_s, "recovery_s": self.recovery_s,
            "step_s": self.step_s,
            "outcome": self.outcome, "checkpoint_ok": self.checkpoint_ok,
            "ndcg10": self.ndcg10, "ndcg10_uninterrupted": self.ndcg10_uninterrupted,
        })
    }
}

/// The `meshrec train` arguments of a tiny elastic run named `name` under `out`.
fn train_args(out: &Path, name: &str, sets: &[String]) -> Vec<String> {
    let mut args = vec!["train".to_string()];
    let base = [
        "data.path=synthetic",
        "data.synthetic.users=60",
        "data.synthetic.items=200",
        "model.preset=tiny",
        // The shipped recipe's dropout: masks are keyed by DP rank, so a run whose
        // membership changed leaves the uninterrupted trajectory and its final NDCG@10
        // is compared with the seed-to-seed noise, not matched by construction.
        "model.dropout=0.2",
        "train.epochs=3",
        "train.batch_size=16",
        "train.patience=0",
        "train.seed=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep=20",
        "elastic.enabled=true",
    ];
    let owned = base.iter().map(|s| s.to_string()).chain([
        format!("elastic.timeout_s={TIMEOUT_S}"),
        format!("output.dir=\"{}\"", out.display()),
        format!("output.name={name}"),
    ]);
    for set in owned.chain(sets.iter().cloned()) {
        args.extend(["--set".to_string(), set]);
    }
    args
}

/// Waits for `child` at most until `deadline`; kills it (and its process group) after.
fn wait_bounded(child: &mut Child, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-9", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Every step's time of a run, from its step lines (`16 / samples_per_s`).
fn step_times(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["samples_per_s"].as_f64())
        .map(|r| 16.0 / r)
        .collect()
}

/// The median step time of a run.
fn median_step_s(run: &Path) -> Option<f64> {
    let mut times = step_times(run);
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

fn valid_ndcg(run: &Path) -> Option<f64> {
    read_json(&run.join("summary.json"))?["valid"]["ndcg@10"].as_f64()
}

/// Every finished checkpoint of the run verifies (`meshrec diff` reads both sides through
/// the SHA-256 check); leftovers of a write that died are not checkpoints and are ignored.
fn checkpoints_verify(meshrec: &Path, run: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else {
        return true;
    };
    entries.flatten().all(|e| {
        let dir = e.path();
        !dir.join("manifest.json").is_file()
            || Command::new(meshrec)
                .arg("diff")
                .arg(&dir)
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })
}

/// The uninterrupted runs of a layout: valid NDCG@10 of seed 0 (the trials' seed) and
/// the standard deviation over [`NOISE_SEEDS`], the run-to-run noise.
#[derive(Debug, Clone, Copy)]
struct Reference {
    ndcg10: f64,
    noise: f64,
    /// Steps of the run: faults are drawn below it.
    steps: u64,
}

/// The uninterrupted runs of every layout (local engine).
fn references(meshrec: &Path, out: &Path) -> Result<Vec<Reference>> {
    let mut refs = Vec::new();
    for (name, _, sets) in LAYOUTS {
        let mut ndcg = Vec::new();
        let mut steps = 0;
        for seed in NOISE_SEEDS {
            let run_name = format!("reference-{}-seed{seed}", name.replace('·', "-"));
            let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            sets.push(format!("train.seed={seed}"));
            run(Command::new(meshrec)
                .args(train_args(out, &run_name, &sets))
                .stdout(Stdio::null())
                .stderr(Stdio::null()))?;
            ndcg.push(valid_ndcg(&out.join(&run_name)).context("the reference wrote no summary")?);
            if seed == NOISE_SEEDS[0] {
                steps = step_times(&out.join(&run_name)).len() as u64;
            }
        }
        let mean = ndcg.iter().sum::<f64>() / ndcg.len() as f64;
        let var = ndcg.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (ndcg.len() - 1) as f64;
        if steps < 12 {
            bail!("the uninterrupted {name} run took {steps} steps: too few to place faults in");
        }
        refs.push(Reference {
            ndcg10: ndcg[0],
            noise: var.sqrt(),
            steps,
        });
    }
    Ok(refs)
}

fn local_trial(
    meshrec: &Path,
    out: &Path,
    i: usize,
    rng: &mut StdRng,
    refs: &[Reference],
) -> Result<Trial> {
    let l = rng.random_range(0..LAYOUTS.len());
    let (layout, world, sets) = LAYOUTS[l];
    let kind = ["error", "panic", "hang"][rng.random_range(0..3)];
    // A hang is found by its stalled progress once its phase has been measured (from the
    // second step); a checkpoint is written every second step.
    let point = match kind {
        "hang" => ["mid_step", "after_update"][rng.random_range(0..2)],
        _ => ["mid_step", "after_update", "checkpoint"][rng.random_range(0..3)],
    };
    let steps = refs[l].steps;
    let step = match point {
        "checkpoint" => 2 * rng.random_range(1..steps / 2),
        _ if kind == "hang" => rng.random_range(3..steps),
        _ => rng.random_range(1..steps),
    };
    let rank = rng.random_range(0..world);
    let name = format!("trial-{i}");
    let mut all: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    all.extend([
        format!("fault.crash_step={step}"),
        format!("fault.crash_rank={rank}"),
        format!("fault.crash_kind=\"{kind}\""),
        format!("fault.crash_at=\"{point}\""),
    ]);
    let log = std::fs::File::create(out.join(format!("{name}.log")))?;
    let mut child = Command::new(meshrec)
        .args(train_args(out, &name, &all))
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let status = wait_bounded(&mut child, Instant::now() + TRIAL_BOUND)?;
    let run_dir = out.join(&name);
    let summary = read_json(&run_dir.join("summary.json"));
    let event = summary
        .as_ref()
        .and_then(|s| s["membership"].get(0).cloned());
    let outcome = match (status, &summary) {
        (None, _) => "hung".to_string(),
        (Some(s), Some(sum)) if s.success() && sum["epochs_run"] == 3 => "continued".into(),
        (Some(s), _) => format!("stopped with an error ({s})"),
    };
    Ok(Trial {
        engine: "local",
        layout,
        fault: format!("{kind} at {point}"),
        rank,
        step,
        detected: event.is_some(),
        hang: status.is_none(),
        detect_s: event.as_ref().and_then(|e| e["detect_s"].as_f64()),
        recovery_s: event.as_ref().and_then(|e| e["recovery_s"].as_f64()),
        step_s: median_step_s(&run_dir),
        outcome,
        checkpoint_ok: checkpoints_verify(meshrec, &run_dir),
        ndcg10: valid_ndcg(&run_dir),
        ndcg10_uninterrupted: refs.get(l).map(|r| r.ndcg10),
    })
}

/// Under `meshrec launch`: SIGKILL one process once its health file shows the chosen step.
fn mpi_trial(
    meshrec: &Path,
    out: &Path,
    i: usize,
    rng: &mut StdRng,
    refs: &[Reference],
) -> Result<Trial> {
    let (layout, world, sets) = LAYOUTS[0];
    let rank = rng.random_range(0..world);
    let step = rng.random_range(2..refs[0].steps - 10);
    let name = format!("mpi-trial-{i}");
    let run_dir = out.join(&name);
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    // Steps of a few milliseconds would outrun the health files (written every tenth of
    // the timeout) by which the kill finds its step: a straggler paces them.
    sets.extend(["fault.slow_ms=40".into(), "fault.slow_rank=0".into()]);
    let log = std::fs::File::create(out.join(format!("{name}.log")))?;
    let mut child = Command::new(meshrec)
        .arg("launch")
        .arg("--")
        .args(train_args(out, &name, &sets))
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let deadline = Instant::now() + TRIAL_BOUND;
    let health = run_dir.join("health").join(format!("rank{rank}.json"));
    let mut killed_at = None;
    while killed_at.is_none() && Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            break;
        }
        if let Some(h) = read_json(&health).filter(|h| h["step"].as_u64() >= Some(step)) {
            let pid = h["pid"].as_u64().context("a health file without a pid")?;
            run(Command::new("kill").args(["-9", &pid.to_string()]))?;
            killed_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Detected once the supervisor has recorded the attempt's end.
    let mut detect_s = None;
    while let (Some(at), None) = (killed_at, detect_s) {
        let ended = read_json(&run_dir.join("launch.json"))
            .is_some_and(|r| r["attempts"].as_array().is_some_and(|a| !a.is_empty()));
        if ended {
            detect_s = Some(at.elapsed().as_secs_f64());
        } else if Instant::now() >= deadline || child.try_wait()?.is_some() {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = wait_bounded(&mut child, deadline)?;
    let report = read_json(&run_dir.join("launch.json"));
    let attempts = report
        .as_ref()
        .and_then(|r| r["attempts"].as_array().cloned())
        .unwrap_or_default();
    let outcome = match status {
        None => "hung".to_string(),
        Some(_) if killed_at.is_none() => "not killed: the job ended before the step".into(),
        Some(s) if s.success() => format!(
            "restarted from the newest checkpoint ({} attempts)",
            attempts.len()
        ),
        Some(s) => format!("stopped with an error ({s})"),
    };
    Ok(Trial {
        engine: "mpi",
        layout,
        fault: "SIGKILL".into(),
        rank,
        step,
        detected: attempts.len() >= 2 || killed_at.is_none(),
        hang: status.is_none(),
        detect_s,
        recovery_s: None,
        step_s: median_step_s(&run_dir),
        outcome,
        checkpoint_ok: checkpoints_verify(meshrec, &run_dir),
        ndcg10: valid_ndcg(&run_dir),
        // The local engine's uninterrupted run: CI holds MPI and local runs equal.
        ndcg10_uninterrupted: refs.first().map(|r| r.ndcg10),
    })
}

pub fn soak(options: &SoakOptions) -> Result<()> {
    let mut build = cargo();
    build.args(["build", "-p", "meshrec-trainer", "--bin", "meshrec"]);
    if options.mpi_trials > 0 {
        build.args(["--features", "mpi"]);
    }
    run(&mut build)?;
    let meshrec = target_dir().join("debug/meshrec");
    let out = bench_dir().join("soak-runs");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let refs = references(&meshrec, &out)?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut trials = Vec::new();
    for i in 0..options.trials {
        let t = local_trial(&meshrec, &out, i, &mut rng, &refs)?;
        eprintln!(
            "soak: trial {i} {} {} rank {} step {}: {} (detect {:?} s)",
            t.layout, t.fault, t.rank, t.step, t.outcome, t.detect_s
        );
        trials.push(t);
    }
    for i in 0..options.mpi_trials {
        let t = mpi_trial(&meshrec, &out, i, &mut rng, &refs)?;
        eprintln!(
            "soak: mpi trial {i} rank {} step {}: {} (detect {:?} s)",
            t.rank, t.step, t.outcome, t.detect_s
        );
        trials.push(t);
    }
    write_report(&trials, &refs, options)?;
    let bad: Vec<String> = trials
        .iter()
        .enumerate()
        .filter(|(_, t)| t.hang || !t.checkpoint_ok || !t.detected)
        .map(|(i, t)| format!("trial {i} ({} {}): {}", t.engine, t.fault, t.outcome))
        .collect();
    if !bad.is_empty() {
        bail!(
            "soak: {} trial(s) hung, went undetected or left a bad checkpoint: {}",
            bad.len(),
            bad.join("; ")
        );
    }
    Ok(())
}

fn write_report(trials: &[Trial], refs: &[Reference], options: &SoakOptions) -> Result<()> {
    let n = trials.len();
    let count = |f: &dyn Fn(&Trial) -> bool| trials.iter().filter(|t| f(t)).count();
    let detect: Vec<f64> = trials.iter().filter_map(|t| t.detect_s).collect();
    let max_detect = detect.iter().copied().fold(0.0, f64::max);
    let local_detect_over =
        count(&|t| t.engine == "local" && t.detect_s.is_some_and(|d| d > TIMEOUT_S));
    let recovery_steps: Vec<f64> = trials
        .iter()
        .filter_map(|t| Some(t.recovery_s? / t.step_s?))
        .collect();
    let max_recovery_steps = recovery_steps.iter().copied().fold(0.0, f64::max);
    let deltas: Vec<f64> = trials
        .iter()
        .filter_map(|t| Some(t.ndcg10? - t.ndcg10_uninterrupted?))
        .collect();
    let mean_abs_delta = deltas.iter().map(|d| d.abs()).sum::<f64>() / deltas.len().max(1) as f64;
    let summary = json!({
        "trials": n, "seed": options.seed, "timeout_s": TIMEOUT_S,
        "hangs": count(&|t| t.hang),
        "undetected": count(&|t| !t.detected),
        "corrupt_checkpoints": count(&|t| !t.checkpoint_ok),
        "continued": count(&|t| t.outcome == "continued" || t.outcome.starts_with("restarted")),
        "max_detect_s": max_detect,
        "max_recovery_in_step_times": max_recovery_steps,
        "local_detections_over_timeout": local_detect_over,
        "mean_abs_ndcg10_delta": mean_abs_delta,
        "uninterrupted": LAYOUTS.iter().zip(refs).map(|((n, _, _), r)| json!({
            "layout": n, "ndcg10": r.ndcg10, "noise_std": r.noise, "seeds": NOISE_SEEDS,
        })).collect::<Vec<_>>(),
    });
    let doc =
        json!({ "summary": summary, "trials": trials.iter().map(Trial::json).collect::<Vec<_>>() });
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&doc)?)?;
    let noise = LAYOUTS
        .iter()
        .zip(refs)
        .map(|((n, _, _), r)| format!("{n} {:.4}", r.noise))
        .collect::<Vec<_>>()
        .join(", ");
    let mut md = format!(
        "# Elastic soak ({n} trials, seed {}, elastic.timeout_s {TIMEOUT_S})\n\n\
         hangs {}, undetected {}, corrupt checkpoints {}, continued {}, slowest detection {max_detect:.2} s, \
         slowest local recovery {max_recovery_steps:.2} step times, \
         local detections over the timeout {local_detect_over}, mean |valid NDCG@10 − uninterrupted| {mean_abs_delta:.4} \
         (run-to-run noise, std over seeds {NOISE_SEEDS:?}: {noise})\n\n\
         | # | engine | layout | fault | rank | step | detected | detect s | recovery s | step s | outcome | checkpoints | NDCG@10 | uninterrupted |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        options.seed,
        count(&|t| t.hang),
        count(&|t| !t.detected),
        count(&|t| !t.checkpoint_ok),
        count(&|t| t.outcome == "continued" || t.outcome.starts_with("restarted")),
    );
    let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.3}"));
    for (i, t) in trials.iter().enumerate() {
        md.push_str(&format!(
            "| {i} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.engine,
            t.layout,
            t.fault,
            t.rank,
            t.step,
            t.detected,
            f(t.detect_s),
            f(t.recovery_s),
            f(t.step_s),
            t.outcome,
            if t.checkpoint_ok { "ok" } else { "CORRUPT" },
            f(t.ndcg10),
            f(t.ndcg10_uninterrupted)
        ));
    }
    std::fs::write(dir.join("soak.md"), md)?;
    eprintln!("soak: wrote {}", dir.join("soak.{json,md}").display());
    Ok(())
}
