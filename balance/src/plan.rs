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

use crate::cluster::Cluster;
use crate::error::BalanceError;
use crate::report::{fmt_bytes, fmt_mem, fmt_s};
use crate::shape::ModelShape;
use crate::sim::{simulate, Compression, DpMode, Mesh, Schedule, SimConfig, SimResult};

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
    pub schedules: Vec<Schedule>,
    /// Micro-batch counts to try (kept when they divide the batch sensibly).
    pub micro_batches: Vec<usize>,
    /// DP modes to try when `dp > 1`.
    pub dp_modes: Vec<DpMode>,
    /// Compressors to try when `dp > 1`.
    pub compressions: Vec<Compression>,
    /// Adaptive balancing in every simulated layout.
    pub balance: bool,
    /// How many of the best fitting layouts [`Plan::ranking`] keeps.
    pub keep: usize,
}

impl PlanRequest {
    /// Defaults: GPipe, 1F1B and interleaved (v 2, 4); 1–64 micro-batches in powers of two;
    /// sync DP; no compression and top-k 1%; balancing on; the best 20 kept.
    pub fn new(shape: ModelShape, cluster: Cluster, devices: usize, global_batch: usize) -> Self {
        let grad_bytes = shape.precision.grad_bytes;
        Self {
            shape,
            cluster,
            devices,
            global_batch,
            schedules: vec![
                Schedule::GPipe,
                Schedule::OneFOneB,
                Schedule::Interleaved { chunks: 2 },
                Schedule::Interleaved { chunks: 4 },
            ],
            micro_batches: vec![1, 2, 4, 8, 16, 32, 64],
            dp_modes: vec![DpMode::Sync],
            compressions: vec![Compression::none(), Compression::top_k(0.01, grad_bytes)],
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
    /// Why the winner wins against the best single-mode layout (or, when a single-mode
    /// layout wins, why it beats the best hybrid), with numbers.
    pub explanation: String,
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
            explanation: plan.explanation.clone(),
        })
    }
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
            let mesh = Mesh { dp, tp, pp };
            let schedules: Vec<Schedule> = if pp == 1 {
                vec![Schedule::OneFOneB]
            } else {
                req.schedules
                    .iter()
                    .copied()
                    .filter(|s| pp * s.chunks() <= blocks)
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
                    if schedule.validate(pp, m).is_err() {
                        continue;
                    }
                    for &mode in &modes {
                        for comp in &comps {
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

/// Why `a` is faster (or slower) than `b`: where a device's step goes in each (compute,
/// TP all-reduces, pipeline idle, exposed DP synchronisation, optimizer), which part makes
/// the difference and what causes it, then bytes per link class, utilization, bubble and
/// memory against `capacity`. Every number is simulated and the text says so.
pub fn explain(a: &Candidate, b: &Candidate, capacity: u64) -> String {
    let (ra, rb) = (&a.result, &b.result);
    let (ma, mb) = (a.config.mesh, b.config.mesh);
    let (la, lb) = (ma.label(), mb.label());
    let (ba, bb) = (ra.breakdown, rb.breakdown);
    let ratio = ra.samples_per_s / rb.samples_per_s;
    let mut out = format!(
        "SIMULATED: {} ({}) reaches {:.2}x the samples/s of {} ({}): {:.1} vs {:.1} samples/s, step {} vs {}. ",
        a.config.label(),
        a.class().label(),
        ratio,
        b.config.label(),
        b.class().label(),
        ra.samples_per_s,
        rb.samples_per_s,
        fmt_s(ra.step_s),
        fmt_s(rb.step_s),
    );
    let parts = [
        ("compute", ba.compute_s, bb.compute_s),
        ("TP all-reduce", ba.tp_comm_s, bb.tp_comm_s),
        ("pipeline idle", ba.pipeline_idle_s, bb.pipeline_idle_s),
        ("DP sync/wait", ba.sync_s, bb.sync_s),
        ("optimizer", ba.optimizer_s, bb.optimizer_s),
    ];
    out.push_str(&format!(
        "Per device and step ({la} vs {lb}): {}. ",
        parts
            .iter()
            .map(|(n, x, y)| format!("{n} {} vs {}", fmt_s(*x), fmt_s(*y)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let reason = |name: &str| -> String {
        match name {
            "compute" => format!(
                "compute per device: the same global batch spread as {} vs {} sequences per micro-batch on tp {} vs {} shards changes how efficiently each kernel runs (small kernels are memory-bound)",
                ra.replica_micro_batch.iter().max().copied().unwrap_or(0),
                rb.replica_micro_batch.iter().max().copied().unwrap_or(0),
                ma.tp,
                mb.tp
            ),
            "TP all-reduce" => format!(
                "blocking tensor-parallel all-reduces (4 per block per micro-batch): tp {} vs {} moving {} vs {} per step",
                ma.tp,
                mb.tp,
                fmt_bytes(ra.bytes.tp),
                fmt_bytes(rb.bytes.tp)
            ),
            "pipeline idle" => format!(
                "pipeline idle time (bubble and stage imbalance; the catalogue-sized head cannot be split across stages): pp {} with {} micro-batches vs pp {} with {}, bubble {:.1}% vs {:.1}%",
                ma.pp,
                a.config.micro_batches,
                mb.pp,
                b.config.micro_batches,
                100.0 * ra.bubble,
                100.0 * rb.bubble
            ),
            "DP sync/wait" => format!(
                "gradient synchronisation not hidden behind backward: dp {} vs {} replicas exchange {} vs {} per step, {} vs {} of it over inter-node links",
                ma.dp,
                mb.dp,
                fmt_bytes(ra.bytes.dp),
                fmt_bytes(rb.bytes.dp),
                fmt_bytes(ra.bytes.inter),
                fmt_bytes(rb.bytes.inter)
            ),
            _ => format!(
                "the optimizer over each device's share of the state (sharded {} vs {} ways by tp·pp)",
                ma.tp * ma.pp,
                mb.tp * mb.pp
            ),
        }
    };
    // Where `a` saves most, and where it pays most.
    let saves = parts
        .iter()
        .map(|(n, x, y)| (*n, y - x))
        .max_by(|p, q| p.1.total_cmp(&q.1));
    let pays = parts
        .iter()
        .map(|(n, x, y)| (*n, x - y))
        .max_by(|p, q| p.1.total_cmp(&q.1));
    if let Some((name, d)) = saves.filter(|s| s.1 > 0.0) {
        out.push_str(&format!(
            "{la} saves most in {name} ({} per step): {}. ",
            fmt_s(d),
            reason(name)
        ));
    }
    if let Some((name, d)) = pays.filter(|p| p.1 > 0.0) {
        out.push_str(&format!(
            "It pays {} more in {name}: {}. ",
            fmt_s(d),
            reason(name)
        ));
    }
    out.push_str(&format!(
        "Bytes per step: intra-node {} vs {}, inter-node {} vs {}. Utilization {:.1}% vs {:.1}%, bubble {:.1}% vs {:.1}%, peak memory {} vs {} of {} per device.",
        fmt_bytes(ra.bytes.intra),
        fmt_bytes(rb.bytes.intra),
        fmt_bytes(ra.bytes.inter),
        fmt_bytes(rb.bytes.inter),
        100.0 * ra.utilization_mean,
        100.0 * rb.utilization_mean,
        100.0 * ra.bubble,
        100.0 * rb.bubble,
        fmt_mem(a.peak_memory() as f64),
        fmt_mem(b.peak_memory() as f64),
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
    let configs = enumerate(req);
    let considered = configs.len();
    let mut rejected_memory = 0;
    let mut fitting: Vec<Candidate> = Vec::new();
    let mut last_error = None;
    for config in configs {
        match simulate(&config, &req.cluster) {
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
        explanation: String::new(),
    };
    plan.explanation = match (plan.best_single(), plan.best_hybrid.as_ref()) {
        // The winner is hybrid (or a single device): against the best single-mode layout.
        (Some(single), _) if plan.best.class() != single.class() => {
            explain(&plan.best, single, capacity_bytes)
        }
        // A single-mode layout wins: why it beats the best hybrid.
        (Some(_), Some(hybrid)) => format!(
            "The best layout is single-mode. {}",
            explain(&plan.best, hybrid, capacity_bytes)
        ),
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
    let n = top.min(plan.ranking.len());
    out.push_str(&format!(
        "Top {n} by simulated samples/s:\n\n\
         | # | class | dp | tp | pp | schedule | micro-batches | DP mode | compression | samples/s | step | util mean | util min | bubble | MFU | dp bytes | tp bytes | pp bytes | intra-node | inter-node | peak memory |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    ));
    for (i, c) in plan.ranking.iter().take(n).enumerate() {
        let (cfg, r) = (&c.config, &c.result);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {:.1} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {} | {} | {} | {} |\n",
            i + 1,
            c.class().label(),
            cfg.mesh.dp,
            cfg.mesh.tp,
            cfg.mesh.pp,
            cfg.schedule.label(),
            if cfg.reverse_stages { " rev" } else { "" },
            cfg.micro_batches,
            cfg.dp_mode.label(),
            cfg.compression.name,
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceSpec;
    use meshrec_comm::cost::LinkClass;

    #[test]
    fn never_returns_a_layout_that_does_not_fit() {
        // 1B model on 12 GiB devices: DP-only (16.5 GB of state per replica) cannot fit; the
        // planner must shard, and every ranked layout must fit every device.
        let shape = ModelShape::preset_1b();
        let small = DeviceSpec {
            memory_bytes: 12 << 30,
            ..DeviceSpec::t4_16gb()
        };
        assert!(shape.state_bytes() > small.memory_bytes);
        let cluster = Cluster::homogeneous(
            "t4x8",
            small,
            8,
            8,
            LinkClass::pcie4(),
            LinkClass::ethernet_10g(),
        )
        .unwrap();
        let mut req = PlanRequest::new(shape, cluster, 8, 64);
        req.micro_batches = vec![4, 8, 16];
        let plan = plan(&req).unwrap();
        assert!(plan.rejected_memory > 0);
        assert!(
            plan.best_dp.is_none(),
            "DP-only cannot hold 1B params x 16 B on 16 GB"
        );
        for c in plan
            .ranking
            .iter()
            .chain(plan.best_hybrid.iter())
            .chain([&plan.best])
        {
            assert!(c.result.fits);
            for (r, &m) in c.result.peak_memory_bytes.iter().enumerate() {
                assert!(
                    m <= req.cluster.devices[r].memory_bytes,
                    "{} rank {r}",
                    c.config.label()
                );
            }
        }
        assert!(plan.explanation.contains("SIMULATED"));
    }

    #[test]
    fn nothing_fits_is_an_error() {
        let shape = ModelShape::preset_1b();
        let tiny = DeviceSpec {
            memory_bytes: 1 << 30,
            ..DeviceSpec::t4_16gb()
        };
        let cluster =
            Cluster::homogeneous("tiny", tiny, 2, 2, LinkClass::pcie4(), LinkClass::pcie4())
                .unwrap();
        let req = PlanRequest::new(shape, cluster, 2, 16);
        let e = plan(&req).unwrap_err();
        assert!(matches!(e, BalanceError::NoFeasibleLayout(_)), "{e}");
    }

    #[test]
    fn enumeration_respects_heads_layers_and_batch() {
        let shape = ModelShape::preset_100m(); // 6 heads, 8 blocks
        let cluster = Cluster::preset("a100x8", 16).unwrap();
        let req = PlanRequest::new(shape, cluster, 16, 64);
        let configs = enumerate(&req);
        assert!(!configs.is_empty());
        for c in &configs {
            assert_eq!(c.mesh.world(), 16);
            assert_eq!(6 % c.mesh.tp, 0);
            assert!(c.mesh.pp * c.schedule.chunks() <= 8);
            assert!(64 / c.micro_batches >= c.mesh.dp);
        }
        // tp 4 does not divide 6 heads; pp 16 exceeds 8 blocks.
        assert!(configs.iter().all(|c| c.mesh.tp != 4 && c.mesh.pp != 16));
        assert!(configs
            .iter()
            .any(|c| LayoutClass::of(&c.mesh) == LayoutClass::Hybrid));
    }

    #[test]
    fn plan_ranks_by_throughput_and_explains() {
        let shape = ModelShape::preset_100m();
        let cluster = Cluster::preset("a100x8", 8).unwrap();
        let mut req = PlanRequest::new(shape, cluster, 8, 256);
        req.micro_batches = vec![2, 8];
        let plan = plan(&req).unwrap();
        assert!(plan
            .ranking
            .windows(2)
            .all(|w| w[0].result.samples_per_s >= w[1].result.samples_per_s));
        assert_eq!(plan.ranking[0], plan.best);
        let single = plan.best_single().unwrap();
        assert!(plan.best.result.samples_per_s >= single.result.samples_per_s);
        assert!(
            plan.explanation.contains("SIMULATED"),
            "{}",
            plan.explanation
        );
    }

    #[test]
    fn requests_by_name_and_the_rendered_report() {
        let e = PlanRequest::from_names("7b", "a100x8", 8, 64).unwrap_err();
        assert!(e.to_string().contains("known: 100m, 1b"), "{e}");
        let e = PlanRequest::from_names("1b", "a100x9", 8, 64).unwrap_err();
        assert!(e.to_string().contains("known: a100x8"), "{e}");

        let mut req = PlanRequest::from_names("100m", "a100x8", 16, 256).unwrap();
        req.micro_batches = vec![4, 16];
        req.keep = 5;
        let plan = plan(&req).unwrap();
        assert_eq!(plan.ranking.len(), 5);
        assert!(plan.fitting >= 5 && plan.fitting + plan.rejected_memory <= plan.considered);
        let text = render_report(&plan, 3);
        assert!(text.starts_with("SIMULATED layout plan"), "{text}");
        assert!(text.contains("Top 3 by simulated samples/s"), "{text}");
        let rows = text.lines().filter(|l| l.starts_with("| ")).count();
        assert_eq!(rows, 1 + 3, "{text}"); // header + 3 layouts
        let ranks: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| #"))
            .map(|l| l.split(" | ").next().unwrap_or(""))
            .collect();
        assert_eq!(ranks, ["| 1", "| 2", "| 3"], "{text}");
        for needle in [
            "- hybrid:",
            "- DP-only:",
            "- TP-only:",
            "- PP-only:",
            "Winner:",
            "Why: ",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        // The explanation names the best single-mode layout and where the time goes.
        let single = plan.best_single().unwrap().config.label();
        assert!(plan.explanation.contains(&single), "{}", plan.explanation);
        assert!(plan.explanation.contains("Per device and step"));
        assert!(plan.explanation.contains("inter-node"));
        // Asking for more than were kept shows what there is.
        assert!(render_report(&plan, 50).contains("Top 5 by"));
        assert_eq!(plan.to_string(), render_report(&plan, 10));
    }

    #[test]
    fn paper_row_compares_hybrid_with_the_best_single_mode_layout() {
        let shape = ModelShape::preset_100m();
        let cluster = Cluster::preset("a100x8", 8).unwrap();
        let mut req = PlanRequest::new(shape, cluster, 8, 256);
        req.micro_batches = vec![2, 8];
        let plan = plan(&req).unwrap();
        let row = PaperRow::from_plan(&plan).unwrap();
        let h = plan.best_hybrid.as_ref().unwrap();
        let s = plan.best_single().unwrap();
        assert_eq!(row.devices, 8);
        assert_eq!(row.model, "100m");
        assert_eq!(row.cluster, "a100x8");
        assert_eq!(row.best_hybrid, h.config.label());
        assert_eq!(row.best_single, s.config.label());
        assert!(
            (row.throughput_ratio - h.result.samples_per_s / s.result.samples_per_s).abs() < 1e-12
        );
        assert!(
            (row.utilization_ratio - h.result.utilization_mean / s.result.utilization_mean).abs()
                < 1e-12
        );
        // The single-mode layout is the best of the three single-mode bests.
        for best in [&row.best_dp, &row.best_tp, &row.best_pp]
            .into_iter()
            .flatten()
        {
            assert!(best.samples_per_s <= row.single_samples_per_s);
        }
        assert!(row.best_dp.is_some() && row.best_pp.is_some());
    }
}
