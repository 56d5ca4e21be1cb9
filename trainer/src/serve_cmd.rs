//! The serving commands of the `meshrec` binary: `serve` (the HTTP service on a
//! checkpoint), `loadgen` (load against it on loopback), `prune` and `distill` (the
//! model-level reductions, written as serving checkpoints).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshrec_model::data::Dataset;
use meshrec_serve::loadgen::{self, Arrivals, LoadReport, LoadSpec, Phase};
use meshrec_serve::plot::{self, Series};
use meshrec_serve::{ServeConfig, Service};
use meshrec_trainer::serving::{self, DistillOptions, PruneOptions, Reduced};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The serving configuration (TOML: [batching] [workers] [autoscale] [model]
    /// [limits]); defaults are the plain baseline.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides, `section.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A serving checkpoint (`runs/<name>/best.safetensors`, or one from prune/distill).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::load(args.config.as_deref(), &args.set)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let service = Service::from_checkpoint(&args.checkpoint, &config)?;
    runtime.block_on(async move {
        let listener = meshrec_serve::server::bind(&args.addr).await?;
        let addr = listener.local_addr()?;
        println!(
            "meshrec serve: {} on http://{addr} ({})",
            args.checkpoint.display(),
            config.label()
        );
        tracing::info!("POST /v1/recommend, GET /healthz, GET /metrics; SIGTERM drains and exits");
        service
            .serve(listener, meshrec_serve::server::termination())
            .await?;
        println!("meshrec serve: drained, exiting");
        anyhow::Ok(())
    })
}

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// The service, on loopback.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The dataset the model was trained on: histories come from its test split (each
    /// user's train and valid items, raw ids).
    #[arg(long, default_value = "data/ml-100k")]
    data: PathBuf,
    /// Closed loop: clients at once, one run per value.
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    concurrency: Vec<usize>,
    /// Open loop: Poisson arrivals per second, one run per value.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Requests per run at most.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Seconds per run at most.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    #[arg(long, default_value_t = 10)]
    k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also measure test NDCG@10 and HR@10 through the service (every test user once).
    #[arg(long)]
    eval: bool,
    /// A load step, `clients:seconds,...` (e.g. `1:5,64:10,1:10`): the autoscaler's figure.
    #[arg(long)]
    step: Option<String>,
    /// Where loadgen.json and the SVGs go.
    #[arg(long, default_value = "target/loadgen")]
    out: PathBuf,
}

fn parse_step(text: &str) -> anyhow::Result<Vec<Phase>> {
    text.split(',')
        .map(|part| {
            let (c, s) = part
                .split_once(':')
                .with_context(|| format!("`{part}`: expected clients:seconds"))?;
            Ok(Phase {
                concurrency: c
                    .trim()
                    .parse()
                    .with_context(|| format!("`{c}` is not a count"))?,
                seconds: s
                    .trim()
                    .parse()
                    .with_context(|| format!("`{s}` is not seconds"))?,
            })
        })
        .collect()
}

pub fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    loadgen::check_loopback(&args.url)?;
    let dataset = Dataset::load(&args.data)?;
    let cases = loadgen::test_cases(&dataset);
    anyhow::ensure!(
        !cases.is_empty(),
        "{}: no user has a test item",
        args.data.display()
    );
    let histories: Arc<Vec<Vec<String>>> =
        Arc::new(cases.iter().map(|c| c.history.clone()).collect());
    let mut runs: Vec<Arrivals> = args
        .concurrency
        .iter()
        .map(|&c| Arrivals::Closed { concurrency: c })
        .chain(args.rate.iter().map(|&r| Arrivals::Open {
            rate: r,
            max_inflight: 1024,
        }))
        .collect();
    if runs.is_empty() && args.step.is_none() && !args.eval {
        runs.push(Arrivals::Closed { concurrency: 16 });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let client = loadgen::client(256)?;
    let mut reports: Vec<LoadReport> = Vec::new();
    for arrivals in runs {
        let spec = LoadSpec {
            url: args.url.clone(),
            arrivals,
            requests: args.requests,
            duration: Duration::from_secs_f64(args.duration),
            k: args.k,
            seed: args.seed,
        };
        let report = runtime.block_on(loadgen::run(&client, histories.clone(), &spec))?;
        println!(
            "{} {}: {} requests, {} errors, p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, {:.1} req/s",
            report.mode,
            report
                .concurrency
                .map(|c| format!("concurrency {c}"))
                .or(report.rate.map(|r| format!("rate {r}/s")))
                .unwrap_or_default(),
            report.requests,
            report.errors,
            report.p50_ms,
            report.p95_ms,
            report.p99_ms,
            report.throughput_rps
        );
        reports.push(report);
    }
    let accuracy = if args.eval {
        let acc = runtime.block_on(loadgen::evaluate(&client, &args.url, Arc::new(cases), 8))?;
        println!(
            "served test accuracy over {} users: NDCG@10 {:.4}, HR@10 {:.4} ({} errors)",
            acc.users, acc.ndcg10, acc.hr10, acc.errors
        );
        Some(acc)
    } else {
        None
    };
    let step = match &args.step {
        Some(text) => {
            let phases = parse_step(text)?;
            let samples = runtime.block_on(loadgen::step(
                &client,
                &args.url,
                histories.clone(),
                &phases,
                Duration::from_millis(250),
            ))?;
            let svg = args.out.join("loadgen-step.svg");
            plot::load_step(&svg, &format!("load step {text}"), &samples)?;
            println!("load step: {}", svg.display());
            Some(samples)
        }
        None => None,
    };
    if !reports.is_empty() {
        let svg = args.out.join("loadgen.svg");
        let series: Vec<Series> = [("p50", 0), ("p95", 1), ("p99", 2)]
            .into_iter()
            .map(|(label, which)| Series {
                label: label.to_string(),
                points: reports
                    .iter()
                    .map(|r| (r.throughput_rps, [r.p50_ms, r.p95_ms, r.p99_ms][which]))
                    .collect(),
            })
            .collect();
        plot::latency_throughput(
            &svg,
            &format!("latency against throughput, {}", args.url),
            "latency (ms)",
            &series,
        )?;
        println!("figure: {}", svg.display());
    }
    let json =
        serde_json::json!({ "url": args.url, "runs": reports, "accuracy": accuracy, "step": step });
    let path = args.out.join("loadgen.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());
    Ok(())
}

pub fn print_reduced(what: &str, r: &Reduced) {
    let get = |m: &std::collections::BTreeMap<String, f64>, k: &str| {
        m.get(k).copied().unwrap_or(f64::NAN)
    };
    println!(
        "{what}: {} -> {} ({} -> {} parameters; heads {:?}, MLP channels {:?}; best epoch {})",
        r.name,
        r.checkpoint.display(),
        r.params_before,
        r.params_after,
        r.heads,
        r.channels,
        r.epochs
    );
    println!(
        "test NDCG@10 {:.4} (source {:.4}, {:+.1}%), HR@10 {:.4} (source {:.4})",
        get(&r.test, "ndcg@10"),
        get(&r.test_before, "ndcg@10"),
        100.0 * (get(&r.test, "ndcg@10") / get(&r.test_before, "ndcg@10") - 1.0),
        get(&r.test, "hr@10"),
        get(&r.test_before, "hr@10"),
    );
}

pub fn write_reduced(r: &Reduced) -> anyhow::Result<()> {
    let path = r.checkpoint.with_extension("json");
    std::fs::write(&path, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn prune_options(
    heads: f64,
    channels: f64,
    batches: usize,
    epochs: u64,
    lr: f64,
) -> PruneOptions {
    PruneOptions {
        heads,
        channels,
        importance_batches: batches,
        finetune_epochs: epochs,
        lr,
    }
}

pub fn distill_options(
    temperature: f32,
    hard: f32,
    epochs: u64,
    lr: f64,
    patience: u64,
) -> DistillOptions {
    DistillOptions {
        temperature,
        hard,
        epochs,
        lr,
        patience,
    }
}

pub use serving::{distill, prune_checkpoint};
