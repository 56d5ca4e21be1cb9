//! Running the commands xtask is made of: a command line shown and checked, cargo building
//! into one target directory, and the release `meshrec` binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::workspace::root;

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

/// A cargo command that builds into [`target_dir`], so the paths xtask derives from it (the
/// MPI programs `mpirun` starts) are where cargo put them.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("CARGO_TARGET_DIR", target_dir());
    cmd
}

static TARGET_DIR: OnceLock<PathBuf> = OnceLock::new();

/// `CARGO_TARGET_DIR` made absolute (children run in the root, not in xtask's directory).
fn env_target_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty())?);
    if dir.is_absolute() {
        return Some(dir);
    }
    Some(
        std::env::current_dir()
            .map(|cwd| cwd.join(&dir))
            .unwrap_or(dir),
    )
}

/// The target directory of every cargo command xtask starts: `CARGO_TARGET_DIR`, else what
/// cargo itself would pick (configuration included), else `target/` in the root.
pub fn target_dir() -> PathBuf {
    TARGET_DIR
        .get_or_init(|| {
            env_target_dir()
                .or_else(cargo_target_dir)
                .unwrap_or_else(|| root().join("target"))
        })
        .clone()
}

fn cargo_target_dir() -> Option<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .ok()?;
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    metadata["target_directory"].as_str().map(PathBuf::from)
}

/// CI's target directory: one outside the clone, shared by every clone and run, because
/// burn's first build is the slow part. `CARGO_TARGET_DIR` still wins.
pub fn use_shared_target_dir() {
    let shared = env_target_dir().or_else(|| {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".cache/meshrec/target"))
    });
    if let Some(dir) = shared {
        // Set before any cargo command ran; later calls keep the first choice.
        let _ = TARGET_DIR.set(dir);
    }
}

pub fn bench_dir() -> PathBuf {
    root().join("target/bench")
}

/// `cargo run --release ... --bin meshrec --`, arguments to follow.
pub fn meshrec_release() -> Command {
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

/// Builds the release `meshrec` and returns its path (benchmarks that time it run the
/// binary, not `cargo run`).
pub fn build_meshrec_release() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "meshrec-trainer",
        "--bin",
        "meshrec",
    ]))?;
    Ok(target_dir().join("release/meshrec"))
}

/// `meshrec bench` of the shipped ml-100k config on the CPU (`meshrec` is the binary or a
/// `cargo run` command), with `sets` overrides, `steps` after 3 warm-up; returns the JSON it
/// wrote to `out`.
pub fn meshrec_bench(
    mut meshrec: Command,
    sets: &[String],
    steps: u64,
    out: &Path,
) -> Result<serde_json::Value> {
    meshrec
        .args([
            "bench",
            "--config",
            "configs/ml100k.toml",
            "--device",
            "cpu",
        ])
        .args(["--warmup", "3", "--steps", &steps.to_string(), "--json"])
        .arg(out);
    for set in sets {
        meshrec.args(["--set", set]);
    }
    run(&mut meshrec)?;
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", out.display()))
}
