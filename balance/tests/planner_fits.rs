//! The planner never returns a layout that does not fit: on random small models, clusters
//! and memory sizes, every layout it reports is re-simulated here and checked device by
//! device against its memory; the memory it reports is at least the model state's share
//! of one device (so "fits" is not vacuous); and nothing that fits was dropped (the count
//! and the winner match an exhaustive re-simulation of the enumeration).

use meshrec_balance::plan::{enumerate, plan, Candidate, PlanRequest};
use meshrec_balance::sim::{simulate, Compression};
use meshrec_balance::{BalanceError, Cluster, DeviceSpec, ModelShape};
use meshrec_comm::cost::LinkClass;
use meshrec_pipeline::{Recompute, ZeroStage};
use proptest::prelude::*;

fn shape(vocab: u64, d: u64, layers: u32, heads: u32, ff_mult: u64, seq: u64) -> ModelShape {
    ModelShape::new("prop", vocab, d, layers, heads, d * ff_mult, seq).unwrap()
}

fn check_fits(c: &Candidate, cluster: &Cluster, shape: &ModelShape) -> Result<(), String> {
    if !c.result.fits {
        return Err(format!("{} reported with fits = false", c.config.label()));
    }
    // Re-simulate independently of the planner and check every device.
    let again = simulate(&c.config, cluster).map_err(|e| e.to_string())?;
    let world = c.config.mesh.world_size();
    if again.peak_memory_bytes.len() != world {
        return Err(format!(
            "{} devices reported for {world}",
            again.peak_memory_bytes.len()
        ));
    }
    for (r, &m) in again.peak_memory_bytes.iter().enumerate() {
        if m > cluster.devices[r].memory_bytes {
            return Err(format!(
                "{}: rank {r} needs {m} B > {} B",
                c.config.label(),
                cluster.devices[r].memory_bytes
            ));
        }
    }
    // One replica's tp · pp devices hold the whole training state between them (under
    // ZeRO, their DP-sharded part of it).
    let mesh = c.config.mesh;
    let state = shape
        .precision
        .rank_state_bytes(shape.params(), mesh.dp, c.config.effective_zero())
        .total();
    let share = state / (mesh.tp * mesh.pp) as f64;
    let peak = again.peak_memory_bytes.iter().copied().max().unwrap_or(0) as f64;
    if peak < share * 0.999 {
        return Err(format!(
            "{}: peak {peak} B below the state share {share} B",
            c.config.label()
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn planner_never_returns_a_layout_that_does_not_fit(
        vocab in 50u64..4000,
        d_pow in 4u32..7,
        layers in 1u32..7,
        heads_pow in 0u32..3,
        ff_mult in 2u64..5,
        seq in 4u64..48,
        devices in 1usize..9,
        per_node_pow in 0u32..4,
        capacity_scale in 0.02f64..1.2,
        batch_pow in 3u32..6,
        topk in any::<bool>(),
    ) {
        let d = 1u64 << d_pow;
        let heads = 1u32 << heads_pow;
        let shape = shape(vocab, d, layers, heads, ff_mult, seq);
        // Capacity relative to the whole model's state plus one global batch's stashed
        // activations: from far too small for any layout to room for everything.
        let global_batch = 1usize << batch_pow;
        let act: f64 = (0..shape.n_partition_layers())
            .map(|i| shape.layer_activation_bytes_per_token(i, 1).unwrap())
            .sum::<f64>()
            * (global_batch as u64 * seq) as f64;
        let capacity = (((shape.state_bytes() as f64 + act) * capacity_scale) as u64).max(1);
        let device = DeviceSpec { memory_bytes: capacity, ..DeviceSpec::a100_80gb() };
        let cluster = Cluster::homogeneous(
            "prop",
            device,
            devices,
            1 << per_node_pow,
            LinkClass::NVLINK3_A100,
            LinkClass::IB_EDR,
        )
        .unwrap();
        let mut req = PlanRequest::new(shape.clone(), cluster.clone(), devices, global_batch);
        req.micro_batches = vec![1, 2, 4];
        req.compressions = if topk {
            vec![Compression::none(), Compression::top_k(0.05, shape.precision.grad_bytes)]
        } else {
            vec![Compression::none()]
        };
        req.keep = usize::MAX;
        // The exhaustive reference below enumerates every compressor asked for.
        req.allow_lossy = true;

        // Exhaustive reference: every enumerated configuration, simulated with the least
        // recomputation under which it fits.
        let configs = enumerate(&req);
        let mut fitting_sps = Vec::new();
        for cfg in &configs {
            for level in [Recompute::None, Recompute::Selective, Recompute::Full] {
                let mut cfg = cfg.clone();
                cfg.recompute = level;
                match simulate(&cfg, &cluster) {
                    Ok(r) if r.fits => {
                        fitting_sps.push(r.samples_per_s);
                        break;
                    }
                    // The balancing partitioner already finds no placement that fits.
                    Ok(_) | Err(BalanceError::OutOfMemory { .. }) => {}
                    Err(e) => prop_assert!(false, "{}: {}", cfg.label(), e),
                }
            }
        }
        match plan(&req) {
            Ok(p) => {
                prop_assert_eq!(p.considered, configs.len());
                prop_assert_eq!(p.fitting, fitting_sps.len());
                prop_assert_eq!(p.fitting + p.rejected_memory, p.considered);
                prop_assert_eq!(p.ranking.len(), p.fitting);
                let best = fitting_sps.iter().copied().fold(0.0, f64::max);
                prop_assert!((p.best.result.samples_per_s - best).abs() <= 1e-9 * best);
                let all = p
                    .ranking
                    .iter()
                    .chain([&p.best])
                    .chain(p.best_hybrid.iter())
                    .chain(p.best_dp.iter())
                    .chain(p.best_tp.iter())
                    .chain(p.best_pp.iter())
                    .chain(p.best_pipelined.iter());
                for c in all {
                    if let Err(e) = check_fits(c, &cluster, &shape) {
                        prop_assert!(false, "{}", e);
                    }
                }
            }
            Err(BalanceError::NoFeasibleLayout(msg)) => {
                prop_assert!(fitting_sps.is_empty(), "planner found nothing, but {} fit: {}",
                    fitting_sps.len(), msg);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[test]
fn a_model_too_big_for_one_device_is_only_planned_sharded() {
    // Capacity below the whole state: DP-only with full replicas (no ZeRO) can never fit,
    // so every layout the planner returns shards the model (tp · pp > 1).
    let shape = shape(20_000, 64, 4, 4, 4, 32);
    let capacity = shape.state_bytes() * 3 / 4;
    let device = DeviceSpec {
        memory_bytes: capacity,
        ..DeviceSpec::a100_80gb()
    };
    let cluster = Cluster::homogeneous(
        "small",
        device,
        8,
        8,
        LinkClass::NVLINK3_A100,
        LinkClass::NVLINK3_A100,
    )
    .unwrap();
    let mut req = PlanRequest::new(shape.clone(), cluster.clone(), 8, 32);
    req.keep = usize::MAX;
    req.zero_stages = vec![ZeroStage::Off];
    let p = plan(&req).unwrap();
    assert!(p.rejected_memory > 0);
    assert!(p.best_dp.is_none());
    for c in &p.ranking {
        assert!(
            c.config.mesh.tp * c.config.mesh.pp > 1,
            "{}",
            c.config.label()
        );
        check_fits(c, &cluster, &shape).unwrap();
    }
}
