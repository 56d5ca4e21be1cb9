//! One simulated training step, in the order a real one runs: the pipeline phase (every
//! replica walks the schedule the executor runs), the gradient buckets that backward makes
//! ready, the collectives on each device's communication stream (tied table, DP buckets),
//! the optimizer, the step's end by DP mode, and the metrics of the whole.

use meshrec_comm::cost as link;
use meshrec_comm::cost::{LinkClass, LinkKind};
use meshrec_pipeline::{
    Action, Axis, DpMode, Event, EventKind, Recompute, Schedule, StageTimeline,
};

use crate::cluster::Cluster;
use crate::device::DeviceSpec;
use crate::error::BalanceError;
use crate::shape::ActivationPolicy;
use crate::sim::compression::Aggregation;
use crate::sim::config::SimConfig;
use crate::sim::prepare::{all_reduce_cost, zero_state_scale, Prepared};
use crate::sim::result::{CommBytes, SimResult, StepBreakdown};

/// Per (replica, stage) of the mesh: `grid[d][s]`.
type Grid<T> = Vec<Vec<T>>;

fn grid<T: Clone>(dp: usize, pp: usize, value: T) -> Grid<T> {
    vec![vec![value; pp]; dp]
}

/// The events of the step, one timeline per pipeline device (replica-major), when the
/// configuration asks for them.
struct Recording {
    pp: usize,
    timelines: Option<Vec<StageTimeline>>,
}

impl Recording {
    fn new(cfg: &SimConfig, prep: &Prepared) -> Self {
        let timelines = cfg.record_timeline.then(|| {
            prep.units
                .iter()
                .enumerate()
                .flat_map(|(d, row)| {
                    row.iter().enumerate().map(move |(s, u)| StageTimeline {
                        rank: u.rank,
                        label: format!("dp{d} pp{s}"),
                        events: Vec::new(),
                    })
                })
                .collect()
        });
        Self {
            pp: cfg.mesh.pp,
            timelines,
        }
    }

    fn push(
        &mut self,
        d: usize,
        s: usize,
        kind: EventKind,
        action: Option<Action>,
        span: (f64, f64),
    ) {
        if let Some(t) = self.timelines.as_mut() {
            t[d * self.pp + s].events.push(Event {
                kind,
                micro_batch: action.map(|a| a.micro_batch()),
                chunk: action.map(|a| a.chunk()),
                start_s: span.0,
                end_s: span.1,
            });
        }
    }

    fn finish(self) -> Vec<StageTimeline> {
        self.timelines.unwrap_or_default()
    }
}

/// What the pipeline phase leaves behind, per replica and stage.
struct PipelineOutcome {
    /// Forward and backward compute seconds.
    busy: Grid<f64>,
    /// Compute plus blocking TP all-reduces.
    occupied: Grid<f64>,
    /// End of the stage's last backward.
    compute_end: Grid<f64>,
    /// Start and slowdown of the last backward of each local chunk: gradients become final
    /// during it.
    last_backward: Grid<Vec<(f64, f64)>>,
    /// Peak activation bytes held.
    act_peak: Grid<f64>,
}

/// Every replica walks the schedule the executor runs: an action starts when its device is
/// free and its input has arrived (the previous chunk's forward plus the transfer, or the
/// next chunk's backward plus the transfer back); TP all-reduces lengthen it.
fn pipeline_phase(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    schedule: &Schedule,
    slow: &[f64],
    bytes: &mut CommBytes,
    rec: &mut Recording,
) -> Result<PipelineOutcome, BalanceError> {
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    let vn = pp * v;
    let m = cfg.micro_batches;
    let topo = &cluster.topology;
    // Link between the devices of two virtual stages of replica d.
    let pp_link = |d: usize, a: usize, b: usize| -> Option<(LinkClass, LinkKind)> {
        let (sa, sb) = (a % pp, b % pp);
        if sa == sb {
            return None;
        }
        let (ra, rb) = (cfg.rank(d, 0, sa), cfg.rank(d, 0, sb));
        let k = topo.link_kind(ra, rb);
        Some((topo.link(k), k))
    };
    let mut out = PipelineOutcome {
        busy: grid(dp, pp, 0.0),
        occupied: grid(dp, pp, 0.0),
        compute_end: grid(dp, pp, 0.0),
        last_backward: grid(dp, pp, vec![(0.0, 0.0); v]),
        act_peak: grid(dp, pp, 0.0),
    };
    for d in 0..dp {
        // End of the forward / backward of (virtual stage, micro-batch).
        let mut f_done = vec![vec![0.0f64; m]; vn];
        let mut b_done = vec![vec![0.0f64; m]; vn];
        let mut free = vec![0.0f64; pp];
        let mut act_now = vec![0.0f64; pp];
        schedule
            .walk(|s, action, vs| {
                let mb = action.micro_batch();
                let forward = action.is_forward();
                let factor = slow[cfg.rank(d, 0, s)];
                let st = &prep.vst[d][vs];
                // The walk visits an action only after those it waits for.
                let ready = if forward {
                    if vs == 0 {
                        0.0
                    } else {
                        f_done[vs - 1][mb]
                            + pp_link(d, vs - 1, vs).map_or(0.0, |(l, _)| {
                                link::p2p_time(prep.vst[d][vs - 1].out_bytes, &l)
                            })
                    }
                } else if vs + 1 == vn {
                    f_done[vs][mb]
                } else {
                    b_done[vs + 1][mb]
                        + pp_link(d, vs + 1, vs)
                            .map_or(0.0, |(l, _)| link::p2p_time(st.out_bytes, &l))
                };
                let start = free[s].max(ready);
                let (compute, comm) = if forward {
                    (st.fwd * factor, st.tp_fwd)
                } else {
                    (st.bwd * factor, st.tp_bwd)
                };
                let end = start + compute + comm;
                let kind = if forward {
                    EventKind::Forward
                } else {
                    EventKind::Backward
                };
                rec.push(d, s, kind, Some(action), (start, start + compute));
                if comm > 0.0 {
                    rec.push(
                        d,
                        s,
                        EventKind::TpAllReduce,
                        Some(action),
                        (start + compute, end),
                    );
                }
                let (_, tk) = prep.tp_link[d * pp + s];
                let tp_bytes = if forward {
                    st.tp_bytes_fwd
                } else {
                    st.tp_bytes_bwd
                };
                bytes.add(Axis::Tp, tk, tp_bytes);
                // The forward's output goes on, the backward's input gradient back.
                let send_to = if forward {
                    (vs + 1 < vn).then_some(vs + 1)
                } else {
                    vs.checked_sub(1)
                };
                if let Some((to, (l, k))) =
                    send_to.and_then(|to| pp_link(d, vs, to).map(|link| (to, link)))
                {
                    let payload = if forward {
                        st.out_bytes
                    } else {
                        prep.vst[d][to].out_bytes
                    };
                    bytes.add(Axis::Pp, k, payload * tp as f64);
                    rec.push(
                        d,
                        s,
                        EventKind::Send,
                        Some(action),
                        (end, end + link::p2p_time(payload, &l)),
                    );
                }
                if forward {
                    f_done[vs][mb] = end;
                    act_now[s] += st.act_bytes;
                    out.act_peak[d][s] = out.act_peak[d][s].max(act_now[s]);
                } else {
                    b_done[vs][mb] = end;
                    act_now[s] -= st.act_bytes;
                    out.last_backward[d][s][action.chunk()] = (start, factor);
                    out.compute_end[d][s] = out.compute_end[d][s].max(end);
                }
                out.busy[d][s] += compute;
                out.occupied[d][s] += compute + comm;
                free[s] = end;
            })
            .map_err(|e| cfg.layout_err(format!("replica {d}: {e}")))?;
    }
    Ok(out)
}

/// A collective on the communication streams of its members (DP buckets, the tied table).
struct Collective {
    /// (replica, stage) of each member.
    members: Vec<(usize, usize)>,
    ready: f64,
    dur: f64,
    kind: EventKind,
    /// Collectives that must finish first (a bucket holding the tied table waits for its
    /// all-reduce between first and last stage).
    after: Vec<usize>,
}

/// A DP bucket of one device: when backward has made it final, its bytes, and whether it
/// holds the tied item table's gradient.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    ready: f64,
    bytes: f64,
    has_tied: bool,
}

/// Gradient synchronisation as collectives: the tied table's all-reduce between first and
/// last stage of each replica (before DP, as Megatron's embedding group), then each DP
/// bucket as soon as every member (sync) or its own replica (async) has it. Local SGD
/// exchanges no gradients.
fn gradient_collectives(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    pipe: &PipelineOutcome,
    bytes: &mut CommBytes,
) -> Vec<Collective> {
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    let vn = pp * v;
    let topo = &cluster.topology;
    let mut colls: Vec<Collective> = Vec::new();
    let tied = cfg.shape.tied_head && vn > 1 && prep.tied_grad_bytes > 0.0;
    let head_stage = (vn - 1) % pp;
    let mut tied_idx = vec![None; dp];
    let mut buckets: Grid<Vec<Bucket>> = grid(dp, pp, Vec::new());
    for d in 0..dp {
        if tied {
            let emb_ready = {
                let (start, f) = pipe.last_backward[d][0][0];
                start + prep.vst[d][0].bwd * f + prep.vst[d][0].tp_bwd
            };
            let chunk = (vn - 1) / pp;
            let (hs, hf) = pipe.last_backward[d][head_stage][chunk];
            let head_grad = prep.vst[d][vn - 1].grads_rev.first().map_or(0.0, |g| g.0);
            let head_ready = hs + head_grad * hf;
            let l = topo.link_kind(cfg.rank(d, 0, 0), cfg.rank(d, 0, head_stage));
            let (t, sent) = all_reduce_cost(2, prep.tied_grad_bytes, &topo.link(l));
            bytes.add(Axis::Dp, l, 2.0 * sent * tp as f64);
            tied_idx[d] = Some(colls.len());
            colls.push(Collective {
                members: vec![(d, 0), (d, head_stage)],
                ready: emb_ready.max(head_ready),
                dur: t,
                kind: EventKind::GradAllReduce,
                after: Vec::new(),
            });
        }
        // Gradients of chunk c are final during its last backward, layer by layer in
        // reverse; a bucket is ready when its last layer's gradient is.
        for s in 0..pp {
            for c in 0..v {
                let vs = c * pp + s;
                let st = &prep.vst[d][vs];
                let (start, f) = pipe.last_backward[d][s][c];
                let total_bwd: f64 = st.grads_rev.iter().map(|g| g.0).sum();
                let op_len = st.bwd * f + st.tp_bwd;
                let (mut acc_t, mut acc_b, mut has_tied) = (0.0, 0.0, false);
                let n_layers = st.grads_rev.len();
                for (i, &(lb, gb)) in st.grads_rev.iter().enumerate() {
                    acc_t += lb;
                    acc_b += gb;
                    let layer = prep.partition.range(vs).end - 1 - i;
                    has_tied |= tied && (layer == 0 || layer + 1 == cfg.shape.n_partition_layers());
                    if acc_b >= cfg.bucket_bytes as f64 || i + 1 == n_layers {
                        let frac = if total_bwd > 0.0 {
                            acc_t / total_bwd
                        } else {
                            1.0
                        };
                        buckets[d][s].push(Bucket {
                            ready: start + frac * op_len,
                            bytes: acc_b,
                            has_tied,
                        });
                        acc_b = 0.0;
                        has_tied = false;
                    }
                }
            }
            buckets[d][s].sort_by(|a, b| a.ready.total_cmp(&b.ready));
        }
    }
    if dp == 1 || matches!(cfg.dp_mode, DpMode::LocalSgd { .. }) {
        return colls;
    }
    let comp = &cfg.compression;
    let gb = f64::from(cfg.shape.precision.grad_bytes);
    let compress_s = |dev: &DeviceSpec, raw: f64| {
        let elems = raw / gb;
        dev.roofline_s(
            elems * comp.flops_per_element,
            elems * gb * comp.memory_passes,
        )
    };
    for s in 0..pp {
        let group: Vec<usize> = (0..dp).map(|d| cfg.rank(d, 0, s)).collect();
        let lk = topo.group_link_kind(&group);
        let lc = topo.link(lk);
        for (k, first) in buckets[0][s].iter().enumerate() {
            let wire = first.bytes * comp.wire_ratio;
            let (t, sent) = match comp.aggregation {
                // ZeRO-2: each rank receives only its shard of the bucket.
                Aggregation::AllReduce if cfg.effective_zero().shards_gradients() => (
                    link::reduce_scatter_time(dp, wire, &lc),
                    link::ring_gather_scatter_bytes_per_rank(dp, wire),
                ),
                Aggregation::AllReduce => all_reduce_cost(dp, wire, &lc),
                Aggregation::GatherThenSum => (
                    link::all_gather_time(dp, wire * dp as f64, &lc),
                    link::ring_gather_scatter_bytes_per_rank(dp, wire * dp as f64),
                ),
            };
            let cs = (0..dp)
                .map(|d| compress_s(&prep.units[d][s].dev, first.bytes))
                .fold(0.0, f64::max);
            bytes.add(Axis::Dp, lk, sent * (dp * tp) as f64);
            match cfg.dp_mode {
                DpMode::Sync => colls.push(Collective {
                    members: (0..dp).map(|d| (d, s)).collect(),
                    ready: (0..dp).map(|d| buckets[d][s][k].ready).fold(0.0, f64::max),
                    dur: t + cs,
                    kind: EventKind::DpAllReduce,
                    after: if first.has_tied {
                        tied_idx.iter().flatten().copied().collect()
                    } else {
                        Vec::new()
                    },
                }),
                DpMode::Async { .. } => {
                    for d in 0..dp {
                        colls.push(Collective {
                            members: vec![(d, s)],
                            ready: buckets[d][s][k].ready,
                            dur: t + cs,
                            kind: EventKind::DpAllReduce,
                            after: if first.has_tied {
                                tied_idx[d].into_iter().collect()
                            } else {
                                Vec::new()
                            },
                        });
                    }
                }
                DpMode::LocalSgd { .. } => {}
            }
        }
    }
    colls
}

/// Runs the collectives in order of readiness on per-device communication streams; returns
/// when each device's stream is free again.
fn run_collectives(cfg: &SimConfig, colls: &[Collective], rec: &mut Recording) -> Grid<f64> {
    let mut order: Vec<usize> = (0..colls.len()).collect();
    // A dependency is never later in this order: its key is at most the dependent's and,
    // pushed first, it wins ties.
    let key = |i: usize| {
        colls[i]
            .after
            .iter()
            .fold(colls[i].ready, |k, &j| k.max(colls[j].ready))
    };
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    let mut stream = grid(cfg.mesh.dp, cfg.mesh.pp, 0.0f64);
    let mut coll_end = vec![0.0f64; colls.len()];
    for &i in &order {
        let c = &colls[i];
        let mut start = c.ready;
        for &j in &c.after {
            start = start.max(coll_end[j]);
        }
        for &(d, s) in &c.members {
            start = start.max(stream[d][s]);
        }
        let end = start + c.dur;
        coll_end[i] = end;
        for &(d, s) in &c.members {
            stream[d][s] = end;
            rec.push(d, s, c.kind, None, (start, end));
        }
    }
    stream
}

/// The optimizer of each device: AdamW is memory-bound (~12 FLOPs per parameter, the
/// resident state read and written once); it starts when the device's backward and its
/// gradient synchronisation are done. Under ZeRO each DP rank updates its `1/dp` of the
/// parameters, then the updated shards are all-gathered over the DP group (exposed: the
/// executor does not overlap it with the next forward). Returns (end, optimizer seconds,
/// state bytes).
#[allow(clippy::too_many_arguments)]
fn optimizer_phase(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    pipe: &PipelineOutcome,
    stream: &Grid<f64>,
    slow: &[f64],
    rec: &mut Recording,
    bytes: &mut CommBytes,
) -> (Grid<f64>, Grid<f64>, Grid<f64>) {
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    let zero = cfg.effective_zero();
    let precision = &cfg.shape.precision;
    // The prepared state bytes are already sharded; AdamW moves the unsharded state of
    // the share of parameters it updates.
    let state_scale = zero_state_scale(cfg);
    let update_share = if zero.shards_optimizer() {
        1.0 / dp as f64
    } else {
        1.0
    };
    let topo = &cluster.topology;
    let mut dev_end = grid(dp, pp, 0.0f64);
    let mut opt_s = grid(dp, pp, 0.0f64);
    let mut state = grid(dp, pp, 0.0f64);
    for s in 0..pp {
        let group: Vec<usize> = (0..dp).map(|d| cfg.rank(d, 0, s)).collect();
        let lk = topo.group_link_kind(&group);
        for d in 0..dp {
            let (params, st_bytes) = (0..v).fold((0.0, 0.0), |acc, c| {
                let x = &prep.vst[d][c * pp + s];
                (acc.0 + x.params, acc.1 + x.state_bytes)
            });
            state[d][s] = st_bytes;
            let unit = &prep.units[d][s];
            let o = unit.dev.roofline_s(
                12.0 * params * update_share,
                2.0 * st_bytes / state_scale * update_share,
            ) * slow[unit.rank];
            let start = pipe.compute_end[d][s].max(stream[d][s]);
            opt_s[d][s] = o;
            dev_end[d][s] = start + o;
            rec.push(d, s, EventKind::Optimizer, None, (start, start + o));
            if zero.shards_optimizer() {
                let param_bytes = params * f64::from(precision.param_bytes);
                let gather = link::all_gather_time(dp, param_bytes, &topo.link(lk));
                if d == 0 {
                    let sent = link::ring_gather_scatter_bytes_per_rank(dp, param_bytes);
                    bytes.add(Axis::Dp, lk, sent * (dp * tp) as f64);
                }
                let end = dev_end[d][s];
                rec.push(d, s, EventKind::DpAllReduce, None, (end, end + gather));
                dev_end[d][s] = end + gather;
            }
        }
    }
    (dev_end, opt_s, state)
}

/// When the step ends, by DP mode: (per replica step seconds, step seconds, samples/s).
/// Sync waits for every replica; local SGD adds its amortised parameter average (all wait
/// for the slowest, then all-reduce stage by stage); async replicas run at their own pace.
fn step_end(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    dev_end: &Grid<f64>,
    bytes: &mut CommBytes,
) -> (Vec<f64>, f64, f64) {
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    let topo = &cluster.topology;
    let replica_end: Vec<f64> = dev_end
        .iter()
        .map(|row| row.iter().copied().fold(0.0, f64::max))
        .collect();
    let slowest = replica_end.iter().copied().fold(0.0, f64::max);
    match cfg.dp_mode {
        DpMode::Sync => (
            vec![slowest; dp],
            slowest,
            cfg.global_batch as f64 / slowest,
        ),
        DpMode::LocalSgd { sync_every } => {
            let k = sync_every.max(1) as f64;
            let mut avg = 0.0f64;
            if dp > 1 {
                for s in 0..pp {
                    let group: Vec<usize> = (0..dp).map(|d| cfg.rank(d, 0, s)).collect();
                    let lk = topo.group_link_kind(&group);
                    let param_bytes = (0..v).map(|c| prep.vst[0][c * pp + s].params).sum::<f64>()
                        * f64::from(cfg.shape.precision.param_bytes);
                    let (t, sent) = all_reduce_cost(dp, param_bytes, &topo.link(lk));
                    bytes.add(Axis::Dp, lk, sent * (dp * tp) as f64 / k);
                    avg = avg.max(t);
                }
            }
            let t = slowest + avg / k;
            (vec![t; dp], t, cfg.global_batch as f64 / t)
        }
        DpMode::Async { .. } => {
            let m = cfg.micro_batches;
            let sps: f64 = (0..dp)
                .map(|d| (m * prep.b[d]) as f64 / replica_end[d])
                .sum();
            (replica_end, cfg.global_batch as f64 / sps, sps)
        }
    }
}

/// One simulated step. `slow` stretches each global rank's compute (1 = as modelled).
pub(crate) fn run_step(
    cfg: &SimConfig,
    cluster: &Cluster,
    prep: &Prepared,
    slow: &[f64],
) -> Result<SimResult, BalanceError> {
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    let schedule = cfg.pipeline_schedule()?;
    let mut bytes = CommBytes::default();
    let mut rec = Recording::new(cfg, prep);

    let pipe = pipeline_phase(cfg, cluster, prep, &schedule, slow, &mut bytes, &mut rec)?;
    let colls = gradient_collectives(cfg, cluster, prep, &pipe, &mut bytes);
    let stream = run_collectives(cfg, &colls, &mut rec);
    let (dev_end, opt_s, state) = optimizer_phase(
        cfg, cluster, prep, &pipe, &stream, slow, &mut rec, &mut bytes,
    );
    let (replica_step_s, step_s, samples_per_s) =
        step_end(cfg, cluster, prep, &dev_end, &mut bytes);

    // ---- metrics ----
    let world = cfg.mesh.world_size();
    let mut utilization = vec![0.0; world];
    let mut peak_memory = vec![0u64; world];
    let mut state_bytes = vec![0u64; world];
    let mut fits = true;
    let mut bubbles = Vec::with_capacity(dp * pp);
    let mut bubble_per_stage = Vec::with_capacity(pp);
    let mut breakdown = StepBreakdown::default();
    for d in 0..dp {
        let span = pipe.compute_end[d].iter().copied().fold(0.0, f64::max);
        for s in 0..pp {
            let (busy, occupied, end) =
                (pipe.busy[d][s], pipe.occupied[d][s], pipe.compute_end[d][s]);
            let u = (busy + opt_s[d][s]) / replica_step_s[d];
            breakdown.compute_s += busy;
            breakdown.tp_comm_s += occupied - busy;
            breakdown.pipeline_idle_s += (end - occupied).max(0.0);
            breakdown.optimizer_s += opt_s[d][s];
            breakdown.sync_s += (replica_step_s[d] - end - opt_s[d][s]).max(0.0);
            // Two DP buckets in flight as communication buffers (never more than the
            // device's gradients).
            let comm_buf = if dp > 1 {
                let grads: f64 = (0..v)
                    .flat_map(|c| prep.vst[d][c * pp + s].grads_rev.iter().map(|g| g.1))
                    .sum();
                (2.0 * cfg.bucket_bytes as f64).min(grads)
            } else {
                0.0
            };
            // Recomputation's working set: one block's dropped activations of one
            // micro-batch, alive while backward runs that block again.
            let recompute_working = if cfg.recompute == Recompute::None {
                0.0
            } else {
                let shape = &cfg.shape;
                let policy = cfg.activation_policy();
                let kept_all = ActivationPolicy {
                    recompute: Recompute::None,
                    ..policy
                };
                let dropped = shape.block_activation_elems_per_token_under(tp as u32, kept_all)
                    - shape.block_activation_elems_per_token_under(tp as u32, policy);
                dropped
                    * (prep.b[d] as u64 * shape.seq_len) as f64
                    * f64::from(shape.precision.activation_bytes)
            };
            let mem =
                (state[d][s] + pipe.act_peak[d][s] + comm_buf + recompute_working).ceil() as u64;
            for t in 0..tp {
                let r = cfg.rank(d, t, s);
                utilization[r] = u;
                peak_memory[r] = mem;
                state_bytes[r] = state[d][s].ceil() as u64;
                fits &= mem <= cluster.devices[r].memory_bytes;
            }
            let bub = if span > 0.0 {
                1.0 - occupied / span
            } else {
                0.0
            };
            // Float residue of a stage busy for the whole span is no bubble.
            let bub = if bub < 1e-12 { 0.0 } else { bub };
            bubbles.push(bub);
            if d == 0 {
                bubble_per_stage.push(bub);
            }
        }
    }
    let units = (dp * pp) as f64;
    breakdown.compute_s /= units;
    breakdown.tp_comm_s /= units;
    breakdown.pipeline_idle_s /= units;
    breakdown.optimizer_s /= units;
    breakdown.sync_s /= units;
    let utilization_mean = utilization.iter().sum::<f64>() / world as f64;
    let utilization_min = utilization.iter().copied().fold(f64::INFINITY, f64::min);
    let peak: f64 = (0..world).map(|r| cluster.devices[r].peak_flops).sum();
    let model_flops = samples_per_s * cfg.shape.seq_len as f64 * cfg.shape.train_flops_per_token();
    Ok(SimResult {
        layout: cfg.label(),
        step_s,
        samples_per_s,
        tokens_per_s: samples_per_s * cfg.shape.seq_len as f64,
        utilization,
        utilization_mean,
        utilization_min,
        mfu: model_flops / peak,
        bubble: bubbles.iter().sum::<f64>() / bubbles.len() as f64,
        bubble_per_stage,
        bytes,
        peak_memory_bytes: peak_memory,
        state_bytes,
        fits,
        partition: prep.partition.clone(),
        replica_micro_batch: prep.b.clone(),
        replica_step_s,
        breakdown,
        timeline: rec.finish(),
    })
}
