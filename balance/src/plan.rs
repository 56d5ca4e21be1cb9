//! The planner: enumerates DP × TP × PP layouts, schedules, micro-batch counts, DP modes
//! and compressors for a model on a cluster, drops what does not fit in memory, ranks the
//! rest by **simulated** throughput, and explains the winner against the best single-mode
//! (DP-only, TP-only, PP-only) layout.
//!
//! Memory per device (see [`crate::sim`]): weights + gradients + AdamW state of the layers
//! it holds (a tied embedding copy on the last stage included), the activations of the
//! micro-batches its schedule keeps in flight (walked from the schedule itself), and two
//! DP buckets of communication buffers.

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::error::BalanceError;
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
}

impl PlanRequest {
    /// Defaults: GPipe, 1F1B and interleaved (v 2, 4); 1–64 micro-batches in powers of two;
    /// sync DP; no compression and top-k 1%; balancing on.
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
        }
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
    /// Fitting layouts ranked by throughput, best first (top 20).
    pub ranking: Vec<Candidate>,
    /// Configurations simulated.
    pub considered: usize,
    /// Configurations dropped because they do not fit in memory.
    pub rejected_memory: usize,
    /// Why the winner wins against the best single-mode layout, with numbers.
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
}

impl PaperRow {
    /// The row of `plan` for `req`, or `None` when no hybrid or no single-mode layout fits.
    pub fn from_plan(req: &PlanRequest, plan: &Plan) -> Option<Self> {
        let h = plan.best_hybrid.as_ref()?;
        let s = plan.best_single()?;
        Some(Self {
            devices: req.devices,
            model: req.shape.name.clone(),
            cluster: req.cluster.name.clone(),
            balance: req.balance,
            best_hybrid: h.config.label(),
            best_single: s.config.label(),
            hybrid_samples_per_s: h.result.samples_per_s,
            single_samples_per_s: s.result.samples_per_s,
            hybrid_utilization: h.result.utilization_mean,
            single_utilization: s.result.utilization_mean,
            throughput_ratio: h.result.samples_per_s / s.result.samples_per_s,
            utilization_ratio: h.result.utilization_mean / s.result.utilization_mean,
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

const GIB: f64 = (1u64 << 30) as f64;

fn describe(c: &Candidate) -> String {
    let r = &c.result;
    format!(
        "{}: {:.1} samples/s (step {:.4} s), utilization {:.1}% (min {:.1}%), bubble {:.1}%, bytes/step dp {:.2} GB tp {:.2} GB pp {:.2} GB (inter-node {:.2} GB), peak memory {:.1} GiB",
        c.config.label(),
        r.samples_per_s,
        r.step_s,
        100.0 * r.utilization_mean,
        100.0 * r.utilization_min,
        100.0 * r.bubble,
        r.bytes.dp / 1e9,
        r.bytes.tp / 1e9,
        r.bytes.pp / 1e9,
        r.bytes.inter / 1e9,
        c.peak_memory() as f64 / GIB
    )
}

/// Explains `a` against `b` in terms of throughput, bubble, communication and memory.
pub fn explain(a: &Candidate, b: &Candidate, capacity: u64) -> String {
    let (ra, rb) = (&a.result, &b.result);
    let ratio = ra.samples_per_s / rb.samples_per_s;
    let mut why = Vec::new();
    // Where each loses time: idle (bubble) and non-compute time per step.
    let idle_a = ra.step_s * (1.0 - ra.utilization_mean);
    let idle_b = rb.step_s * (1.0 - rb.utilization_mean);
    if (rb.bubble - ra.bubble).abs() > 0.02 {
        why.push(format!(
            "pipeline bubble {:.1}% vs {:.1}%",
            100.0 * ra.bubble,
            100.0 * rb.bubble
        ));
    }
    let (ia, ib) = (ra.bytes.inter, rb.bytes.inter);
    if (ia - ib).abs() > 0.1 * ia.max(ib) && ia.max(ib) > 0.0 {
        why.push(format!(
            "inter-node traffic {:.2} GB vs {:.2} GB per step",
            ia / 1e9,
            ib / 1e9
        ));
    }
    let (ta, tb) = (ra.bytes.total(), rb.bytes.total());
    if (ta - tb).abs() > 0.1 * ta.max(tb) && ta.max(tb) > 0.0 {
        why.push(format!(
            "total traffic {:.2} GB vs {:.2} GB per step",
            ta / 1e9,
            tb / 1e9
        ));
    }
    why.push(format!(
        "non-compute time per device {:.1} ms vs {:.1} ms per step",
        1e3 * idle_a,
        1e3 * idle_b
    ));
    let (ma, mb) = (a.peak_memory() as f64, b.peak_memory() as f64);
    if (ma - mb).abs() > 0.1 * ma.max(mb) {
        why.push(format!(
            "peak memory {:.1} GiB vs {:.1} GiB of {:.0} GiB",
            ma / GIB,
            mb / GIB,
            capacity as f64 / GIB
        ));
    }
    format!(
        "simulated: {} is {:.2}x the throughput of {} ({}). Winner: {}. Runner-up: {}.",
        a.config.mesh.label(),
        ratio,
        b.config.mesh.label(),
        why.join("; "),
        describe(a),
        describe(b)
    )
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
    let mut plan = Plan {
        best_hybrid: best_of(LayoutClass::Hybrid),
        best_dp: best_of(LayoutClass::DpOnly),
        best_tp: best_of(LayoutClass::TpOnly),
        best_pp: best_of(LayoutClass::PpOnly),
        best_pipelined: fitting.iter().find(|c| c.config.mesh.pp > 1).cloned(),
        best,
        ranking: fitting.into_iter().take(20).collect(),
        considered,
        rejected_memory,
        explanation: String::new(),
    };
    let capacity = req
        .cluster
        .devices
        .iter()
        .map(|d| d.memory_bytes)
        .min()
        .unwrap_or(0);
    plan.explanation = match plan.best_single() {
        Some(single) if single.config != plan.best.config => explain(&plan.best, single, capacity),
        Some(single) => format!(
            "simulated: the single-mode layout {} wins; the best hybrid is {}",
            describe(single),
            plan.best_hybrid
                .as_ref()
                .map_or("none that fits".into(), describe)
        ),
        None => format!(
            "simulated: no single-mode layout fits or exists for {} devices; winner {}",
            req.devices,
            describe(&plan.best)
        ),
    };
    Ok(plan)
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
        assert!(plan.explanation.contains("simulated"));
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
            plan.explanation.starts_with("simulated"),
            "{}",
            plan.explanation
        );
    }
}
