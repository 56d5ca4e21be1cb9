//! The `meshrec` command line: train (one device or a mesh, resumable), eval, report,
//! profile, simulate, plan, the training-throughput benchmark, and serving (serve, loadgen,
//! prune, distill; in `serve_cmd`).

mod serve_cmd;

/// Counts the heap so that each step's transient memory is measured (`metrics.jsonl`).
#[global_allocator]
static HEAP: meshrec_trainer::heap::CountingAlloc = meshrec_trainer::heap::CountingAlloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshrec_model::data::{EvalSet, EvalSplit};
use meshrec_model::device::{describe, parse_device, Residency};
use meshrec_trainer::checkpoint;
use meshrec_trainer::checkpoint_shard;
use meshrec_trainer::config::RunConfig;
use meshrec_trainer::error::RunError;
use meshrec_trainer::model_io::{evaluate, load_checkpoint};
use meshrec_trainer::setup::{build_model, dataset_model_config, load_dataset};
use meshrec_trainer::{elastic, hybrid, measure, profile, report, simulate, train};

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
    /// Run `meshrec train` under `mpirun` with a supervisor that restarts the job from its
    /// newest checkpoint with the surviving world when a process dies or hangs
    /// (`[elastic]`: min_dp, timeout_s, max_restarts), torchrun-style.
    Launch {
        /// Ignored (the processes are `parallel.dp × tp × pp`); accepted for mpirun habits.
        #[arg(long = "np", short = 'n')]
        np: Option<usize>,
        /// The mpirun command and its options before `-np`.
        #[arg(long, default_value = "mpirun --allow-run-as-root --oversubscribe")]
        mpirun: String,
        /// `train` and its arguments.
        #[arg(last = true, required = true)]
        train: Vec<String>,
    },
    /// Evaluate a saved checkpoint on the valid and test splits.
    Eval {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// Measure the model's per-layer costs (embedding, blocks, head) on this backend: the
    /// profile `simulate --profile` and the balancer read.
    Profile {
        #[command(flatten)]
        common: Common,
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 32)]
        micro_batch: usize,
        /// Timed repeats (after two untimed).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Copies measured at once (the ranks sharing this machine); their mean is kept.
        #[arg(long, default_value_t = 1)]
        copies: usize,
        /// Write the profile as JSON here (default: the run folder's `profile.json`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Simulate one training step of the configured layout on a modelled cluster
    /// (SIMULATED: roofline compute or a measured profile, alpha-beta links).
    Simulate {
        #[command(flatten)]
        common: Common,
        /// Cluster preset: cpu, a100x8, h100x8, v100x8, a100+v100x8.
        #[arg(long, default_value = "cpu")]
        cluster: String,
        /// Devices in the cluster (default: dp × tp × pp).
        #[arg(long)]
        devices: Option<usize>,
        /// A profile from `meshrec profile` instead of the roofline model.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Draw the simulated timeline as SVG here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Rank DP × TP × PP layouts, schedules, micro-batch counts and compressors that fit in
    /// memory by simulated throughput, and explain the winner (SIMULATED).
    Plan {
        /// Planning preset (100m, 1b); or give --config to plan the run's own model.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        devices: usize,
        /// Cluster preset: a100x8, h100x8, v100x8, a100+v100x8, cpu.
        #[arg(long)]
        cluster: String,
        /// Sequences per step over the whole job.
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Layouts listed.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Also try compressors whose measured accuracy cost fails the bar (or was never
        /// measured): see balance/data/compression_accuracy.json.
        #[arg(long)]
        allow_lossy: bool,
    },
    /// Compare the parameters of two checkpoints (each a checkpoint, a `checkpoints`
    /// folder or a run folder): the largest relative and absolute difference, as JSON.
    Diff { a: PathBuf, b: PathBuf },
    /// A run's loss and validation curves (SVG and PNG in its folder) and its summary.
    Report {
        /// The run's folder (`runs/<output.name>`).
        run: PathBuf,
    },
    /// Serve recommendations from a checkpoint over HTTP (POST /v1/recommend, GET /healthz,
    /// GET /metrics); SIGTERM drains accepted requests, then exits.
    Serve(serve_cmd::ServeArgs),
    /// Load a running service on loopback (closed or open loop, a load step, served
    /// accuracy): p50/p95/p99, throughput, errors, an SVG.
    Loadgen(serve_cmd::LoadgenArgs),
    /// Remove attention heads and MLP channels by measured importance, fine-tune briefly,
    /// and save the smaller model as a serving checkpoint.
    Prune {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        checkpoint: PathBuf,
        /// Fraction of all attention heads removed.
        #[arg(long, default_value_t = 0.25)]
        heads: f64,
        /// Fraction of each block's MLP channels removed.
        #[arg(long, default_value_t = 0.5)]
        channels: f64,
        /// Training batches the importance is measured on.
        #[arg(long, default_value_t = 20)]
        importance_batches: usize,
        /// Fine-tuning epochs (the best by valid NDCG@10 is kept).
        #[arg(long, default_value_t = 3)]
        epochs: u64,
        #[arg(long, default_value_t = 5e-4)]
        lr: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a smaller student (the config's [model], e.g. --set model.n_layers=1) from a
    /// trained teacher's catalogue-wide softmax, and save it as a serving checkpoint.
    Distill {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long, default_value_t = 2.0)]
        temperature: f32,
        /// Weight of the true next item's cross-entropy; the rest is the teacher's.
        #[arg(long, default_value_t = 0.5)]
        hard: f32,
        #[arg(long, default_value_t = 200)]
        epochs: u64,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Epochs without a better valid NDCG@10 before stopping (0: never).
        #[arg(long, default_value_t = 20)]
        patience: u64,
        #[arg(long)]
        out: PathBuf,
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
    tracing::info!(
        device = %name,
        adapter = %describe(&device),
        residency = ?Residency::for_device(&device),
        "device chosen (a single-device step keeps its loss and AdamW where `residency` says)"
    );
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

/// `meshrec launch`: the train arguments parsed as `meshrec train` would, then the job run
/// under the supervisor.
fn launch(np: Option<usize>, mpirun: &str, train: Vec<String>) -> anyhow::Result<()> {
    let args = std::iter::once("meshrec".to_string()).chain(train.iter().cloned());
    let Command::Train(TrainArgs { common, resume }) = Cli::try_parse_from(args)?.command else {
        anyhow::bail!("launch: the arguments after `--` must be `train ...`");
    };
    anyhow::ensure!(
        resume.is_none(),
        "launch: --resume is the supervisor's to give (it resumes from the newest checkpoint)"
    );
    if common.comm.as_deref().is_some_and(|c| c != "mpi") {
        anyhow::bail!("launch: runs the job on MPI; drop --comm");
    }
    let (config, _, _) = setup(&common)?;
    if !config.elastic.enabled {
        anyhow::bail!("launch: needs elastic.enabled = true in the config or --set");
    }
    let world = config.parallel.world_size();
    if let Some(n) = np.filter(|n| *n != world) {
        anyhow::bail!(
            "launch: -np {n} but [parallel] dp {} × tp {} × pp {} is {world} processes",
            config.parallel.dp,
            config.parallel.tp,
            config.parallel.pp
        );
    }
    let options = elastic::LaunchOptions {
        exe: std::env::current_exe()?,
        mpirun: mpirun.split_whitespace().map(str::to_string).collect(),
        train_args: train.into_iter().skip(1).collect(),
    };
    let report = elastic::launch(&options, &config)?;
    println!(
        "launch: finished after {} attempt(s); report in {}",
        report.attempts.len(),
        config.run_dir().join("launch.json").display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Every rank of an MPI job meets some errors alike: rank 0 alone reports them.
            if !matches!(
                e.downcast_ref::<RunError>(),
                Some(RunError::ReportedByLeader)
            ) {
                eprintln!("Error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// A training step allocates and frees the same large buffers (activations, gradients, loss
/// chunks) every step. By default glibc serves each from a fresh `mmap` and unmaps it when
/// freed, so the kernel faults in and zeroes its pages again every step, and trims the heap
/// top after frees; keeping those buffers in the heap makes the next step reuse them. The
/// process then holds its peak heap (what the next step needs anyway).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_step_buffers_in_the_heap() {
    // SAFETY: mallopt only changes allocator parameters; called once, before any thread.
    unsafe {
        // glibc's largest mmap threshold (32 MiB on 64-bit); above it a buffer is mapped.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_step_buffers_in_the_heap() {}

fn run() -> anyhow::Result<()> {
    keep_step_buffers_in_the_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal shows them, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Train(TrainArgs { common, resume }) => {
            let (config, device, name) = setup(&common)?;
            let resume = resume.as_deref();
            let summary = match (config.parallel.comm.as_str(), config.uses_mesh_executor()) {
                ("local", false) => train::train(&config, &device, &name, resume)?,
                ("local", true) if config.elastic.enabled => {
                    elastic::train_elastic_local(&config, &device, &name, resume)?
                }
                ("local", true) => hybrid::train_local(&config, &device, &name, resume)?,
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
        Command::Launch { np, mpirun, train } => launch(np, &mpirun, train)?,
        Command::Eval { common, checkpoint } => {
            let (config, device, _) = setup(&common)?;
            let dataset = load_dataset(&config)?;
            let (model_config, mut model) = build_model(&config, &dataset, &device)?;
            load_checkpoint(&mut model, &checkpoint)?;
            let eval = |split| {
                let set = EvalSet::new(&dataset, model_config.max_len, split);
                evaluate(&model, &set, config.eval.batch_size, &device).report()
            };
            print_table(
                &format!("checkpoint {}", checkpoint.display()),
                &eval(EvalSplit::Valid),
                &eval(EvalSplit::Test),
            );
        }
        Command::Profile {
            common,
            micro_batch,
            repeats,
            copies,
            out,
        } => {
            let (config, device, _) = setup(&common)?;
            let profile =
                profile::measure_profile(&config, &device, micro_batch, 2, repeats, copies)?;
            print!("{}", profile::render(&profile));
            let path = out.unwrap_or_else(|| config.run_dir().join("profile.json"));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&path, serde_json::to_string_pretty(&profile)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("profile written to {}", path.display());
        }
        Command::Simulate {
            common,
            cluster,
            devices,
            profile,
            svg,
        } => {
            let (config, _, _) = setup(&common)?;
            let dataset = load_dataset(&config)?;
            let model = dataset_model_config(&config, &dataset)?;
            let profile = match profile {
                Some(path) => Some(
                    serde_json::from_str(
                        &std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("parsing profile {}", path.display()))?,
                ),
                None => None,
            };
            let mut spec = simulate::sim_spec(&config, &model, &cluster, profile)?;
            spec.devices = devices;
            let report = meshrec_balance::simulate_spec(&spec)?;
            print!("{}", report.render());
            if let Some(path) = svg {
                report.write_timeline(&path)?;
                println!("simulated timeline written to {}", path.display());
            }
        }
        Command::Plan {
            model,
            config,
            devices,
            cluster,
            batch,
            top,
            allow_lossy,
        } => {
            let mut request = match (model, config) {
                (Some(name), None) => {
                    meshrec_balance::PlanRequest::from_names(&name, &cluster, devices, batch)?
                }
                (None, Some(path)) => {
                    let config = RunConfig::load(Some(&path), &[])?;
                    let dataset = load_dataset(&config)?;
                    let model = dataset_model_config(&config, &dataset)?;
                    meshrec_balance::PlanRequest::new(
                        model.shape(&config.model.preset),
                        meshrec_balance::Cluster::preset(&cluster, devices)?,
                        devices,
                        batch,
                    )
                }
                _ => anyhow::bail!("give exactly one of --model (a planning preset) or --config"),
            };
            request.allow_lossy = allow_lossy;
            let plan = meshrec_balance::plan(&request)?;
            print!("{}", meshrec_balance::plan::render_report(&plan, top));
        }
        Command::Diff { a, b } => {
            let (_, _, sa) = checkpoint_shard::load(&a)?;
            let (b_dir, _, sb) = checkpoint_shard::load(&b)?;
            let diff = checkpoint::param_diff(&sa, &sb, &b_dir)?;
            println!("{}", serde_json::to_string(&diff)?);
        }
        Command::Report { run } => {
            let curves = report::read_curves(&run)?;
            let title = format!("{}", run.display());
            let written = report::draw(&run, &title, &curves)?;
            print!("{}", report::summary_text(&run)?);
            println!("curves: {}", written.svg.display());
            println!("curves: {}", written.png.display());
            if !written.png_has_text {
                println!("no sans-serif system font: the PNG has no text (apt-get install fonts-dejavu-core)");
            }
        }
        Command::Serve(args) => serve_cmd::serve(args)?,
        Command::Loadgen(args) => serve_cmd::loadgen(args)?,
        Command::Prune {
            common,
            checkpoint,
            heads,
            channels,
            importance_batches,
            epochs,
            lr,
            out,
        } => {
            let (config, device, _) = setup(&common)?;
            let options = serve_cmd::prune_options(heads, channels, importance_batches, epochs, lr);
            let reduced =
                serve_cmd::prune_checkpoint(&config, &checkpoint, &options, &out, &device)?;
            serve_cmd::print_reduced("pruned", &reduced);
            serve_cmd::write_reduced(&reduced)?;
        }
        Command::Distill {
            common,
            teacher,
            temperature,
            hard,
            epochs,
            lr,
            patience,
            out,
        } => {
            let (config, device, _) = setup(&common)?;
            let options = serve_cmd::distill_options(temperature, hard, epochs, lr, patience);
            let reduced = serve_cmd::distill(&config, &teacher, &options, &out, &device)?;
            serve_cmd::print_reduced("distilled", &reduced);
            serve_cmd::write_reduced(&reduced)?;
        }
        Command::Bench {
            common,
            warmup,
            steps,
            json,
        } => {
            let (config, device, _) = setup(&common)?;
            let th = measure::measure_throughput(&config, &device, warmup, steps)?;
            let dataset = load_dataset(&config)?;
            let model_config = dataset_model_config(&config, &dataset)?;
            let shape = model_config.shape(&config.model.preset);
            let flops_per_sample = measure::train_flops_per_sequence(&shape, model_config.max_len);
            let peak = measure::sgemm_peak_gflops();
            let report = serde_json::json!({
                "samples_per_s": th.samples_per_s(),
                "peak_gflops": peak,
                "peak_is": "best of five 1024^3 f32 products (gemm crate, every rayon thread), measured in this run",
                "flops_per_sample": flops_per_sample,
                "flops_are": "balance::shape train_flops_per_token x max_len (MODELLED count of the step's FLOPs)",
                "fraction_of_peak": th.samples_per_s() * flops_per_sample / (peak * 1e9),
                "tokens_per_s": th.tokens_per_s(),
                "preset": config.model.preset,
                "batch": config.train.batch_size,
                "steps": th.steps,
                "forward_backward_s_per_step": th.forward_backward_s / th.steps.max(1) as f64,
                "optimizer_s_per_step": th.optimizer_s / th.steps.max(1) as f64,
                "residency": th.residency,
                "host_transfer_bytes_per_step": th.host_transfer_bytes / th.steps.max(1),
                "adapter": describe(&device),
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
