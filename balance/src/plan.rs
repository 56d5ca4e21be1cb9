//! The planner: enumerates DP × TP × PP layouts, schedules, micro-batch counts, DP modes
//! and compressors for a model on a cluster, drops what does not fit in memory, ranks the
//! rest by **simulated** throughput, and explains the winner against the best single-mode
//! (DP-only, TP-only, PP-only) layout.
//!
//! Memory per device (see [`crate::sim`]): weights + gradients + AdamW state of the layers
//! it holds (a tied embedding copy on the last stage included), the activations of the
//! micro-batches its schedule keeps in flight (walked from the schedule itself), and two
//! DP buckets of communication buffers (at most the device's gradient bytes).
//!
//! `meshrec plan --model 1b --devices 64 --cluster a100x8` is
//! [`PlanRequest::from_names`] → [`plan()`] → [`render_report`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::accuracy::AccuracyTable;
use crate::cluster::Cluster;
use crate::error::BalanceError;
use crate::report::{fmt_bytes, fmt_mem, fmt_s};
use crate::shape::ModelShape;
use crate::sim::{simulate, Compression, SimConfig, SimResult, StepPart};
use meshrec_comm::cost::Topology;
use meshrec_pipeline::{DpMode, Mesh, Recompute, ScheduleSpec, ZeroStage};

/// What to plan for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The model.
    pub shape: ModelShape,
    /// The cluster (at least `devices` devices; the first `devices` are used).
    pub cluster: Cluster,
    /// Devices to use, all of them: `dp · tp · pp = devices`.
    pub devices: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// Schedules to try when `pp > 1` (interleaved only where `pp · v` blocks exist).
    pub schedules: Vec<ScheduleSpec>,
    /// Micro-batch counts to try (kept when they divide the batch sensibly).
    pub micro_batches: Vec<usize>,
    /// DP modes to try when `dp > 1`.
    pub dp_modes: Vec<DpMode>,
    /// Compressors to try when `dp > 1`; a lossy one only where the accuracy table says a
    /// measured recipe of it met the bar, unless `allow_lossy`.
    pub compressions: Vec<Compression>,
    /// The measured accuracy cost of compressors (`None`: the committed table,
    /// [`AccuracyTable::committed`]).
    #[serde(default)]
    pub accuracy: Option<AccuracyTable>,
    /// Try every compressor in `compressions`, whatever it costs in accuracy.
    #[serde(default)]
    pub allow_lossy: bool,
    /// ZeRO stages to try with sync DP when `dp > 1` (stage 2 only without compression,
    /// as the trainer requires).
    #[serde(default = "all_zero_stages")]
    pub zero_stages: Vec<ZeroStage>,
    /// Recomputation levels a layout may use, cheapest first: each layout takes the first
    /// that fits (recomputation only costs time).
    #[serde(default = "all_recompute")]
    pub recompute: Vec<Recompute>,
    /// Sequence parallelism in every layout with `tp > 1` (it moves the bytes TP moves
    /// anyway and splits the replicated activations).
    #[serde(default = "yes")]
    pub sequence_parallel: bool,
    /// Adaptive balancing in every simulated layout.
    pub balance: bool,
    /// How many of the best fitting layouts [`Plan::ranking`] keeps.
    pub keep: usize,
}

impl PlanRequest {
    /// Defaults: GPipe, 1F1B and interleaved (v 2, 4); 1–64 micro-batches in powers of two;
    /// sync DP; no compression, top-k 1% and PowerSGD rank 4 (the two the convergence bench
    /// holds to the accuracy bar); balancing on; the best 20 kept.
    pub fn new(shape: ModelShape, cluster: Cluster, devices: usize, global_batch: usize) -> Self {
        let grad_bytes = shape.precision.grad_bytes;
        let d_model = shape.d_model;
        Self {
            shape,
            cluster,
            devices,
            global_batch,
            schedules: vec![
                ScheduleSpec::GPIPE,
                ScheduleSpec::ONE_F_ONE_B,
                ScheduleSpec::interleaved(2),
                ScheduleSpec::interleaved(4),
            ],
            micro_batches: vec![1, 2, 4, 8, 16, 32, 64],
            dp_modes: vec![DpMode::Sync],
            compressions: vec![
                Compression::none(),
                Compression::top_k(0.01, grad_bytes),
                Compression::power_sgd(4, d_model),
            ],
            accuracy: None,
            allow_lossy: false,
            zero_stages: all_zero_stages(),
            recompute: all_recompute(),
            sequence_parallel: true,
            balance: true,
            keep: 20,
        }
    }

    /// The request `meshrec plan --model MODEL --devices N --cluster CLUSTER` makes: the
    /// model preset ([`ModelShape::preset_by_name`]) on `devices` devices of the cluster
    /// preset ([`Cluster::preset`]), with [`PlanRequest::new`]'s defaults. Unknown names are
    /// errors listing the known ones.
    pub fn from_names(
        model: &str,
        cluster: &str,
        devices: usize,
        global_batch: usize,
    ) -> Result<Self, BalanceError> {
        let shape = ModelShape::preset_by_name(model)?;
        let cluster = Cluster::preset(cluster, devices)?;
        if global_batch == 0 {
            return Err(BalanceError::NoFeasibleLayout(
                "global batch must be at least 1".into(),
            ));
        }
        Ok(Self::new(shape, cluster, devices, global_batch))
    }
}

/// The parallelism a layout uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayoutClass {
    /// One device.
    Single,
    /// Only data parallelism.
    DpOnly,
    /// Only tensor parallelism.
    TpOnly,
    /// Only pipeline parallelism.
    PpOnly,
    /// Two or three kinds combined.
    Hybrid,
}

impl LayoutClass {
    /// Classifies a mesh.
    pub fn of(mesh: &Mesh) -> Self {
        match (mesh.dp > 1, mesh.tp > 1, mesh.pp > 1) {
            (false, false, false) => LayoutClass::Single,
            (true, false, false) => LayoutClass::DpOnly,
            (false, true, false) => LayoutClass::TpOnly,
            (false, false, true) => LayoutClass::PpOnly,
            _ => LayoutClass::Hybrid,
        }
    }

    /// `hybrid`, `DP-only`, ...
    pub fn label(&self) -> &'static str {
        match self {
            LayoutClass::Single => "single device",
            LayoutClass::DpOnly => "DP-only",
            LayoutClass::TpOnly => "TP-only",
            LayoutClass::PpOnly => "PP-only",
            LayoutClass::Hybrid => "hybrid",
        }
    }
}

/// One simulated layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// What was simulated.
    pub config: SimConfig,
    /// Its simulated step (timeline dropped).
    pub result: SimResult,
}

impl Candidate {
    /// Its class.
    pub fn class(&self) -> LayoutClass {
        LayoutClass::of(&self.config.mesh)
    }

    /// Largest peak memory over devices, bytes.
    pub fn peak_memory(&self) -> u64 {
        self.result
            .peak_memory_bytes
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Model preset (or shape) name.
    pub model: String,
    /// Cluster name.
    pub cluster: String,
    /// Devices used.
    pub devices: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// Whether adaptive balancing was on.
    pub balance: bool,
    /// Smallest device memory of the cluster, bytes.
    pub capacity_bytes: u64,
    /// Highest simulated throughput of all layouts that fit.
    pub best: Candidate,
    /// Best layout combining two or more kinds of parallelism, if any fits.
    pub best_hybrid: Option<Candidate>,
    /// Best DP-only layout, if one fits.
    pub best_dp: Option<Candidate>,
    /// Best TP-only layout, if one fits (needs `devices` to divide the heads).
    pub best_tp: Option<Candidate>,
    /// Best PP-only layout, if one fits (needs `devices <= n_layers`).
    pub best_pp: Option<Candidate>,
    /// Best layout with pipeline parallelism (`pp > 1`), where balancing matters most.
    pub best_pipelined: Option<Candidate>,
    /// Fitting layouts ranked by throughput, best first (the request's `keep` best).
    pub ranking: Vec<Candidate>,
    /// Configurations simulated.
    pub considered: usize,
    /// Configurations that fit in memory.
    pub fitting: usize,
    /// Configurations dropped because they do not fit in memory.
    pub rejected_memory: usize,
    /// Compressors of the request left out for their accuracy, each with the reason.
    pub excluded_compressions: Vec<String>,
    /// Why the winner wins against the best single-mode layout (or, when a single-mode
    /// layout wins, why it beats the best hybrid), with numbers.
    pub explanation: String,
    /// The winner's layout under each ZeRO stage (simulated): what it holds per device and
    /// how much larger a model's training state would fit. Empty without sync DP replicas.
    #[serde(default)]
    pub zero_headroom: Vec<ZeroHeadroom>,
}

/// The winning layout re-simulated under one ZeRO stage (SIMULATED, formulas of
/// `balance::shape`): the fullest device's state and peak memory, and how many times the
/// model's parameters would fit in the device's capacity with activations and buffers held
/// as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroHeadroom {
    pub zero: ZeroStage,
    pub state_bytes: u64,
    pub peak_memory_bytes: u64,
    pub samples_per_s: f64,
    /// `(capacity - (peak - state)) / state`: the factor by which parameters could grow.
    pub model_scale: f64,
}

/// The winner under every ZeRO stage, where it has sync DP replicas.
fn zero_headroom(best: &Candidate, cluster: &Cluster, capacity: u64) -> Vec<ZeroHeadroom> {
    if best.config.mesh.dp < 2 || best.config.dp_mode != DpMode::Sync {
        return Vec::new();
    }
    all_zero_stages()
        .into_iter()
        .filter_map(|zero| {
            let mut cfg = best.config.clone();
            cfg.zero = zero;
            if zero.shards_gradients() {
                cfg.compression = Compression::none();
            }
            let r = simulate(&cfg, cluster).ok()?;
            let (rank, &peak) = r
                .peak_memory_bytes
                .iter()
                .enumerate()
                .max_by_key(|(_, m)| **m)?;
            let state = *r.state_bytes.get(rank)?;
            let other = peak.saturating_sub(state) as f64;
            Some(ZeroHeadroom {
                zero,
                state_bytes: state,
                peak_memory_bytes: peak,
                samples_per_s: r.samples_per_s,
                model_scale: (capacity as f64 - other) / (state as f64).max(1.0),
            })
        })
        .collect()
}

impl Plan {
    /// The best of the DP-only, TP-only and PP-only layouts.
    pub fn best_single(&self) -> Option<&Candidate> {
        [&self.best_dp, &self.best_tp, &self.best_pp]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.result.samples_per_s.total_cmp(&b.result.samples_per_s))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_report(self, 10))
    }
}

/// A layout named by its label with its simulated throughput (a [`PaperRow`] entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutScore {
    /// [`SimConfig::label`] of the layout.
    pub layout: String,
    /// Simulated samples/s.
    pub samples_per_s: f64,
    /// Simulated mean utilization.
    pub utilization: f64,
}

impl LayoutScore {
    fn of(c: &Candidate) -> Self {
        Self {
            layout: c.config.label(),
            samples_per_s: c.result.samples_per_s,
            utilization: c.result.utilization_mean,
        }
    }
}

/// One row of the paper's comparison (`target/bench/paper.json`'s `rows`): the best hybrid
/// layout against the best single-mode layout of a plan. Simulated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperRow {
    /// Devices used.
    pub devices: usize,
    /// Model preset name.
    pub model: String,
    /// Cluster preset name.
    pub cluster: String,
    /// Whether adaptive balancing was on.
    pub balance: bool,
    /// Label of the best hybrid layout.
    pub best_hybrid: String,
    /// Label of the best single-mode layout.
    pub best_single: String,
    /// Class of the best single-mode layout (`DP-only`, `TP-only`, `PP-only`).
    pub best_single_class: String,
    /// Simulated samples/s of each.
    pub hybrid_samples_per_s: f64,
    /// Simulated samples/s of the single-mode layout.
    pub single_samples_per_s: f64,
    /// Mean utilization of each.
    pub hybrid_utilization: f64,
    /// Mean utilization of the single-mode layout.
    pub single_utilization: f64,
    /// `hybrid / single` samples/s.
    pub throughput_ratio: f64,
    /// `hybrid / single` mean utilization.
    pub utilization_ratio: f64,
    /// Mean pipeline bubble of the best hybrid layout.
    pub hybrid_bubble: f64,
    /// Model FLOPs utilisation of the best hybrid layout.
    pub hybrid_mfu: f64,
    /// Model FLOPs utilisation of the single-mode layout.
    pub single_mfu: f64,
    /// Best DP-only layout and its samples/s, if one fits.
    pub best_dp: Option<LayoutScore>,
    /// Best TP-only layout and its samples/s, if one fits.
    pub best_tp: Option<LayoutScore>,
    /// Best PP-only layout and its samples/s, if one fits.
    pub best_pp: Option<LayoutScore>,
    /// Best layout with `pp > 1` and its samples/s.
    pub best_pipelined: Option<LayoutScore>,
    /// The overall winner's label.
    pub best_overall: String,
    /// The best hybrid (first) against the best single-mode layout (second).
    pub comparison: Comparison,
    /// The plan's explanation.
    pub explanation: String,
}

impl PaperRow {
    /// The row of `plan`, or `None` when no hybrid or no single-mode layout fits.
    pub fn from_plan(plan: &Plan) -> Option<Self> {
        let h = plan.best_hybrid.as_ref()?;
        let s = plan.best_single()?;
        let pair = |c: &Option<Candidate>| c.as_ref().map(LayoutScore::of);
        Some(Self {
            devices: plan.devices,
            model: plan.model.clone(),
            cluster: plan.cluster.clone(),
            balance: plan.balance,
            best_hybrid: h.config.label(),
            best_single: s.config.label(),
            best_single_class: s.class().label().to_string(),
            hybrid_samples_per_s: h.result.samples_per_s,
            single_samples_per_s: s.result.samples_per_s,
            hybrid_utilization: h.result.utilization_mean,
            single_utilization: s.result.utilization_mean,
            throughput_ratio: h.result.samples_per_s / s.result.samples_per_s,
            utilization_ratio: h.result.utilization_mean / s.result.utilization_mean,
            hybrid_bubble: h.result.bubble,
            hybrid_mfu: h.result.mfu,
            single_mfu: s.result.mfu,
            best_dp: pair(&plan.best_dp),
            best_tp: pair(&plan.best_tp),
            best_pp: pair(&plan.best_pp),
            best_pipelined: pair(&plan.best_pipelined),
            best_overall: plan.best.config.label(),
            comparison: Comparison::of(h, s),
            explanation: plan.explanation.clone(),
        })
    }
}

fn yes() -> bool {
    true
}

fn all_recompute() -> Vec<Recompute> {
    vec![Recompute::None, Recompute::Selective, Recompute::Full]
}

/// `config` simulated with the first of `levels` under which it fits (the last one tried
/// when none does).
fn with_least_recompute(
    mut config: SimConfig,
    levels: &[Recompute],
    cluster: &Cluster,
) -> (SimConfig, Result<SimResult, BalanceError>) {
    let mut outcome = Err(BalanceError::NoFeasibleLayout(
        "no recomputation level to try".into(),
    ));
    for &level in levels {
        config.recompute = level;
        outcome = simulate(&config, cluster);
        if matches!(&outcome, Ok(r) if r.fits) {
            break;
        }
    }
    (config, outcome)
}

fn all_zero_stages() -> Vec<ZeroStage> {
    vec![ZeroStage::Off, ZeroStage::Optimizer, ZeroStage::Gradients]
}

fn divisors(n: usize) -> impl Iterator<Item = usize> {
    (1..=n).filter(move |d| n.is_multiple_of(*d))
}

/// Every configuration the request spans (valid by construction; memory unchecked).
pub fn enumerate(req: &PlanRequest) -> Vec<SimConfig> {
    let n = req.devices;
    let heads = req.shape.n_heads as usize;
    let blocks = req.shape.n_layers as usize;
    let mut out = Vec::new();
    for tp in divisors(n).filter(|t| heads.is_multiple_of(*t)) {
        for pp in divisors(n / tp).filter(|&p| p <= blocks) {
            let dp = n / (tp * pp);
            let Ok(mesh) = Mesh::new(dp, tp, pp) else {
                continue;
            };
            let schedules: Vec<ScheduleSpec> = if pp == 1 {
                vec![ScheduleSpec::ONE_F_ONE_B]
            } else {
                req.schedules
                    .iter()
                    .copied()
                    .filter(|s| s.chunks(pp) <= blocks)
                    .collect()
            };
            let modes: Vec<DpMode> = if dp == 1 {
                vec![DpMode::Sync]
            } else {
                req.dp_modes.clone()
            };
            // On mixed hardware, also try the pipeline the other way round, so the heavy last
            // stage can sit on the devices the mesh puts first.
            let orders: &[bool] = if pp > 1 && !req.cluster.is_homogeneous() {
                &[false, true]
            } else {
                &[false]
            };
            let comps: Vec<Compression> = if dp == 1 {
                vec![Compression::none()]
            } else {
                req.compressions.clone()
            };
            for schedule in schedules {
                for &m in &req.micro_batches {
                    if m == 0 || !req.global_batch.is_multiple_of(m) || req.global_batch / m < dp {
                        continue;
                    }
                    if schedule.build(pp, m).is_err() {
                        continue;
                    }
                    for &mode in &modes {
                        for comp in &comps {
                            let zeros: Vec<ZeroStage> = if dp > 1 && mode == DpMode::Sync {
                                req.zero_stages
                                    .iter()
                                    .copied()
                                    .filter(|z| !z.shards_gradients() || comp.name == "none")
                                    .collect()
                            } else {
                                vec![ZeroStage::Off]
                            };
                            for &zero in &zeros {
                                for &reverse_stages in orders {
                                    let mut cfg = SimConfig::new(
                                        req.shape.clone(),
                                        mesh,
                                        schedule,
                                        m,
                                        req.global_batch,
                                    );
                                    cfg.dp_mode = mode;
                                    cfg.compression = comp.clone();
                                    cfg.zero = zero;
                                    cfg.sequence_parallel = req.sequence_parallel && tp > 1;
                                    cfg.balance = req.balance;
                                    cfg.record_timeline = false;
                                    cfg.reverse_stages = reverse_stages;
                                    out.push(cfg);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn describe(c: &Candidate) -> String {
    let r = &c.result;
    format!(
        "{} ({}): {:.1} samples/s, step {}, utilization {:.1}% (min {:.1}%), bubble {:.1}%, bytes/step dp {} tp {} pp {} (intra-node {}, inter-node {}), peak memory {}",
        c.config.label(),
        c.class().label(),
        r.samples_per_s,
        fmt_s(r.step_s),
        100.0 * r.utilization_mean,
        100.0 * r.utilization_min,
        100.0 * r.bubble,
        fmt_bytes(r.bytes.dp),
        fmt_bytes(r.bytes.tp),
        fmt_bytes(r.bytes.pp),
        fmt_bytes(r.bytes.intra),
        fmt_bytes(r.bytes.inter),
        fmt_mem(c.peak_memory() as f64)
    )
}

/// Two simulated layouts side by side, everything read off their results: which one is
/// faster and by how much, and how each part of a device's step ([`StepPart`]) differs.
/// [`explain`] writes its text from this; [`PaperRow::comparison`] carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Whether the first layout has at least the second's simulated samples/s.
    pub first_faster: bool,
    /// Faster / slower simulated samples/s (at least 1).
    pub speedup: f64,
    /// Per part of the mean device's step: the slower layout's seconds minus the faster's
    /// (positive: the faster layout spends less there), in [`StepPart::ALL`] order.
    pub gaps: Vec<(StepPart, f64)>,
    /// The part with the largest positive gap: where most of the faster layout's lead comes
    /// from (`None` when it spends no less anywhere).
    pub dominant: Option<StepPart>,
    /// The part with the most negative gap: where the faster layout spends most extra time
    /// (`None` when it spends no more anywhere).
    pub offset: Option<StepPart>,
    /// The slower layout's mean device step by the breakdown, seconds.
    pub slower_step_s: f64,
}

impl Comparison {
    /// Compares `a` with `b`.
    pub fn of(a: &Candidate, b: &Candidate) -> Self {
        let first_faster = a.result.samples_per_s >= b.result.samples_per_s;
        let (fast, slow) = if first_faster { (a, b) } else { (b, a) };
        let gaps: Vec<(StepPart, f64)> = StepPart::ALL
            .iter()
            .map(|&p| {
                (
                    p,
                    slow.result.breakdown.part(p) - fast.result.breakdown.part(p),
                )
            })
            .collect();
        let extreme = |sign: f64| {
            gaps.iter()
                // Float residue of equal parts (below a nanosecond) is no difference.
                .filter(|(_, g)| sign * g > 1e-9)
                .max_by(|x, y| (sign * x.1).total_cmp(&(sign * y.1)))
                .map(|(p, _)| *p)
        };
        Self {
            first_faster,
            speedup: fast.result.samples_per_s / slow.result.samples_per_s,
            dominant: extreme(1.0),
            offset: extreme(-1.0),
            slower_step_s: slow.result.breakdown.total_s(),
            gaps,
        }
    }

    /// The slower layout's seconds in `part` minus the faster's.
    pub fn gap(&self, part: StepPart) -> f64 {
        self.gaps
            .iter()
            .find(|(p, _)| *p == part)
            .map_or(0.0, |(_, g)| *g)
    }

    /// The slower layout's mean step (by the breakdown) minus the faster's: the sum of the
    /// gaps.
    pub fn step_gap_s(&self) -> f64 {
        self.gaps.iter().map(|(_, g)| g).sum()
    }

    /// The two layouts as `(faster, slower)`.
    pub fn ordered<'c>(
        &self,
        a: &'c Candidate,
        b: &'c Candidate,
    ) -> (&'c Candidate, &'c Candidate) {
        if self.first_faster {
            (a, b)
        } else {
            (b, a)
        }
    }
}

/// What `part` of a step depends on, with the two layouts' numbers (faster first).
fn part_cause(part: StepPart, f: &Candidate, s: &Candidate) -> String {
    let (rf, rs) = (&f.result, &s.result);
    let (mf, ms) = (f.config.mesh, s.config.mesh);
    match part {
        StepPart::Compute => format!(
            "forward and backward at {} vs {} sequences per micro-batch on tp {} vs {} shards, MFU {:.1}% vs {:.1}%",
            rf.replica_micro_batch.iter().max().copied().unwrap_or(0),
            rs.replica_micro_batch.iter().max().copied().unwrap_or(0),
            mf.tp,
            ms.tp,
            100.0 * rf.mfu,
            100.0 * rs.mfu
        ),
        StepPart::TpAllReduce => format!(
            "blocking tensor-parallel all-reduces at tp {} vs {}, {} vs {} per step",
            mf.tp,
            ms.tp,
            fmt_bytes(rf.bytes.tp),
            fmt_bytes(rs.bytes.tp)
        ),
        StepPart::PipelineIdle => format!(
            "idle inside the pipeline at pp {} with {} micro-batches ({}) vs pp {} with {} ({}), bubble {:.1}% vs {:.1}%",
            mf.pp,
            f.config.micro_batches,
            f.config.schedule,
            ms.pp,
            s.config.micro_batches,
            s.config.schedule,
            100.0 * rf.bubble,
            100.0 * rs.bubble
        ),
        StepPart::DpSync => format!(
            "gradient synchronisation not hidden behind backward: dp {} vs {} replicas, {} vs {} of DP traffic per step (compression {} vs {})",
            mf.dp,
            ms.dp,
            fmt_bytes(rf.bytes.dp),
            fmt_bytes(rs.bytes.dp),
            f.config.compression.name,
            s.config.compression.name
        ),
        StepPart::Optimizer => format!(
            "the optimizer over each device's share of the state, sharded {} vs {} ways (tp·pp)",
            mf.tp * mf.pp,
            ms.tp * ms.pp
        ),
    }
}

/// Which of `a` and `b` is faster, written from their simulated numbers: by what ratio;
/// where a device's step goes in each (compute, TP all-reduces, pipeline idle, exposed DP
/// synchronisation, optimizer); which part accounts for most of the difference and in which
/// direction, and which part works the other way; bytes per link class of `topology`;
/// utilization, bubble and memory against `capacity`. The faster layout is named first
/// whatever the argument order; every number is simulated and the text says so.
pub fn explain(a: &Candidate, b: &Candidate, capacity: u64, topology: &Topology) -> String {
    let cmp = Comparison::of(a, b);
    let (f, s) = cmp.ordered(a, b);
    let (rf, rs) = (&f.result, &s.result);
    let (lf, ls) = (f.config.mesh.to_string(), s.config.mesh.to_string());
    let verdict = if cmp.speedup > 1.0 {
        "is faster than"
    } else {
        "is as fast as"
    };
    let mut out = format!(
        "SIMULATED: {} ({}) {verdict} {} ({}): {:.2}x the samples/s ({:.1} vs {:.1}), step {} vs {}. ",
        f.config.label(),
        f.class().label(),
        s.config.label(),
        s.class().label(),
        cmp.speedup,
        rf.samples_per_s,
        rs.samples_per_s,
        fmt_s(rf.step_s),
        fmt_s(rs.step_s),
    );
    out.push_str(&format!(
        "Per device and step ({lf} vs {ls}): {}. ",
        StepPart::ALL
            .iter()
            .map(|&p| format!(
                "{p} {} vs {}",
                fmt_s(rf.breakdown.part(p)),
                fmt_s(rs.breakdown.part(p))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let step_gap = cmp.step_gap_s();
    match cmp.dominant {
        Some(p) => {
            let share = if step_gap <= 0.0 {
                String::new()
            } else if cmp.gap(p) <= step_gap {
                format!(
                    ", {:.0}% of the {} by which its mean step is shorter",
                    100.0 * cmp.gap(p) / step_gap,
                    fmt_s(step_gap)
                )
            } else {
                format!(
                    ", more than the {} by which its mean step is shorter (the other parts give {} back)",
                    fmt_s(step_gap),
                    fmt_s(cmp.gap(p) - step_gap)
                )
            };
            out.push_str(&format!(
                "Most of the difference is {p}: {lf} spends {} less there per step{share} ({}). ",
                fmt_s(cmp.gap(p)),
                part_cause(p, f, s)
            ));
        }
        None => out.push_str(&format!(
            "No part of {lf}'s mean device step is shorter: the breakdown, a mean over devices, does not show where its lead comes from. "
        )),
    }
    if let Some(p) = cmp.offset {
        out.push_str(&format!(
            "Against that, it spends {} more on {p} ({}). ",
            fmt_s(-cmp.gap(p)),
            part_cause(p, f, s)
        ));
    }
    out.push_str(&format!(
        "Bytes per step: intra-node over {} {} vs {}, inter-node over {} {} vs {}. Utilization {:.1}% vs {:.1}%, bubble {:.1}% vs {:.1}%, peak memory {} vs {} of {} per device.",
        topology.intra.describe(),
        fmt_bytes(rf.bytes.intra),
        fmt_bytes(rs.bytes.intra),
        topology.inter.describe(),
        fmt_bytes(rf.bytes.inter),
        fmt_bytes(rs.bytes.inter),
        100.0 * rf.utilization_mean,
        100.0 * rs.utilization_mean,
        100.0 * rf.bubble,
        100.0 * rs.bubble,
        fmt_mem(f.peak_memory() as f64),
        fmt_mem(s.peak_memory() as f64),
        fmt_mem(capacity as f64),
    ));
    out
}

/// Plans `req`: simulates every configuration, drops those that do not fit, ranks by
/// samples/s (ties: fewer bytes). Errors if the request is malformed or nothing fits.
pub fn plan(req: &PlanRequest) -> Result<Plan, BalanceError> {
    req.shape.validate()?;
    req.cluster.validate()?;
    if req.devices == 0 || req.devices > req.cluster.len() {
        return Err(BalanceError::NoFeasibleLayout(format!(
            "{} devices requested, cluster {} has {}",
            req.devices,
            req.cluster.name,
            req.cluster.len()
        )));
    }
    let mut excluded_compressions = Vec::new();
    let gated;
    let req = if req.allow_lossy {
        req
    } else {
        let table = match &req.accuracy {
            Some(t) => t.clone(),
            None => AccuracyTable::committed()?,
        };
        let mut r = req.clone();
        r.compressions.retain(|c| match table.exclusion(&c.name) {
            Some(why) => {
                excluded_compressions.push(why);
                false
            }
            None => true,
        });
        gated = r;
        &gated
    };
    let configs = enumerate(req);
    let considered = configs.len();
    let mut rejected_memory = 0;
    let mut fitting: Vec<Candidate> = Vec::new();
    let mut last_error = None;
    for config in configs {
        let levels = if req.recompute.is_empty() {
            &[Recompute::None][..]
        } else {
            &req.recompute[..]
        };
        let (config, outcome) = with_least_recompute(config, levels, &req.cluster);
        match outcome {
            Ok(result) if result.fits => fitting.push(Candidate { config, result }),
            Ok(_) | Err(BalanceError::OutOfMemory { .. }) => rejected_memory += 1,
            Err(e) => last_error = Some(e),
        }
    }
    fitting.sort_by(|a, b| {
        b.result
            .samples_per_s
            .total_cmp(&a.result.samples_per_s)
            .then(a.result.bytes.total().total_cmp(&b.result.bytes.total()))
    });
    let Some(best) = fitting.first().cloned() else {
        return Err(BalanceError::NoFeasibleLayout(format!(
            "{considered} configurations of {} on {} x {}: {rejected_memory} do not fit in memory{}",
            req.shape.name,
            req.devices,
            req.cluster.name,
            last_error.map(|e| format!(", last error: {e}")).unwrap_or_default()
        )));
    };
    let best_of = |class: LayoutClass| fitting.iter().find(|c| c.class() == class).cloned();
    let capacity_bytes = req
        .cluster
        .devices
        .iter()
        .take(req.devices)
        .map(|d| d.memory_bytes)
        .min()
        .unwrap_or(0);
    let mut plan = Plan {
        model: req.shape.name.clone(),
        cluster: req.cluster.name.clone(),
        devices: req.devices,
        global_batch: req.global_batch,
        balance: req.balance,
        capacity_bytes,
        best_hybrid: best_of(LayoutClass::Hybrid),
        best_dp: best_of(LayoutClass::DpOnly),
        best_tp: best_of(LayoutClass::TpOnly),
        best_pp: best_of(LayoutClass::PpOnly),
        best_pipelined: fitting.iter().find(|c| c.config.mesh.pp > 1).cloned(),
        best,
        fitting: fitting.len(),
        ranking: fitting.into_iter().take(req.keep.max(1)).collect(),
        considered,
        rejected_memory,
        excluded_compressions,
        explanation: String::new(),
        zero_headroom: Vec::new(),
    };
    plan.zero_headroom = zero_headroom(&plan.best, &req.cluster, capacity_bytes);
    let topology = &req.cluster.topology;
    plan.explanation = match (plan.best_single(), plan.best_hybrid.as_ref()) {
        // The winner is hybrid (or a single device): against the best single-mode layout.
        (Some(single), _) if plan.best.class() != single.class() => {
            explain(&plan.best, single, capacity_bytes, topology)
        }
        // A single-mode layout wins: against the best hybrid.
        (Some(_), Some(hybrid)) => explain(&plan.best, hybrid, capacity_bytes, topology),
        (Some(_), None) => format!(
            "SIMULATED: no hybrid layout fits or exists for {} devices; the winner is {}.",
            req.devices,
            describe(&plan.best)
        ),
        (None, _) => format!(
            "SIMULATED: no single-mode layout fits or exists for {} devices; the winner is {}.",
            req.devices,
            describe(&plan.best)
        ),
    };
    Ok(plan)
}

/// The planner's answer as text (what `meshrec plan` prints): a header, the `top` best
/// fitting layouts as a markdown table (at most [`PlanRequest::keep`]), the best layout of
/// each class, and the explanation of the winner against the best single-mode layout.
/// Marked SIMULATED throughout.
pub fn render_report(plan: &Plan, top: usize) -> String {
    let mut out = String::new();
    let shape = &plan.best.config.shape;
    out.push_str(&format!(
        "SIMULATED layout plan (roofline compute + alpha-beta links; nothing here was measured)\n\
         model {} ({:.2}B parameters, vocab {}, d {}, {} blocks, {} heads), {} devices of cluster {} ({} per device), global batch {} sequences, adaptive balancing {}\n\
         {} configurations simulated: {} fit in memory, {} rejected for memory.\n\n",
        plan.model,
        shape.params() as f64 / 1e9,
        shape.vocab,
        shape.d_model,
        shape.n_layers,
        shape.n_heads,
        plan.devices,
        plan.cluster,
        fmt_mem(plan.capacity_bytes as f64),
        plan.global_batch,
        if plan.balance { "on" } else { "off" },
        plan.considered,
        plan.fitting,
        plan.rejected_memory,
    ));
    if !plan.excluded_compressions.is_empty() {
        out.push_str(
            "Compressors left out for their accuracy cost (measured, not simulated; `--allow-lossy` tries them):\n",
        );
        for why in &plan.excluded_compressions {
            out.push_str(&format!("- {why}\n"));
        }
        out.push('\n');
    }
    let n = top.min(plan.ranking.len());
    out.push_str(&format!(
        "Top {n} by simulated samples/s:\n\n\
         | # | class | dp | tp | pp | schedule | micro-batches | DP mode | compression | ZeRO | recompute | samples/s | step | util mean | util min | bubble | MFU | dp bytes | tp bytes | pp bytes | intra-node | inter-node | peak memory |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    ));
    for (i, c) in plan.ranking.iter().take(n).enumerate() {
        let (cfg, r) = (&c.config, &c.result);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {:.1} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {} | {} | {} | {} |\n",
            i + 1,
            c.class().label(),
            cfg.mesh.dp,
            cfg.mesh.tp,
            cfg.mesh.pp,
            cfg.schedule,
            if cfg.reverse_stages { " rev" } else { "" },
            cfg.micro_batches,
            cfg.dp_mode,
            cfg.compression.name,
            cfg.effective_zero().number(),
            cfg.recompute,
            r.samples_per_s,
            fmt_s(r.step_s),
            100.0 * r.utilization_mean,
            100.0 * r.utilization_min,
            100.0 * r.bubble,
            100.0 * r.mfu,
            fmt_bytes(r.bytes.dp),
            fmt_bytes(r.bytes.tp),
            fmt_bytes(r.bytes.pp),
            fmt_bytes(r.bytes.intra),
            fmt_bytes(r.bytes.inter),
            fmt_mem(c.peak_memory() as f64),
        ));
    }
    out.push_str("\nBest of each class (simulated):\n");
    let heads = shape.n_heads;
    let blocks = shape.n_layers;
    for (class, c, why_none) in [
        (LayoutClass::Hybrid, &plan.best_hybrid, String::new()),
        (LayoutClass::DpOnly, &plan.best_dp, String::new()),
        (
            LayoutClass::TpOnly,
            &plan.best_tp,
            format!(" (tp must divide the {heads} heads)"),
        ),
        (
            LayoutClass::PpOnly,
            &plan.best_pp,
            format!(" (pp at most the {blocks} blocks)"),
        ),
    ] {
        match c {
            Some(c) => out.push_str(&format!("- {}: {}\n", class.label(), describe(c))),
            None => out.push_str(&format!(
                "- {}: none fits or none is possible{why_none}\n",
                class.label()
            )),
        }
    }
    out.push_str(&format!(
        "\nWinner: {}\n\nWhy: {}\n",
        describe(&plan.best),
        plan.explanation
    ));
    if !plan.zero_headroom.is_empty() {
        out.push_str(
            "\nThe winner's layout under each ZeRO stage (simulated; fullest device; model scale = how many \
             times the parameters fit in the device's memory, activations and buffers held as they are):\n\n\
             | ZeRO | state / device | peak / device | samples/s | model scale |\n|---|---|---|---|---|\n",
        );
        for z in &plan.zero_headroom {
            out.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.2}x |\n",
                z.zero,
                fmt_mem(z.state_bytes as f64),
                fmt_mem(z.peak_memory_bytes as f64),
                z.samples_per_s,
                z.model_scale
            ));
        }
    }
    out
}
