//! The simulator's entry points: one step, or many with per-step jitter (stragglers and
//! noise) and async DP's staleness bound across steps.

use meshrec_pipeline::DpMode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cluster::Cluster;
use crate::error::BalanceError;
use crate::sim::config::SimConfig;
use crate::sim::prepare::prepare;
use crate::sim::result::{MultiStepResult, SimResult};
use crate::sim::step::run_step;

/// Simulates one training step of `cfg` on `cluster`.
pub fn simulate(cfg: &SimConfig, cluster: &Cluster) -> Result<SimResult, BalanceError> {
    let prep = prepare(cfg, cluster)?;
    let slow = vec![1.0; cluster.len()];
    run_step(cfg, cluster, &prep, &slow)
}

/// Simulates `steps` steps; each device's compute is slowed by a factor drawn uniformly
/// from `[1, 1 + jitter]` per step (stragglers, noise). Async DP lets replicas run ahead of
/// the slowest by at most `max_staleness` steps (stale-synchronous parallel).
pub fn simulate_steps(
    cfg: &SimConfig,
    cluster: &Cluster,
    steps: usize,
    jitter: f64,
    seed: u64,
) -> Result<MultiStepResult, BalanceError> {
    if steps == 0 || !(jitter.is_finite() && jitter >= 0.0) {
        return Err(cfg.layout_err(format!(
            "steps {steps} must be >= 1 and jitter {jitter} >= 0"
        )));
    }
    let prep = prepare(cfg, cluster)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dp = cfg.mesh.dp;
    // done[d][i]: completion time of replica d's step i.
    let mut done: Vec<Vec<f64>> = vec![Vec::with_capacity(steps); dp];
    let mut max_lead = 0u32;
    for i in 0..steps {
        let slow: Vec<f64> = (0..cluster.len())
            .map(|_| 1.0 + rng.random_range(0.0..=jitter))
            .collect();
        let out = run_step(cfg, cluster, &prep, &slow)?;
        match cfg.dp_mode {
            DpMode::Sync | DpMode::LocalSgd { .. } => {
                let prev = done[0].last().copied().unwrap_or(0.0);
                for row in done.iter_mut() {
                    row.push(prev + out.step_s);
                }
            }
            DpMode::Async { max_staleness } => {
                let k = usize::try_from(max_staleness).unwrap_or(usize::MAX);
                let gate = if i > k {
                    (0..dp)
                        .map(|d| done[d][i - 1 - k])
                        .fold(f64::INFINITY, f64::min)
                } else {
                    0.0
                };
                for d in 0..dp {
                    let own = done[d].last().copied().unwrap_or(0.0);
                    done[d].push(own.max(gate) + out.replica_step_s[d]);
                }
            }
        }
        // Lead: how many steps the fastest replica has finished beyond the slowest at the
        // moment the slowest finishes step i.
        let slowest_now = (0..dp).map(|d| done[d][i]).fold(0.0, f64::max);
        for row in &done {
            let ahead = row.iter().filter(|&&t| t <= slowest_now).count() as u32;
            max_lead = max_lead.max(ahead.saturating_sub(i as u32 + 1));
        }
    }
    let all: Vec<f64> = (0..steps)
        .map(|i| (0..dp).map(|d| done[d][i]).fold(0.0, f64::max))
        .collect();
    let step_s: Vec<f64> = all
        .iter()
        .enumerate()
        .map(|(i, &t)| t - if i == 0 { 0.0 } else { all[i - 1] })
        .collect();
    let total_s = (0..dp).map(|d| done[d][steps - 1]).fold(0.0, f64::max);
    Ok(MultiStepResult {
        step_s,
        total_s,
        samples_per_s: (steps * cfg.global_batch) as f64 / total_s,
        max_lead,
    })
}
