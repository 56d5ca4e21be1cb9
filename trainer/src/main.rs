//! The `meshrec` command line: train, eval and the training-throughput benchmark.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshrec_model::data::{EvalSet, EvalSplit};
use meshrec_model::device::parse_device;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::{hybrid, run};

#[derive(Parser)]
#[command(
    name = "meshrec",
    about = "Hybrid-parallel training of transformer recommenders",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// The run's TOML configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides, `section.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// `cpu`, `wgpu`, `cuda` or `cuda:N`; beats `train.device` in the config.
    #[arg(long, env = "BURN_DEVICE")]
    device: Option<String>,
    /// `local` (threads) or `mpi` (processes under `mpirun`); beats `parallel.comm`.
    #[arg(long)]
    comm: Option<String>,
    /// Draw three steps of every rank's timeline into the run folder (`timeline.svg`).
    #[arg(long)]
    timeline: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Continue from a checkpoint: its folder, a `checkpoints` folder (its latest) or a run
    /// folder. The layout may differ from the one that saved it.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train to convergence and report test metrics.
    Train(TrainArgs),
    /// Evaluate a saved checkpoint on the valid and test splits.
    Eval {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// Measure single-device training throughput (steps only, after warm-up).
    Bench {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn setup(common: &Common) -> anyhow::Result<(RunConfig, burn::tensor::Device, String)> {
    let mut overrides = common.set.clone();
    if let Some(comm) = &common.comm {
        overrides.push(format!("parallel.comm={comm}"));
    }
    if common.timeline {
        overrides.push("output.timeline_steps=3".into());
    }
    let config = RunConfig::load(common.config.as_deref(), &overrides)?;
    let name = common
        .device
        .clone()
        .unwrap_or_else(|| config.train.device.clone());
    let device = parse_device(&name)?.autodiff();
    Ok((config, device, name))
}

fn print_table(
    title: &str,
    valid: &std::collections::BTreeMap<String, f64>,
    test: &std::collections::BTreeMap<String, f64>,
) {
    println!("{title}");
    println!(
        "| split | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR@5 | MRR@10 | MRR@20 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, m) in [("valid", valid), ("test", test)] {
        let cells: Vec<String> = ["hr", "ndcg", "mrr"]
            .iter()
            .flat_map(|k| {
                [5, 10, 20].map(|c| {
                    format!(
                        "{:.4}",
                        m.get(&format!("{k}@{c}")).copied().unwrap_or(f64::NAN)
                    )
                })
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(TrainArgs { common, resume }) => {
            let (config, device, name) = setup(&common)?;
            let resume = resume.as_deref();
            let summary = match (config.parallel.comm.as_str(), config.parallel.world_size()) {
                ("local", 1) => run::train(&config, &device, &name, resume)?,
                ("local", _) => hybrid::train_local(&config, &device, &name, resume)?,
                _ => match hybrid::train_mpi(&config, &device, &name, resume)? {
                    Some(summary) => summary,
                    // Only world rank 0 reports.
                    None => return Ok(()),
                },
            };
            print_table(
                &format!(
                    "{} on {}: best epoch {} of {}, {:.0} samples/s",
                    summary.preset,
                    summary.dataset,
                    summary.best_epoch,
                    summary.epochs_run,
                    summary.samples_per_s
                ),
                &summary.valid,
                &summary.test,
            );
            println!("run files: {}", config.run_dir().display());
        }
        Command::Eval { common, checkpoint } => {
            let (config, device, _) = setup(&common)?;
            let dataset = run::load_dataset(&config)?;
            let (model_config, mut model) = run::build_model(&config, &dataset, &device)?;
            run::load_checkpoint(&mut model, &checkpoint)?;
            let eval = |split| {
                let set = EvalSet::new(&dataset, model_config.max_len, split);
                run::evaluate(&model, &set, config.eval.batch_size, &device).report()
            };
            print_table(
                &format!("checkpoint {}", checkpoint.display()),
                &eval(EvalSplit::Valid),
                &eval(EvalSplit::Test),
            );
        }
        Command::Bench {
            common,
            warmup,
            steps,
            json,
        } => {
            let (config, device, _) = setup(&common)?;
            let th = run::measure_throughput(&config, &device, warmup, steps)?;
            let report = serde_json::json!({
                "samples_per_s": th.samples_per_s(),
                "tokens_per_s": th.tokens_per_s(),
                "preset": config.model.preset,
                "batch": config.train.batch_size,
                "steps": th.steps,
                "forward_backward_s_per_step": th.forward_backward_s / th.steps.max(1) as f64,
                "optimizer_s_per_step": th.optimizer_s / th.steps.max(1) as f64,
                "threads": rayon_threads(),
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            if let Some(path) = json {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
