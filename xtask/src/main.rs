//! Developer commands: `data`, `demo`, `bench`, `validate-sim` and `ci`. Each shells out to cargo and the
//! system tools a newcomer has after `.ci/run`'s installs; nothing here is a library.

mod data;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "meshrec developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a dataset into data/ (`ml-100k`).
    Data {
        dataset: String,
        /// Take the files from this folder instead of downloading.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Fetch ml-100k if missing, train the `small` preset on CPU to convergence, print the
    /// test metrics.
    Demo {
        /// Extra `--set key=value` overrides for the run.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Run a benchmark: train, comm, compress, pipeline, tp, strategies, paper (simulated).
    Bench { name: String },
    /// The cluster simulator's predicted step time against the measured one, for every
    /// layout that runs on this machine (`target/bench/validate-sim.{json,md}`).
    ValidateSim {
        /// A tiny synthetic model, for CI.
        #[arg(long)]
        quick: bool,
    },
    /// Everything CI checks: fmt, clippy, tests (CPU and wgpu), cuda type-check, MPI tests.
    Ci,
}

/// The workspace root. `cargo run` sets `CARGO_MANIFEST_DIR` at run time; it is read
/// then, not baked in at compile time, because clones that share one target directory
/// (CI's and the developer's) overwrite each other's `xtask` binary.
pub fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command in the workspace root, failing with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    eprintln!("$ {}", format_command(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", format_command(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", format_command(cmd));
    }
    Ok(())
}

fn format_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn bench_dir() -> PathBuf {
    root().join("target/bench")
}

/// `cargo run --release ... --bin meshrec --`, arguments to follow.
fn meshrec_release() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "meshrec-trainer",
        "--bin",
        "meshrec",
        "--",
    ]);
    cmd
}

fn demo(set: &[String]) -> Result<()> {
    let data = root().join("data/ml-100k");
    if data::verify_ml100k(&data).is_err() {
        data::fetch_ml100k(None)?;
    }
    let mut cmd = meshrec_release();
    cmd.args([
        "train",
        "--config",
        "configs/ml100k.toml",
        "--device",
        "cpu",
    ]);
    for s in set {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

fn bench(name: &str) -> Result<()> {
    std::fs::create_dir_all(bench_dir())?;
    match name {
        "train" => {
            if data::verify_ml100k(&root().join("data/ml-100k")).is_err() {
                data::fetch_ml100k(None)?;
            }
            run(meshrec_release().args([
                "bench",
                "--config",
                "configs/ml100k.toml",
                "--device",
                "cpu",
                "--warmup",
                "3",
                "--steps",
                "20",
                "--json",
                "target/bench/train.json",
            ]))
        }
        "comm" => run(cargo()
            .args([
                "bench",
                "-p",
                "meshrec-comm",
                "--bench",
                "comm",
                "--features",
                "mpi",
            ])
            .env("MESHREC_BENCH_DIR", bench_dir())),
        "compress" => run(cargo()
            .args(["bench", "-p", "meshrec-compress", "--bench", "compress"])
            .env("MESHREC_BENCH_DIR", bench_dir())),
        // One core per pipeline stage, so a stage's idle time is the schedule's bubble.
        "pipeline" => run(cargo()
            .args([
                "run",
                "--release",
                "-p",
                "meshrec-parallel",
                "--example",
                "bench_pipeline",
            ])
            .env("RAYON_NUM_THREADS", "1")
            .env("MESHREC_BENCH_DIR", bench_dir())),
        "tp" => run(cargo()
            .args([
                "run",
                "--release",
                "-p",
                "meshrec-parallel",
                "--example",
                "bench_tp",
            ])
            .env("MESHREC_BENCH_DIR", bench_dir())),
        // Measured: every parallel layout of 4 ranks and one device, sync/async DP, with and
        // without top-k compression; then a few epochs of each DP mode for convergence.
        "strategies" => {
            if data::verify_ml100k(&root().join("data/ml-100k")).is_err() {
                data::fetch_ml100k(None)?;
            }
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    "meshrec-trainer",
                    "--example",
                    "bench_strategies",
                    "--",
                    "--out",
                ])
                .arg(bench_dir()))
        }
        // Simulated, not measured: the planner's best hybrid against the best single-mode
        // layouts on 8–64 modelled GPUs; writes paper.{md,json,svg}.
        "paper" => run(cargo()
            .args([
                "run",
                "--release",
                "-p",
                "meshrec-balance",
                "--example",
                "paper",
                "--",
                "--out",
            ])
            .arg(bench_dir())),
        other => {
            bail!("unknown benchmark `{other}` (known: train, comm, compress, pipeline, tp, strategies, paper)")
        }
    }
}

fn validate_sim(quick: bool) -> Result<()> {
    if !quick && data::verify_ml100k(&root().join("data/ml-100k")).is_err() {
        data::fetch_ml100k(None)?;
    }
    std::fs::create_dir_all(bench_dir())?;
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "meshrec-trainer",
        "--example",
        "validate_sim",
        "--",
        "--out",
    ])
    .arg(bench_dir());
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

/// `mpirun` as CI runs it here: as root, with more ranks than cores allowed.
fn mpirun(np: &str, program: &Path) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", np])
        .arg(program);
    cmd
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "meshrec-comm/mpi,meshrec-parallel/mpi,meshrec-trainer/mpi",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["test", "--workspace", "--features", "meshrec-comm/mpi"]))?;
    // The model tests again on wgpu, for real, through Mesa's software Vulkan driver.
    let runtime = std::env::temp_dir().join("meshrec-xdg");
    std::fs::create_dir_all(&runtime)?;
    run(cargo()
        .args([
            "test",
            "-p",
            "meshrec-model",
            "--no-default-features",
            "--features",
            "wgpu",
            "--test",
            "model",
        ])
        .env("MESHREC_TEST_DEVICE", "wgpu")
        .env("XDG_RUNTIME_DIR", &runtime))?;
    // The layout-equivalence suite on wgpu too: hybrid, uneven, interleaved, RoPE/SwiGLU
    // layouts (the full TP × PP × schedule × micro-batch grid takes minutes on a software
    // Vulkan driver and runs on the CPU backend above).
    run(cargo()
        .args([
            "test",
            "-p",
            "meshrec-parallel",
            "--no-default-features",
            "--features",
            "wgpu",
            "--test",
            "equivalence",
            "--",
            "data_parallel_and_full_hybrid",
            "uneven_partitions_and_interleaved",
            "rope_and_swiglu",
        ])
        .env("MESHREC_TEST_DEVICE", "wgpu")
        .env("XDG_RUNTIME_DIR", &runtime))?;
    // CUDA: type-check only; DOCS_RS skips cubecl's LLVM download, which fails offline.
    run(cargo()
        .args([
            "check",
            "-p",
            "meshrec-trainer",
            "--no-default-features",
            "--features",
            "cuda",
        ])
        .env("DOCS_RS", "1"))?;
    // The balance commands: profile this machine, simulate a layout with that profile, plan
    // a cluster, validate the simulator on a tiny model, and the (simulated) paper table.
    let meshrec = |args: &[&str]| {
        let mut cmd = meshrec_release();
        cmd.args(args);
        cmd
    };
    let tiny = [
        "--set",
        "data.path=synthetic",
        "--set",
        "model.preset=tiny",
        "--set",
        "train.batch_size=32",
    ];
    let profile = std::env::temp_dir().join("meshrec-ci-profile.json");
    let profile_arg = profile.to_string_lossy().into_owned();
    let mut args = vec![
        "profile",
        "--micro-batch",
        "8",
        "--copies",
        "2",
        "--out",
        &profile_arg,
    ];
    args.extend(tiny);
    run(&mut meshrec(&args))?;
    let mut args = vec![
        "simulate",
        "--profile",
        &profile_arg,
        "--set",
        "parallel.dp=2",
        "--set",
        "parallel.pp=2",
        "--set",
        "parallel.micro_batches=4",
    ];
    args.extend(tiny);
    run(&mut meshrec(&args))?;
    run(&mut meshrec(&[
        "plan",
        "--model",
        "1b",
        "--devices",
        "64",
        "--cluster",
        "a100x8",
        "--top",
        "5",
    ]))?;
    validate_sim(true)?;
    bench("paper")?;
    // MPI: the collective self-test across processes.
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "meshrec-comm",
        "--features",
        "mpi",
        "--example",
        "mpi_selftest",
    ]))?;
    let selftest = target_dir().join("release/examples/mpi_selftest");
    for np in ["3", "4"] {
        run(&mut mpirun(np, &selftest))?;
    }
    // The layout-equivalence check across processes: tp 2 × pp 2 on the MPI engine. Built in
    // the dev profile, whose dependencies the tests above already compiled (optimised).
    run(cargo().args([
        "build",
        "-p",
        "meshrec-parallel",
        "--features",
        "mpi",
        "--example",
        "mpi_equivalence",
    ]))?;
    let equivalence = target_dir().join("debug/examples/mpi_equivalence");
    for np in ["4", "2"] {
        run(&mut mpirun(np, &equivalence))?;
    }
    // A hybrid training run across processes: tp 2 × pp 2 on the MPI engine, tiny model.
    run(cargo().args([
        "build",
        "-p",
        "meshrec-trainer",
        "--features",
        "mpi",
        "--bin",
        "meshrec",
    ]))?;
    let out = std::env::temp_dir().join("meshrec-ci-mpi-run");
    let _ = std::fs::remove_dir_all(&out);
    let meshrec = target_dir().join("debug/meshrec");
    let mpi_train = |np: &str, name: &str, sets: &[&str]| {
        let mut train = mpirun(np, &meshrec);
        train.args(["train", "--comm", "mpi"]);
        for set in [
            "data.path=synthetic",
            "data.synthetic.users=60",
            "data.synthetic.items=30",
            "model.preset=tiny",
            "train.epochs=2",
            "train.batch_size=16",
        ]
        .iter()
        .chain(sets)
        {
            train.args(["--set", set]);
        }
        train.args(["--set", &format!("output.name={name}")]);
        train.args(["--set", &format!("output.dir=\"{}\"", out.display())]);
        train
    };
    let summary_of = |name: &str| -> Result<()> {
        let summary = out.join(name).join("summary.json");
        if !summary.is_file() {
            bail!("the MPI training run wrote no {}", summary.display());
        }
        Ok(())
    };
    // Tensor and pipeline parallel across processes.
    run(&mut mpi_train(
        "4",
        "tp2pp2",
        &["parallel.tp=2", "parallel.pp=2", "parallel.micro_batches=2"],
    ))?;
    summary_of("tp2pp2")?;
    // Data parallel across processes: the DP reduction thread beside the main one, async
    // with a staleness bound and top-k compression with error feedback.
    run(&mut mpi_train(
        "2",
        "dp2",
        &[
            "parallel.dp=2",
            "dp.mode=async",
            "compress.method=topk",
            "compress.ratio=0.05",
        ],
    ))?;
    summary_of("dp2")?;
    // A rank dies mid-step: the job stops, naming it, and the last checkpoint resumes.
    let crash_sets = [
        "parallel.dp=2",
        "checkpoint.every_steps=2",
        "fault.crash_step=5",
        "fault.crash_rank=1",
    ];
    let crashed = mpi_train("2", "crash", &crash_sets)
        .output()
        .context("running the MPI crash test")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&crashed.stdout),
        String::from_utf8_lossy(&crashed.stderr)
    );
    if crashed.status.success() || !text.contains("rank 1") {
        bail!(
            "a rank killed under mpirun should stop the job naming rank 1; got {} and:\n{text}",
            crashed.status
        );
    }
    println!(
        "xtask ci: the killed MPI run stopped as it should ({})",
        crashed.status
    );
    let mut resumed = mpi_train("2", "crash", &crash_sets[..2]);
    resumed.arg("--resume").arg(out.join("crash"));
    run(&mut resumed)?;
    summary_of("crash")?;
    println!("xtask ci: all checks passed");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Data { dataset, from } => match dataset.as_str() {
            "ml-100k" => data::fetch_ml100k(from.as_deref()),
            other => bail!("unknown dataset `{other}` (known: ml-100k)"),
        },
        Cmd::Demo { set } => demo(&set),
        Cmd::Bench { name } => bench(&name),
        Cmd::ValidateSim { quick } => validate_sim(quick),
        Cmd::Ci => ci(),
    }
}
