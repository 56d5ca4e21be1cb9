//! `meshrec launch`: the supervisor of an elastic job under MPI, which has no fault-tolerant
//! MPI to shrink a running world. It starts `mpirun -np N meshrec train --comm mpi ...` in a
//! process group of its own, watches it (the job's exit, and every rank's health file: a
//! silent rank, or one that stopped progressing while not waiting on a peer), and when a
//! rank is lost it ends the job and starts it again from the newest checkpoint with the
//! surviving world — one replica fewer, never below `elastic.min_dp` — as torchrun does,
//! at most `elastic.max_restarts` times.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::elastic::health::{health_file, judge, now_ms, read_health_file, Verdict};
use crate::error::RunError;

/// The environment variable naming the folder where ranks write their health files.
pub const HEALTH_DIR_ENV: &str = "MESHREC_HEALTH_DIR";

/// What `meshrec launch` runs.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The `meshrec` executable the ranks run.
    pub exe: PathBuf,
    /// `mpirun` and the arguments it takes before `-np`.
    pub mpirun: Vec<String>,
    /// The arguments after `meshrec train` (config, overrides, device).
    pub train_args: Vec<String>,
}

/// One start of the job.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub dp: usize,
    pub processes: usize,
    /// The checkpoint it resumed from.
    pub resumed_from: Option<PathBuf>,
    /// How it ended: `finished`, or what the supervisor saw.
    pub outcome: String,
    /// The rank the supervisor found lost (world rank of that attempt), where it could tell.
    pub lost_rank: Option<usize>,
    /// From the lost rank's last heartbeat or progress to the supervisor noticing.
    pub detect_s: Option<f64>,
    pub seconds: f64,
}

/// What `meshrec launch` did (also `launch.json` in the run folder).
#[derive(Debug, Clone, Serialize)]
pub struct LaunchReport {
    pub attempts: Vec<Attempt>,
    pub finished: bool,
}

/// How an attempt ended, as the supervisor saw it.
enum Seen {
    Exited(ExitStatus),
    Lost {
        rank: usize,
        why: String,
        detect_s: f64,
    },
}

/// Runs the job under the supervisor until it finishes, runs out of restarts, or falls
/// below `elastic.min_dp`.
pub fn launch(options: &LaunchOptions, config: &RunConfig) -> Result<LaunchReport, RunError> {
    let e = &config.elastic;
    let (tp, pp) = (config.parallel.tp, config.parallel.pp);
    let run_dir = config.run_dir();
    let health_dir = run_dir.join("health");
    let mut dp = config.parallel.dp;
    let mut report = LaunchReport {
        attempts: Vec::new(),
        finished: false,
    };
    let mut resume = None;
    loop {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&health_dir);
        std::fs::create_dir_all(&health_dir).map_err(|err| RunError::io(&health_dir, err))?;
        let processes = dp * tp * pp;
        // Faults injected by `--set fault.*` strike the first attempt only: a real fault
        // does not follow the job into its restart.
        let args = if report.attempts.is_empty() {
            options.train_args.clone()
        } else {
            without_injected_faults(&options.train_args)
        };
        let mut child = start(
            options,
            &args,
            processes,
            dp,
            resume.as_deref(),
            &health_dir,
        )?;
        let seen = watch(&mut child, &health_dir, processes, config)?;
        let mut attempt = Attempt {
            dp,
            processes,
            resumed_from: resume.clone(),
            outcome: String::new(),
            lost_rank: None,
            detect_s: None,
            seconds: 0.0,
        };
        let failed = match seen {
            Seen::Exited(status) if status.success() => {
                attempt.outcome = "finished".into();
                false
            }
            Seen::Exited(status) => {
                attempt.outcome = format!("the job exited: {status}");
                attempt.lost_rank = last_beating(&health_dir, processes).map(|(r, _)| r);
                true
            }
            Seen::Lost {
                rank,
                why,
                detect_s,
            } => {
                end_group(&mut child);
                attempt.outcome = format!("world rank {rank} lost: {why}");
                attempt.lost_rank = Some(rank);
                attempt.detect_s = Some(detect_s);
                true
            }
        };
        attempt.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            dp,
            outcome = attempt.outcome,
            "launch: attempt {} ended",
            report.attempts.len() + 1
        );
        report.attempts.push(attempt);
        write_report(&run_dir, &report)?;
        if !failed {
            report.finished = true;
            write_report(&run_dir, &report)?;
            return Ok(report);
        }
        let restarts = report.attempts.len() - 1;
        if restarts >= e.max_restarts {
            return Err(RunError::Parallel(format!(
                "launch: gave up after {restarts} restarts (elastic.max_restarts); see {}",
                run_dir.join("launch.json").display()
            )));
        }
        if dp <= e.min_dp {
            return Err(RunError::Parallel(format!(
                "launch: a replica was lost and {} would remain, below elastic.min_dp {}; the newest checkpoint is under {}",
                dp - 1,
                e.min_dp,
                run_dir.join("checkpoints").display()
            )));
        }
        dp -= 1;
        resume = checkpoint::load_manifest(&run_dir).ok().map(|(dir, _)| dir);
        tracing::warn!(dp, resume = ?resume, "launch: restarting with the surviving world");
    }
}

/// `args` without its `--set fault.…` overrides.
fn without_injected_faults(args: &[String]) -> Vec<String> {
    let mut kept = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let is_fault = |a: &str| a.trim_start().starts_with("fault.");
        if args[i] == "--set" && args.get(i + 1).is_some_and(|a| is_fault(a)) {
            i += 2;
            continue;
        }
        if args[i].strip_prefix("--set=").is_some_and(is_fault) {
            i += 1;
            continue;
        }
        kept.push(args[i].clone());
        i += 1;
    }
    kept
}

fn start(
    options: &LaunchOptions,
    train_args: &[String],
    processes: usize,
    dp: usize,
    resume: Option<&Path>,
    health_dir: &Path,
) -> Result<Child, RunError> {
    use std::os::unix::process::CommandExt;
    let (program, pre) = options
        .mpirun
        .split_first()
        .ok_or_else(|| RunError::Parallel("launch: no mpirun command".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(pre)
        .arg("-np")
        .arg(processes.to_string())
        .arg(&options.exe)
        .arg("train")
        .args(train_args)
        .args(["--set", "parallel.comm=mpi", "--set"])
        .arg(format!("parallel.dp={dp}"))
        .env(HEALTH_DIR_ENV, health_dir)
        // Its own process group, so that ending the job reaches every rank mpirun started.
        .process_group(0);
    if let Some(dir) = resume {
        cmd.arg("--resume").arg(dir);
    }
    cmd.spawn()
        .map_err(|e| RunError::Parallel(format!("launch: cannot start {program}: {e}")))
}

/// Polls the job and its ranks' health a tenth of `elastic.timeout_s` apart.
fn watch(
    child: &mut Child,
    health_dir: &Path,
    processes: usize,
    config: &RunConfig,
) -> Result<Seen, RunError> {
    let timeout = Duration::from_secs_f64(config.elastic.timeout_s);
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| RunError::Parallel(format!("launch: waiting for mpirun: {e}")))?
        {
            return Ok(Seen::Exited(status));
        }
        let now = now_ms();
        for rank in 0..processes {
            let Some(s) = read_health_file(&health_file(health_dir, rank)) else {
                continue;
            };
            let verdict = judge(&s, now, timeout / 2);
            let since = match verdict {
                Verdict::Healthy => continue,
                Verdict::Silent { .. } => s.beat_ms,
                Verdict::Hung { .. } => s.tick_ms,
            };
            return Ok(Seen::Lost {
                rank,
                why: verdict.reason(),
                detect_s: now.saturating_sub(since) as f64 / 1e3,
            });
        }
        std::thread::sleep(timeout / 10);
    }
}

/// The rank whose heartbeat stopped first (the lost one, when a process was killed: the
/// others beat until mpirun ended them).
fn last_beating(health_dir: &Path, processes: usize) -> Option<(usize, u64)> {
    (0..processes)
        .filter_map(|r| read_health_file(&health_file(health_dir, r)).map(|s| (r, s.beat_ms)))
        .min_by_key(|(_, beat)| *beat)
}

/// Ends the job's whole process group (mpirun and its ranks) and reaps mpirun.
fn end_group(child: &mut Child) {
    let group = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
    let _ = child.wait();
}

fn write_report(run_dir: &Path, report: &LaunchReport) -> Result<(), RunError> {
    let path = run_dir.join("launch.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| RunError::io(&path, e))?;
    std::fs::write(&path, text).map_err(|e| RunError::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_drops_injected_faults_and_keeps_the_rest() {
        let args: Vec<String> = [
            "--config",
            "c.toml",
            "--set",
            "fault.crash_step=5",
            "--set",
            "parallel.dp=2",
            "--set=fault.crash_rank=1",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            without_injected_faults(&args),
            ["--config", "c.toml", "--set", "parallel.dp=2"]
        );
    }
}
