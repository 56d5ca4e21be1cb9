//! The constant part of a simulation: the device of each pipeline position, the batch split
//! over replicas, the partition of layers over virtual stages, and each virtual stage's
//! modelled compute, TP communication, activation and state sizes.

use std::collections::HashMap;

use meshrec_comm::cost as link;
use meshrec_comm::cost::{LinkClass, LinkKind};

use crate::cluster::Cluster;
use crate::cost::CostProfile;
use crate::device::DeviceSpec;
use crate::error::BalanceError;
use crate::partition::{Partition, PartitionProblem, StageSpec};
use crate::rebalance::split_batch;
use crate::shape::{ActivationPolicy, LayerKind};
use crate::sim::config::SimConfig;

/// Per-pipeline-device constants of a simulation.
pub(crate) struct Unit {
    pub(crate) dev: DeviceSpec,
    pub(crate) rank: usize,
}

/// One model chunk (virtual stage) of one replica: its modelled costs and sizes.
pub(crate) struct VStage {
    pub(crate) fwd: f64,
    pub(crate) bwd: f64,
    pub(crate) tp_fwd: f64,
    pub(crate) tp_bwd: f64,
    pub(crate) tp_bytes_fwd: f64,
    pub(crate) tp_bytes_bwd: f64,
    pub(crate) out_bytes: f64,
    pub(crate) act_bytes: f64,
    pub(crate) state_bytes: f64,
    pub(crate) params: f64,
    /// Per layer of the range, reversed: (bwd seconds, grad bytes, tied copy grad bytes).
    pub(crate) grads_rev: Vec<(f64, f64)>,
}

/// What does not change from step to step: devices, costs per virtual stage, the
/// partition and the batch split.
pub(crate) struct Prepared {
    pub(crate) units: Vec<Vec<Unit>>, // [replica][stage]
    pub(crate) vst: Vec<Vec<VStage>>, // [replica][virtual stage]
    pub(crate) partition: Partition,
    pub(crate) b: Vec<usize>,
    pub(crate) tp_link: Vec<(LinkClass, LinkKind)>, // per pipeline device index r*pp+s
    pub(crate) tied_grad_bytes: f64,
}

/// The resident state bytes per parameter under the configuration's ZeRO stage over the
/// unsharded ones (1 without ZeRO).
pub(crate) fn zero_state_scale(cfg: &SimConfig) -> f64 {
    let precision = &cfg.shape.precision;
    precision
        .rank_state_bytes(1, cfg.mesh.dp, cfg.effective_zero())
        .total()
        / precision.state_bytes_per_param() as f64
}

/// Under the configuration's recomputation and sequence parallelism: the fraction of a
/// block's activations kept, and the fraction of its forward that backward runs again.
pub(crate) fn recompute_effect(cfg: &SimConfig, tp: u32) -> (f64, f64) {
    let shape = &cfg.shape;
    let kept = shape.block_activation_elems_per_token_under(tp, cfg.activation_policy())
        / shape.block_activation_elems_per_token_under(tp, ActivationPolicy::default());
    (kept, shape.block_recompute_share(cfg.recompute))
}

/// Time and bytes sent per rank of an all-reduce of `bytes` over `n` ranks on link `l`.
pub(crate) fn all_reduce_cost(n: usize, bytes: f64, l: &LinkClass) -> (f64, f64) {
    if n <= 1 || bytes <= 0.0 {
        return (0.0, 0.0);
    }
    let t = link::all_reduce_time(n, bytes, l);
    let sent = match link::all_reduce_algorithm(n, bytes, l) {
        link::AllReduceAlgorithm::Ring => link::ring_all_reduce_bytes_per_rank(n, bytes),
        link::AllReduceAlgorithm::RecursiveDoubling => {
            link::recursive_doubling_all_reduce_bytes_per_rank(n, bytes)
        }
    };
    (t, sent)
}

fn slowest<'a>(devs: impl Iterator<Item = &'a DeviceSpec>) -> Option<DeviceSpec> {
    devs.min_by(|a, b| a.achieved_flops().total_cmp(&b.achieved_flops()))
        .cloned()
}

pub(crate) fn prepare(cfg: &SimConfig, cluster: &Cluster) -> Result<Prepared, BalanceError> {
    cfg.validate(cluster)?;
    let (dp, tp, pp) = (cfg.mesh.dp, cfg.mesh.tp, cfg.mesh.pp);
    let v = cfg.schedule.virtual_stages;
    // Activations a stage holds at its peak, in units of a whole stage's (interleaved
    // chunks are `1 / v` of one), read off the schedule the executor runs.
    let in_flight = cfg.pipeline_schedule()?.peak_in_flight();
    let vn = pp * v;
    let m = cfg.micro_batches;
    let topo = &cluster.topology;

    let mut units = Vec::with_capacity(dp);
    for d in 0..dp {
        let mut row = Vec::with_capacity(pp);
        for s in 0..pp {
            let ranks = (0..tp).map(|t| cfg.rank(d, t, s));
            let dev = slowest(ranks.map(|r| &cluster.devices[r]))
                .ok_or_else(|| BalanceError::InvalidDevice("empty TP group".into()))?;
            row.push(Unit {
                dev,
                rank: cfg.rank(d, 0, s),
            });
        }
        units.push(row);
    }

    // Batch split over replicas (per micro-batch).
    let per_micro = cfg.global_batch / m;
    let speeds: Vec<f64> = if cfg.balance {
        units
            .iter()
            .map(|row| {
                row.iter()
                    .map(|u| u.dev.achieved_flops())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    } else {
        vec![1.0; dp]
    };
    let b = split_batch(per_micro, &speeds)?.batch;

    let zero_scale = zero_state_scale(cfg);
    // Profiles, cached by (device name, micro-batch size).
    let mut cache: HashMap<(String, usize), CostProfile> = HashMap::new();
    let mut profile = |dev: &DeviceSpec, mb: usize| -> Result<CostProfile, BalanceError> {
        let key = (dev.name.clone(), mb);
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let p = match &cfg.profile {
            None => CostProfile::modelled(&cfg.shape, dev, mb as u64, tp as u32)?,
            Some(measured) => {
                let mut p = if tp > 1 {
                    measured.tp_sharded(&cfg.shape, tp as u32)?
                } else {
                    measured.clone()
                };
                let scale = mb as f64 / measured.micro_batch as f64;
                for l in &mut p.layers {
                    l.fwd_s *= scale;
                    l.bwd_s *= scale;
                    l.act_bytes = (l.act_bytes as f64 * scale) as u64;
                    l.out_bytes = (l.out_bytes as f64 * scale) as u64;
                    for x in l
                        .tp_fwd_allreduce_bytes
                        .iter_mut()
                        .chain(l.tp_bwd_allreduce_bytes.iter_mut())
                    {
                        *x = (*x as f64 * scale) as u64;
                    }
                }
                p.micro_batch = mb as u64;
                p
            }
        };
        // ZeRO shards what each rank holds of its layers' state over the DP group;
        // recomputation keeps fewer of a block's activations and runs part of its forward
        // again in backward.
        let mut p = p;
        let (act_kept, rerun) = recompute_effect(cfg, tp as u32);
        for l in &mut p.layers {
            l.state_bytes = (l.state_bytes as f64 * zero_scale).ceil() as u64;
            l.tied_copy_state_bytes = (l.tied_copy_state_bytes as f64 * zero_scale).ceil() as u64;
            if matches!(l.kind, LayerKind::Block(_)) {
                l.act_bytes = (l.act_bytes as f64 * act_kept).ceil() as u64;
                l.bwd_s += l.fwd_s * rerun;
            }
        }
        cache.insert(key, p.clone());
        Ok(p)
    };

    // Partition over virtual stages.
    let n_blocks = cfg.shape.n_layers as usize;
    let partition = match (&cfg.partition, cfg.balance) {
        (Some(p), _) => p.clone(),
        (None, false) => Partition::uniform(n_blocks, vn)?,
        (None, true) => {
            // Reference: replica 0's stage-0 device at the largest micro-batch; stage speeds
            // relative to it, the slowest replica deciding.
            let bmax = b.iter().copied().max().unwrap_or(1);
            let reference = units[0][0].dev.clone();
            let ref_prof = profile(&reference, bmax)?;
            let stages = (0..vn)
                .map(|vs| {
                    let s = vs % pp;
                    let speed = units
                        .iter()
                        .map(|row| row[s].dev.achieved_flops() / reference.achieved_flops())
                        .fold(f64::INFINITY, f64::min);
                    let memory = units
                        .iter()
                        .map(|row| row[s].dev.memory_bytes)
                        .min()
                        .unwrap_or(0);
                    // Chunks share the device's memory.
                    StageSpec {
                        speed,
                        memory_bytes: memory / v as u64,
                        in_flight: in_flight[s].div_ceil(v) as u32,
                    }
                })
                .collect();
            let problem = PartitionProblem {
                profile: &ref_prof,
                stages,
                min_blocks_per_stage: cfg.min_blocks_per_stage,
                boundary_s: 0.0,
            };
            problem.solve()?.partition
        }
    };

    let mut vst = Vec::with_capacity(dp);
    let mut tp_link = Vec::with_capacity(dp * pp);
    let mut tied_grad_bytes = 0.0;
    for d in 0..dp {
        for s in 0..pp {
            let group: Vec<usize> = (0..tp).map(|t| cfg.rank(d, t, s)).collect();
            tp_link.push((topo.group_link(&group), topo.group_link_kind(&group)));
        }
        let mut row = Vec::with_capacity(vn);
        for vs in 0..vn {
            let s = vs % pp;
            let prof = profile(&units[d][s].dev, b[d])?;
            let (tl, _) = tp_link[d * pp + s];
            let range = partition.range(vs);
            let layers = &prof.layers[range.clone()];
            let holds_head = range.end == prof.len() && vn > 1;
            let mut st = VStage {
                fwd: 0.0,
                bwd: 0.0,
                tp_fwd: 0.0,
                tp_bwd: 0.0,
                tp_bytes_fwd: 0.0,
                tp_bytes_bwd: 0.0,
                out_bytes: layers.last().map_or(0.0, |l| l.out_bytes as f64),
                act_bytes: 0.0,
                state_bytes: 0.0,
                params: 0.0,
                grads_rev: Vec::with_capacity(layers.len()),
            };
            for l in layers {
                st.fwd += l.fwd_s;
                st.bwd += l.bwd_s;
                for &x in &l.tp_fwd_allreduce_bytes {
                    let (t, sent) = all_reduce_cost(tp, x as f64, &tl);
                    st.tp_fwd += t;
                    st.tp_bytes_fwd += sent * tp as f64;
                }
                for &x in &l.tp_bwd_allreduce_bytes {
                    let (t, sent) = all_reduce_cost(tp, x as f64, &tl);
                    st.tp_bwd += t;
                    st.tp_bytes_bwd += sent * tp as f64;
                }
                st.act_bytes += l.act_bytes as f64;
                st.state_bytes += l.state_bytes as f64;
                st.params += l.param_bytes as f64 / f64::from(cfg.shape.precision.param_bytes);
            }
            if holds_head {
                let head = &prof.layers[prof.len() - 1];
                st.state_bytes += head.tied_copy_state_bytes as f64;
                tied_grad_bytes = head.tied_copy_grad_bytes as f64;
            }
            for l in layers.iter().rev() {
                let extra = if holds_head && l.kind == LayerKind::Head {
                    l.tied_copy_grad_bytes as f64
                } else {
                    0.0
                };
                st.grads_rev.push((l.bwd_s, l.grad_bytes as f64 + extra));
            }
            row.push(st);
        }
        vst.push(row);
    }
    Ok(Prepared {
        units,
        vst,
        partition,
        b,
        tp_link,
        tied_grad_bytes,
    })
}
