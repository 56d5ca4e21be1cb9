//! `cargo xtask bench serve`: the serving benchmark. Trains (or reuses) the `small`
//! ml-100k model, prunes it, distills a student, then serves each variant — the baseline
//! (fp32, no batching, one worker), each technique alone, and all together — on loopback
//! and loads it with 1, 16 and 64 closed-loop clients, measuring latency and throughput and,
//! through the served answers themselves, test NDCG@10 and HR@10. A load step 1 -> 64 -> 1
//! shows the autoscaler. Writes `serve.{json,md,svg}` and `serve-autoscale.svg`.
//!
//! Every number here is measured on this machine (client and server share its cores); none
//! is modelled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshrec_serve::loadgen::{self, Arrivals, EvalCase, LoadSpec, Phase, ServedAccuracy};
use meshrec_serve::plot::{self, Series};
use meshrec_serve::{RunningServer, ServeConfig, Service};
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::serving::{self, DistillOptions, PruneOptions, Reduced};
use serde_json::{json, Value};

struct Args {
    out: PathBuf,
    seconds: f64,
    retrain: bool,
    quick: bool,
    /// Weights of a finished run of the same config (no serving metadata needed): adopted
    /// as the teacher instead of training one.
    teacher_weights: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        out: PathBuf::from("target/bench"),
        seconds: 6.0,
        retrain: false,
        quick: false,
        teacher_weights: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(it.next().context("--out needs a folder")?),
            "--seconds" => a.seconds = it.next().context("--seconds needs a number")?.parse()?,
            "--retrain" => a.retrain = true,
            "--quick" => a.quick = true,
            "--teacher-weights" => {
                a.teacher_weights = Some(PathBuf::from(
                    it.next().context("--teacher-weights needs a file")?,
                ))
            }
            other => {
                bail!(
                    "unknown argument `{other}` (--out DIR, --seconds S, --retrain, --quick, \
                     --teacher-weights PATH)"
                )
            }
        }
    }
    Ok(a)
}

/// A served variant: the checkpoint it serves and the serving overrides.
struct Variant {
    name: &'static str,
    checkpoint: PathBuf,
    sets: Vec<String>,
    about: &'static str,
}

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const BATCHING: [&str; 2] = ["batching.max_batch=32", "batching.max_delay_us=2000"];
const ELASTIC: [&str; 6] = [
    "workers.devices=[\"cpu\", \"cpu\", \"cpu\", \"cpu\"]",
    "workers.min_workers=1",
    "workers.max_workers=4",
    "autoscale.enabled=true",
    "autoscale.target_p95_ms=20.0",
    "limits.max_queue=4096",
];

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = args()?;
    let runs = a.out.join("serve-runs");
    std::fs::create_dir_all(&runs)?;
    let device = meshrec_model::device::parse_device("cpu")?.autodiff();
    let mut overrides = vec![
        "output.name=small".to_string(),
        format!("output.dir=\"{}\"", runs.display()),
    ];
    if a.quick {
        overrides.extend(sets(&[
            "data.path=synthetic",
            "data.synthetic.users=200",
            "data.synthetic.items=100",
            "model.preset=tiny",
            "train.epochs=3",
        ]));
    }
    let config = RunConfig::load(Some(Path::new("configs/ml100k.toml")), &overrides)?;
    let dataset = meshrec_trainer::setup::load_dataset(&config)?;

    // 1. The teacher: the shipped `small` recipe, trained once and reused, or a finished
    // run's weights adopted (the config's model, those weights, saved as a serving
    // checkpoint with its metadata and users). The report says which.
    let teacher = runs.join("small/best.safetensors");
    let teacher_source = if let Some(weights) = &a.teacher_weights {
        eprintln!(
            "bench serve: adopting {} as the small model",
            weights.display()
        );
        let (model_config, mut model) =
            meshrec_trainer::setup::build_model(&config, &dataset, &device)?;
        meshrec_trainer::model_io::load_checkpoint(&mut model, weights)?;
        std::fs::create_dir_all(runs.join("small"))?;
        let meta = meshrec_model::checkpoint::CheckpointMeta::new("small", &model_config, &dataset);
        let users = meshrec_model::checkpoint::UserHistories::from_dataset(&dataset);
        meshrec_trainer::model_io::save_checkpoint(&model, &teacher, &meta, Some(&users))?;
        format!("adopted the weights of {}", weights.display())
    } else if a.retrain || !teacher.is_file() {
        eprintln!("bench serve: training the small model (configs/ml100k.toml)");
        meshrec_trainer::train::train(&config, &device, "cpu", None)?;
        "trained here (configs/ml100k.toml)".to_string()
    } else {
        format!(
            "reused from an earlier run of this bench ({})",
            teacher.display()
        )
    };
    // 2. Pruned: a quarter of the heads, half of the MLP channels, a brief fine-tune.
    let prune_options = PruneOptions {
        heads: 0.25,
        channels: 0.5,
        importance_batches: 20,
        finetune_epochs: if a.quick { 1 } else { 3 },
        lr: 5e-4,
    };
    let pruned_path = runs.join("small-pruned.safetensors");
    let pruned =
        serving::prune_checkpoint(&config, &teacher, &prune_options, &pruned_path, &device)?;
    // 3. The lighter model: a one-block student distilled from the teacher (half the depth
    // keeps more accuracy than half the width: a d_model 32 student lost a quarter of NDCG).
    let student_path = runs.join("student.safetensors");
    let mut student_sets = overrides.clone();
    student_sets.extend(sets(&["model.n_layers=1"]));
    if a.quick {
        student_sets.push("model.d_model=8".into());
        student_sets.push("model.d_ff=16".into());
    }
    let student_config = RunConfig::load(Some(Path::new("configs/ml100k.toml")), &student_sets)?;
    let student = serving::distill(
        &student_config,
        &teacher,
        &DistillOptions {
            temperature: 2.0,
            hard: 0.5,
            epochs: if a.quick { 2 } else { 200 },
            lr: 1e-3,
            patience: 20,
        },
        &student_path,
        &device,
    )?;
    // 4. For "all": the student, pruned as the teacher was.
    let student_pruned_path = runs.join("student-pruned.safetensors");
    let student_pruned = serving::prune_checkpoint(
        &student_config,
        &student_path,
        &prune_options,
        &student_pruned_path,
        &device,
    )?;

    let mut all_sets = sets(&BATCHING);
    all_sets.extend(sets(&ELASTIC));
    all_sets.push("model.int8=true".into());
    let variants = vec![
        Variant {
            name: "baseline",
            checkpoint: teacher.clone(),
            sets: vec![],
            about: "fp32, burn kernels, no batching, one worker",
        },
        Variant {
            name: "batching",
            checkpoint: teacher.clone(),
            sets: sets(&BATCHING),
            about: "dynamic batching: max_batch 32, max_delay 2 ms",
        },
        Variant {
            name: "int8",
            checkpoint: teacher.clone(),
            sets: sets(&["model.int8=true"]),
            about: "int8 table and block weights (host kernels), same model",
        },
        Variant {
            name: "host-fp32",
            checkpoint: teacher.clone(),
            sets: sets(&["model.kernels=\"host\""]),
            about: "control: the host kernels in fp32 (separates the kernels from int8)",
        },
        Variant {
            name: "pruned",
            checkpoint: pruned_path.clone(),
            sets: vec![],
            about: "25% of heads, 50% of MLP channels removed, fine-tuned",
        },
        Variant {
            name: "distilled",
            checkpoint: student_path.clone(),
            sets: vec![],
            about: "one-block student (half the depth) from the teacher's softmax",
        },
        Variant {
            name: "elastic",
            checkpoint: teacher.clone(),
            sets: sets(&ELASTIC),
            about: "1-4 workers, autoscaled, least-loaded dispatch",
        },
        Variant {
            name: "all",
            checkpoint: student_pruned_path.clone(),
            sets: all_sets,
            about: "pruned student + int8 + batching + elastic",
        },
    ];

    let cases: Arc<Vec<EvalCase>> = Arc::new(loadgen::test_cases(&dataset));
    let histories: Arc<Vec<Vec<String>>> =
        Arc::new(cases.iter().map(|c| c.history.clone()).collect());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = loadgen::client(128)?;
    let mut rows: Vec<Value> = Vec::new();
    let mut step_samples = Vec::new();
    for v in &variants {
        let config = ServeConfig::from_toml("", v.name, &v.sets)?;
        let server = RunningServer::start(
            Service::from_checkpoint(&v.checkpoint, &config)?,
            "127.0.0.1:0",
        )?;
        let url = server.url();
        eprintln!("bench serve: {} ({}) on {url}", v.name, config.label());
        let accuracy: ServedAccuracy =
            runtime.block_on(loadgen::evaluate(&client, &url, cases.clone(), 8))?;
        for concurrency in [1usize, 16, 64] {
            // A short warm-up at this concurrency (connections, the autoscaler's reaction).
            let warm = LoadSpec {
                url: url.clone(),
                arrivals: Arrivals::Closed { concurrency },
                requests: usize::MAX,
                duration: Duration::from_secs_f64(1.0),
                k: 10,
                seed: 0,
            };
            runtime.block_on(loadgen::run(&client, histories.clone(), &warm))?;
            let spec = LoadSpec {
                duration: Duration::from_secs_f64(a.seconds),
                seed: 1,
                ..warm
            };
            let r = runtime.block_on(loadgen::run(&client, histories.clone(), &spec))?;
            eprintln!(
                "  c={concurrency}: p50 {:.2} p95 {:.2} p99 {:.2} ms, {:.0} req/s, {} errors",
                r.p50_ms, r.p95_ms, r.p99_ms, r.throughput_rps, r.errors
            );
            rows.push(json!({
                "variant": v.name,
                "concurrency": concurrency,
                "p50_ms": r.p50_ms,
                "p95_ms": r.p95_ms,
                "p99_ms": r.p99_ms,
                "throughput_rps": r.throughput_rps,
                "errors": r.errors,
                "requests": r.requests,
                "ndcg@10": accuracy.ndcg10,
                "hr@10": accuracy.hr10,
                "eval_errors": accuracy.errors,
                "config": config.label(),
                "about": v.about,
            }));
        }
        if v.name == "elastic" {
            let phases = [
                Phase {
                    concurrency: 1,
                    seconds: 4.0,
                },
                Phase {
                    concurrency: 64,
                    seconds: 10.0,
                },
                Phase {
                    concurrency: 1,
                    seconds: 10.0,
                },
            ];
            step_samples = runtime.block_on(loadgen::step(
                &client,
                &url,
                histories.clone(),
                &phases,
                Duration::from_millis(250),
            ))?;
        }
        server.shutdown()?;
    }
    write_outputs(
        &a.out,
        &teacher_source,
        &rows,
        &step_samples,
        &[
            ("pruned", &pruned),
            ("distilled", &student),
            ("all (pruned student)", &student_pruned),
        ],
    )
}

fn find<'a>(rows: &'a [Value], variant: &str, concurrency: usize) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["variant"] == variant && r["concurrency"].as_u64() == Some(concurrency as u64))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn write_outputs(
    out: &Path,
    teacher_source: &str,
    rows: &[Value],
    step: &[meshrec_serve::loadgen::StepSample],
    models: &[(&str, &Reduced)],
) -> Result<()> {
    let base16 = find(rows, "baseline", 16).context("no baseline row")?;
    let all16 = find(rows, "all", 16).context("no all row")?;
    let p95_ratio = f(all16, "p95_ms") / f(base16, "p95_ms");
    let tput_ratio = f(all16, "throughput_rps") / f(base16, "throughput_rps");
    let ndcg = |v: &str| find(rows, v, 1).map_or(f64::NAN, |r| f(r, "ndcg@10"));
    let rel = |v: &str| ndcg(v) / ndcg("baseline") - 1.0;
    let mut targets: BTreeMap<String, Value> = BTreeMap::new();
    let mut check = |name: &str, value: f64, met: bool, goal: &str| {
        targets.insert(
            name.into(),
            json!({"value": value, "goal": goal, "met": met}),
        );
    };
    check(
        "all_c16_p95_ratio",
        p95_ratio,
        p95_ratio <= 0.30,
        "<= 0.30x baseline",
    );
    check(
        "all_c16_throughput_ratio",
        tput_ratio,
        tput_ratio >= 3.3,
        ">= 3.3x baseline",
    );
    check(
        "int8_ndcg_rel",
        rel("int8"),
        rel("int8").abs() <= 0.01,
        "within 1% of fp32 (paired)",
    );
    check(
        "pruned_ndcg_rel",
        rel("pruned"),
        rel("pruned") >= -0.02,
        "within 2%",
    );
    check(
        "distilled_ndcg_rel",
        rel("distilled"),
        rel("distilled") >= -0.02,
        "within 2%",
    );
    let workers: Vec<f64> = step.iter().map(|s| s.active_workers).collect();
    let peak = workers.iter().cloned().fold(0.0, f64::max);
    let reached_s = step
        .iter()
        .find(|s| s.concurrency == 64 && s.active_workers >= peak)
        .map_or(f64::NAN, |s| s.t_s - 4.0);
    let last = workers.last().copied().unwrap_or(f64::NAN);
    // Direction changes inside the step's phases: an oscillating autoscaler reverses.
    let reversals = step
        .windows(3)
        .filter(|w| {
            w[0].concurrency == w[2].concurrency
                && ((w[1].active_workers - w[0].active_workers)
                    * (w[2].active_workers - w[1].active_workers))
                    < 0.0
        })
        .count();
    check(
        "autoscaler_step",
        reached_s,
        peak > 1.0 && reached_s <= 5.0 && last <= 1.0 && reversals == 0,
        "reaches its peak within seconds of 1->64, back to 1 after, no reversal",
    );

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "# Serving benchmark (measured on this machine; client and server share its {cores} \
         cores)\n\nThe small model: {teacher_source}.\n\n"
    );
    md.push_str(
        "| variant | clients | p50 ms | p95 ms | p99 ms | req/s | errors | NDCG@10 | HR@10 | p95 vs base | req/s vs base |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let c = r["concurrency"].as_u64().unwrap_or(0) as usize;
        let base = find(rows, "baseline", c).unwrap_or(r);
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.4} | {:.4} | {:.2}x | {:.2}x |\n",
            r["variant"].as_str().unwrap_or(""),
            c,
            f(r, "p50_ms"),
            f(r, "p95_ms"),
            f(r, "p99_ms"),
            f(r, "throughput_rps"),
            r["errors"],
            f(r, "ndcg@10"),
            f(r, "hr@10"),
            f(r, "p95_ms") / f(base, "p95_ms"),
            f(r, "throughput_rps") / f(base, "throughput_rps"),
        ));
    }
    md.push_str("\nVariants:\n\n");
    for r in rows.iter().filter(|r| r["concurrency"].as_u64() == Some(1)) {
        md.push_str(&format!(
            "- `{}` ({}): {}\n",
            r["variant"].as_str().unwrap_or(""),
            r["config"].as_str().unwrap_or(""),
            r["about"].as_str().unwrap_or("")
        ));
    }
    md.push_str("\nReduced models (offline test metrics, and their sources'):\n\n");
    for (name, m) in models {
        md.push_str(&format!(
            "- {name}: {} parameters (from {}), heads {:?}, MLP channels {:?}; test NDCG@10 {:.4} (source {:.4})\n",
            m.params_after,
            m.params_before,
            m.heads,
            m.channels,
            m.test.get("ndcg@10").copied().unwrap_or(f64::NAN),
            m.test_before.get("ndcg@10").copied().unwrap_or(f64::NAN)
        ));
    }
    md.push_str("\nTargets:\n\n");
    for (name, t) in &targets {
        md.push_str(&format!(
            "- {name}: {:.4} (goal {}) — **{}**\n",
            f(t, "value"),
            t["goal"].as_str().unwrap_or(""),
            if t["met"].as_bool() == Some(true) {
                "met"
            } else {
                "missed"
            }
        ));
    }
    md.push_str(&format!(
        "\nAutoscaler load step (1 -> 64 -> 1 clients): peak {peak} workers, reached {reached_s:.2} s after the step, {last} at the end, {reversals} reversals; see serve-autoscale.svg.\n"
    ));
    std::fs::write(out.join("serve.md"), &md)?;
    let json = json!({
        "rows": rows,
        "targets": targets,
        "autoscale_step": step,
        "models": models.iter().map(|(n, m)| (n.to_string(), serde_json::to_value(m).unwrap_or(Value::Null))).collect::<BTreeMap<_, _>>(),
        "measured": "every figure measured on this machine, none modelled",
        "cores": cores,
        "small_model": teacher_source,
    });
    std::fs::write(out.join("serve.json"), serde_json::to_string_pretty(&json)?)?;
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        let n = r["variant"].as_str().unwrap_or("");
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let series: Vec<Series> = names
        .iter()
        .map(|n| Series {
            label: n.to_string(),
            points: rows
                .iter()
                .filter(|r| r["variant"] == *n)
                .map(|r| (f(r, "throughput_rps"), f(r, "p95_ms")))
                .collect(),
        })
        .collect();
    plot::latency_throughput(
        &out.join("serve.svg"),
        "p95 latency against throughput (1, 16, 64 clients)",
        "p95 latency (ms)",
        &series,
    )?;
    if !step.is_empty() {
        plot::load_step(
            &out.join("serve-autoscale.svg"),
            "autoscaler under a load step 1 -> 64 -> 1",
            step,
        )?;
    }
    print!("{md}");
    Ok(())
}
