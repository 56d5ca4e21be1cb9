//! The simulator against closed forms: compute-only single stage, the ring all-reduce of
//! pure DP (and local SGD's amortised parameter average), the pipeline bubble of GPipe/1F1B
//! and of interleaved 1F1B, async vs sync, and compression bytes.

use meshrec_balance::cost::{CostProfile, LayerCost};
use meshrec_balance::shape::LayerKind;
use meshrec_balance::sim::{simulate, simulate_steps, Compression, SimConfig};
use meshrec_balance::{Cluster, DeviceSpec, ModelShape};
use meshrec_comm::cost::{ring_all_reduce_time, LinkClass, Topology};
use meshrec_compress::MethodConfig;
use meshrec_pipeline::{DpMode, EventKind, Mesh, ScheduleSpec};

/// A link so fast that transfers take no time.
fn ideal_link() -> LinkClass {
    LinkClass {
        latency_s: 0.0,
        bandwidth_bytes_per_s: 1e30,
    }
}

fn ideal_cluster(n: usize) -> Cluster {
    Cluster::homogeneous(
        "ideal",
        DeviceSpec::a100_80gb(),
        n,
        n,
        ideal_link(),
        ideal_link(),
    )
    .unwrap()
}

/// Shape with `blocks` blocks and a measured profile where every block costs `f` forward
/// and `2f` backward per micro-batch of 1, and the embedding and head cost nothing.
fn equal_blocks(blocks: u32, f: f64) -> (ModelShape, CostProfile) {
    let shape = ModelShape::new("eq", 64, 32, blocks, 4, 64, 8).unwrap();
    let n = shape.n_partition_layers();
    let layers = (0..n)
        .map(|i| {
            let kind = shape.layer_kind(i).unwrap();
            let t = if matches!(kind, LayerKind::Block(_)) {
                f
            } else {
                0.0
            };
            LayerCost::measured(kind, t, 2.0 * t, 0, 0, 0, 0)
        })
        .collect();
    (shape, CostProfile::measured(1, layers).unwrap())
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn one_stage_is_compute_plus_optimizer() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 1).unwrap();
    let cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(1, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        4,
        16,
    );
    let r = simulate(&cfg, &cluster).unwrap();
    let prof = CostProfile::modelled(&shape, &cluster.devices[0], 4, 1).unwrap();
    let compute = 4.0 * prof.train_s(0..prof.len());
    let params = shape.params() as f64;
    let opt = cluster.devices[0].roofline_s(12.0 * params, 2.0 * shape.state_bytes() as f64);
    assert!(
        close(r.step_s, compute + opt, 1e-9),
        "{} vs {}",
        r.step_s,
        compute + opt
    );
    assert!(close(r.utilization_mean, 1.0, 1e-9));
    assert_eq!(r.bubble, 0.0);
    let b = r.breakdown;
    assert!(close(b.compute_s, compute, 1e-9) && close(b.optimizer_s, opt, 1e-9));
    assert_eq!((b.tp_comm_s, b.pipeline_idle_s, b.sync_s), (0.0, 0.0, 0.0));
    assert_eq!(r.bytes.total(), 0.0);
    assert!(close(r.samples_per_s, 16.0 / r.step_s, 1e-12));
    assert!(r.fits);
}

#[test]
fn pure_dp_adds_the_ring_all_reduce() {
    let shape = ModelShape::preset_100m();
    let link = LinkClass::new_us_gbps(5.0, 10.0);
    let cluster = Cluster::homogeneous("dp", DeviceSpec::a100_80gb(), 4, 4, link, link).unwrap();
    let mut cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(4, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        1,
        8,
    );
    cfg.bucket_bytes = u64::MAX; // one bucket, ready when backward ends: nothing overlaps
    let r = simulate(&cfg, &cluster).unwrap();
    let prof = CostProfile::modelled(&shape, &cluster.devices[0], 2, 1).unwrap();
    let compute = prof.train_s(0..prof.len());
    let grads = shape.grad_bytes() as f64;
    let ring = ring_all_reduce_time(4, grads, &link);
    let closed = 2.0 * 3.0 / 4.0 * grads / 10e9 + 2.0 * 3.0 * 5e-6;
    assert!(close(ring, closed, 1e-12));
    let opt = cluster.devices[0].roofline_s(
        12.0 * shape.params() as f64,
        2.0 * shape.state_bytes() as f64,
    );
    assert!(
        close(r.step_s, compute + ring + opt, 1e-9),
        "{} vs {}",
        r.step_s,
        compute + ring + opt
    );
    assert!(close(r.bytes.dp, 4.0 * 2.0 * 3.0 / 4.0 * grads, 1e-9));
    assert_eq!(r.bytes.inter, 0.0);

    // Buckets overlap the all-reduce with backward: never slower, here strictly faster.
    cfg.bucket_bytes = 25_000_000;
    let overlapped = simulate(&cfg, &cluster).unwrap();
    assert!(overlapped.step_s < r.step_s);
    assert!(overlapped.step_s >= compute + opt);
}

#[test]
fn pipeline_bubble_matches_p_minus_1_over_m_plus_p_minus_1() {
    let cluster = ideal_cluster(8);
    for pp in [2usize, 4, 8] {
        for m in [1usize, 4, 8, 16] {
            for schedule in [ScheduleSpec::GPIPE, ScheduleSpec::ONE_F_ONE_B] {
                let (shape, prof) = equal_blocks(2 * pp as u32, 1e-3);
                let mut cfg = SimConfig::new(shape, Mesh::new(1, 1, pp).unwrap(), schedule, m, m);
                cfg.profile = Some(prof);
                cfg.balance = false;
                let r = simulate(&cfg, &cluster).unwrap();
                let theory = (pp as f64 - 1.0) / (m as f64 + pp as f64 - 1.0);
                assert!(
                    close(r.bubble, theory, 1e-9),
                    "{schedule:?} pp{pp} m{m}: {} vs {theory}",
                    r.bubble
                );
                // Step = (m + p - 1) slots of one stage's forward + backward.
                let slot = 2.0 * 3e-3;
                assert!(close(r.step_s, (m + pp - 1) as f64 * slot, 1e-9));
                for &b in &r.bubble_per_stage {
                    assert!(close(b, theory, 1e-9));
                }
            }
        }
    }
}

#[test]
fn interleaved_bubble_matches_megatron() {
    let cluster = ideal_cluster(8);
    for pp in [2usize, 4] {
        for v in [2usize, 3, 4] {
            for m in [pp, 2 * pp, 4 * pp] {
                let (shape, prof) = equal_blocks((pp * v) as u32, 1e-3);
                let mut cfg = SimConfig::new(
                    shape,
                    Mesh::new(1, 1, pp).unwrap(),
                    ScheduleSpec::interleaved(v),
                    m,
                    m,
                );
                cfg.profile = Some(prof);
                cfg.balance = false;
                let r = simulate(&cfg, &cluster).unwrap();
                // Megatron: bubble time (p-1)/v of a micro-batch's full time, i.e. an idle
                // fraction of (p-1) / (v·m + p-1) of the pipeline span.
                let theory = (pp as f64 - 1.0) / ((v * m) as f64 + pp as f64 - 1.0);
                assert!(
                    close(r.bubble, theory, 1e-9),
                    "pp{pp} v{v} m{m}: {} vs {theory}",
                    r.bubble
                );
            }
        }
    }
}

#[test]
fn schedules_simulate_to_completion() {
    // Simulating proves each order completes (a deadlock is an error).
    let cluster = ideal_cluster(16);
    for pp in [1usize, 2, 3, 5, 8, 16] {
        for m in [1usize, 3, 16] {
            for schedule in [ScheduleSpec::GPIPE, ScheduleSpec::ONE_F_ONE_B] {
                let (shape, prof) = equal_blocks(16, 1e-3);
                let mut cfg = SimConfig::new(shape, Mesh::new(1, 1, pp).unwrap(), schedule, m, m);
                cfg.profile = Some(prof);
                simulate(&cfg, &cluster).unwrap();
            }
        }
        for v in 2..=4usize {
            if pp < 2 || pp * v > 16 {
                continue;
            }
            for m in [pp, 2 * pp, 3 * pp] {
                let (shape, prof) = equal_blocks(16, 1e-3);
                let mut cfg = SimConfig::new(
                    shape,
                    Mesh::new(1, 1, pp).unwrap(),
                    ScheduleSpec::interleaved(v),
                    m,
                    m,
                );
                cfg.profile = Some(prof);
                simulate(&cfg, &cluster).unwrap();
            }
        }
    }
}

#[test]
fn invalid_layouts_are_errors_naming_the_constraint() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 8).unwrap();
    let cases = [
        (
            Mesh::new(1, 4, 1).unwrap(),
            ScheduleSpec::ONE_F_ONE_B,
            4,
            "must divide model.n_heads",
        ),
        (
            Mesh::new(16, 1, 1).unwrap(),
            ScheduleSpec::ONE_F_ONE_B,
            4,
            "needs 16 devices",
        ),
        (
            Mesh::new(1, 1, 2).unwrap(),
            ScheduleSpec::interleaved(2),
            3,
            "multiple of pp",
        ),
        (
            Mesh::new(1, 1, 8).unwrap(),
            ScheduleSpec::interleaved(2),
            8,
            "exceed model.n_layers (8)",
        ),
    ];
    for (mesh, schedule, m, needle) in cases {
        let cfg = SimConfig::new(shape.clone(), mesh, schedule, m, 48);
        let e = simulate(&cfg, &cluster).unwrap_err().to_string();
        assert!(e.contains(needle), "{e} should mention {needle}");
    }
    let cfg = SimConfig::new(
        shape,
        Mesh::new(8, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        4,
        16,
    );
    assert!(simulate(&cfg, &cluster)
        .unwrap_err()
        .to_string()
        .contains("at least one sequence per replica"));
}

#[test]
fn tensor_parallel_bytes_follow_megatron() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 2).unwrap();
    let mut cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(1, 2, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        1,
        4,
    );
    cfg.balance = false;
    let r = simulate(&cfg, &cluster).unwrap();
    let bsh =
        4.0 * (shape.seq_len * shape.d_model) as f64 * f64::from(shape.precision.activation_bytes);
    // 4 all-reduces of b·s·h per block, each sending 2(t-1)/t of it from each of t ranks.
    let per_block = 4.0 * 2.0 * 0.5 * bsh * 2.0;
    let blocks = f64::from(shape.n_layers) * per_block;
    assert!(r.bytes.tp > blocks, "{} vs {}", r.bytes.tp, blocks);
    assert!(r.bytes.tp < blocks * 1.2);
    assert_eq!(r.bytes.inter, 0.0);
}

#[test]
fn async_dp_beats_sync_on_a_heterogeneous_cluster_and_compression_cuts_bytes() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100+v100x8", 16).unwrap();
    let mut cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(16, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        2,
        256,
    );
    cfg.balance = false;
    let sync = simulate(&cfg, &cluster).unwrap();
    cfg.dp_mode = DpMode::Async { max_staleness: 4 };
    let asy = simulate(&cfg, &cluster).unwrap();
    assert!(asy.samples_per_s > sync.samples_per_s);
    // Balancing the batch by speed helps sync DP on mixed hardware.
    cfg.dp_mode = DpMode::Sync;
    cfg.balance = true;
    let bal = simulate(&cfg, &cluster).unwrap();
    assert!(bal.samples_per_s > sync.samples_per_s);
    assert!(bal.replica_micro_batch[0] > bal.replica_micro_batch[8]);
    assert_eq!(bal.replica_micro_batch.iter().sum::<usize>(), 128);

    cfg.compression = Compression::top_k(0.01, shape.precision.grad_bytes);
    let topk = simulate(&cfg, &cluster).unwrap();
    assert!(topk.bytes.dp < bal.bytes.dp);
    assert!(topk.bytes.inter > 0.0);
}

#[test]
fn many_steps_bound_async_staleness_and_absorb_jitter() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 8).unwrap();
    let mut cfg = SimConfig::new(
        shape,
        Mesh::new(8, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        2,
        64,
    );
    let sync = simulate_steps(&cfg, &cluster, 40, 0.3, 1).unwrap();
    assert_eq!(sync.step_s.len(), 40);
    assert_eq!(sync.max_lead, 0);
    cfg.dp_mode = DpMode::Async { max_staleness: 2 };
    let asy = simulate_steps(&cfg, &cluster, 40, 0.3, 1).unwrap();
    assert!(asy.max_lead <= 3, "lead {}", asy.max_lead);
    assert!(asy.samples_per_s > sync.samples_per_s);
}

#[test]
fn timeline_is_drawable_and_consistent() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 8).unwrap();
    let cfg = SimConfig::new(
        shape,
        Mesh::new(2, 1, 4).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        8,
        64,
    );
    let r = simulate(&cfg, &cluster).unwrap();
    // One timeline per pipeline device, replica-major, each with every action of the
    // schedule the executor runs for its stage.
    assert_eq!(r.timeline.len(), 2 * 4);
    let schedule = ScheduleSpec::ONE_F_ONE_B.build(4, 8).unwrap();
    for (i, t) in r.timeline.iter().enumerate() {
        let (d, s) = (i / 4, i % 4);
        assert_eq!(t.label, format!("dp{d} pp{s}"));
        let actions: Vec<_> = t
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Forward | EventKind::Backward))
            .map(|e| (e.kind == EventKind::Forward, e.micro_batch.unwrap()))
            .collect();
        let expected: Vec<_> = schedule.per_device[s]
            .iter()
            .map(|a| (a.is_forward(), a.micro_batch()))
            .collect();
        assert_eq!(actions, expected, "{}", t.label);
        for e in &t.events {
            assert!(
                e.end_s >= e.start_s && e.start_s >= 0.0 && e.end_s <= r.step_s * (1.0 + 1e-12),
                "{e:?}"
            );
        }
    }
    // Topology from comm decides the link class of PP sends: 8 devices fit one node.
    let _: &Topology = &cluster.topology;
    assert_eq!(r.bytes.inter, 0.0);
    assert!(r.bytes.pp > 0.0 && r.bytes.dp > 0.0);
}

#[test]
fn heavy_head_goes_to_the_fast_devices_when_stages_are_reversed() {
    // 16 devices: node 0 A100s, node 1 V100s; pp 2 puts stage 1 (the catalogue-sized head)
    // on the V100s unless the pipeline is reversed.
    let shape = ModelShape::preset_1b();
    let cluster = Cluster::preset("a100+v100x8", 16).unwrap();
    let mut cfg = SimConfig::new(
        shape,
        Mesh::new(4, 2, 2).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        16,
        256,
    );
    let natural = simulate(&cfg, &cluster).unwrap();
    cfg.reverse_stages = true;
    let reversed = simulate(&cfg, &cluster).unwrap();
    assert!(reversed.samples_per_s > natural.samples_per_s);
    assert!(cfg.label().contains("rev"));
    // The balancer gives the slow stage fewer blocks in either order.
    let blocks_nat = natural.partition.blocks_per_stage();
    let blocks_rev = reversed.partition.blocks_per_stage();
    assert_ne!(blocks_nat, blocks_rev);
}

#[test]
fn tied_embedding_is_synchronised_between_first_and_last_stage() {
    let shape = ModelShape::preset_100m();
    let cluster = Cluster::preset("a100x8", 2).unwrap();
    let cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(1, 1, 2).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        4,
        16,
    );
    let r = simulate(&cfg, &cluster).unwrap();
    let table = (shape.vocab * shape.d_model * u64::from(shape.precision.grad_bytes)) as f64;
    // A 2-rank all-reduce of the table's gradient: each of the two ranks sends it once.
    assert!(
        close(r.bytes.dp, 2.0 * table, 1e-9),
        "{} vs {}",
        r.bytes.dp,
        2.0 * table
    );
    assert!(r
        .timeline
        .iter()
        .flat_map(|t| &t.events)
        .any(|e| e.kind == EventKind::GradAllReduce));
    // Both stages hold a copy of the table's state.
    let state = shape.vocab * shape.d_model * shape.precision.state_bytes_per_param();
    assert!(r.peak_memory_bytes.iter().all(|&m| m > state));
}

#[test]
fn local_sgd_adds_an_amortised_parameter_ring_all_reduce() {
    // dp 4, local SGD averaging every k steps: no gradient exchange; one step is compute +
    // optimizer + 1/k of a ring all-reduce of the parameters.
    let shape = ModelShape::preset_100m();
    let link = LinkClass::new_us_gbps(5.0, 10.0);
    let cluster = Cluster::homogeneous("dp", DeviceSpec::a100_80gb(), 4, 4, link, link).unwrap();
    let prof = CostProfile::modelled(&shape, &cluster.devices[0], 2, 1).unwrap();
    let compute = prof.train_s(0..prof.len());
    let opt = cluster.devices[0].roofline_s(
        12.0 * shape.params() as f64,
        2.0 * shape.state_bytes() as f64,
    );
    let params = shape.param_bytes() as f64;
    let ring = 2.0 * 3.0 / 4.0 * params / 10e9 + 2.0 * 3.0 * 5e-6;
    for k in [1u32, 4, 16] {
        let mut cfg = SimConfig::new(
            shape.clone(),
            Mesh::new(4, 1, 1).unwrap(),
            ScheduleSpec::ONE_F_ONE_B,
            1,
            8,
        );
        cfg.dp_mode = DpMode::LocalSgd {
            sync_every: u64::from(k),
        };
        let r = simulate(&cfg, &cluster).unwrap();
        let closed = compute + opt + ring / f64::from(k);
        assert!(
            close(r.step_s, closed, 1e-9),
            "k {k}: {} vs {closed}",
            r.step_s
        );
        let bytes = 4.0 * 2.0 * 3.0 / 4.0 * params / f64::from(k);
        assert!(
            close(r.bytes.dp, bytes, 1e-9),
            "k {k}: {} vs {bytes}",
            r.bytes.dp
        );
        assert!(cfg.label().contains(&format!("local-sgd-k{k}")));
        // The breakdown adds up to the step: the average shows as synchronisation.
        let b = r.breakdown;
        assert!(close(b.total_s(), r.step_s, 1e-9));
        assert!(close(b.sync_s, ring / f64::from(k), 1e-6));
    }
    // Local SGD with k = 1 exchanges parameters instead of gradients after the step, so it
    // never overlaps; sync DP with buckets overlaps backward and is faster.
    let mut cfg = SimConfig::new(
        shape,
        Mesh::new(4, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        1,
        8,
    );
    let sync = simulate(&cfg, &cluster).unwrap();
    cfg.dp_mode = DpMode::LocalSgd { sync_every: 1 };
    assert!(simulate(&cfg, &cluster).unwrap().step_s > sync.step_s);
    cfg.dp_mode = DpMode::LocalSgd { sync_every: 0 };
    assert!(simulate(&cfg, &cluster)
        .unwrap_err()
        .to_string()
        .contains("sync_every"));
}

#[test]
fn compressors_shrink_the_wire_as_documented() {
    let shape = ModelShape::preset_100m(); // bf16 gradients: 2 bytes
    let by = |m: MethodConfig| Compression::of(&m, &shape).unwrap();
    assert_eq!(by(MethodConfig::Identity), Compression::none());
    assert_eq!(by(MethodConfig::Fp16).wire_ratio, 1.0); // already 2 bytes
    let topk = by(MethodConfig::TopK { ratio: 0.01 });
    // Indices as varint gaps at 1% density: one byte, a second when the gap reaches 128
    // (probability 0.99^128 for uniform positions), a third at 128^2 (negligible).
    let index_bytes = 1.0 + 0.99f64.powi(128) + 0.99f64.powi(16384);
    assert!(close(
        topk.wire_ratio,
        0.01 * (index_bytes + 2.0) / 2.0,
        1e-9
    ));
    let randk = by(MethodConfig::RandK {
        ratio: 0.01,
        unbiased: false,
    });
    assert!(close(randk.wire_ratio, 0.01 * 4.0 / 2.0, 1e-12));
    assert!(close(
        by(MethodConfig::Sign { chunk: 512 }).wire_ratio,
        (1.0 / 8.0 + 4.0 / 512.0) / 2.0,
        1e-12
    ));
    assert!(close(
        by(MethodConfig::TernGrad { chunk: 512 }).wire_ratio,
        (2.0 / 8.0 + 4.0 / 512.0) / 2.0,
        1e-12
    ));
    // 4 levels: sign + 3 bits.
    let qsgd = MethodConfig::Qsgd {
        levels: 4,
        bucket: 512,
    };
    assert!(close(
        by(qsgd).wire_ratio,
        (4.0 / 8.0 + 4.0 / 512.0) / 2.0,
        1e-12
    ));
    let powersgd = MethodConfig::PowerSgd {
        rank: 4,
        min_compression_rate: 1.0,
    };
    assert!(close(
        by(powersgd.clone()).wire_ratio,
        8.0 / shape.d_model as f64,
        1e-12
    ));
    for bad in [
        MethodConfig::TopK { ratio: 0.0 },
        MethodConfig::TopK { ratio: 1.5 },
        MethodConfig::Qsgd {
            levels: 0,
            bucket: 512,
        },
        MethodConfig::PowerSgd {
            rank: 0,
            min_compression_rate: 1.0,
        },
        MethodConfig::Threshold { threshold: 0.1 },
    ] {
        assert!(Compression::of(&bad, &shape).is_err(), "{bad:?}");
    }
    // Cheaper wire, fewer DP bytes in the simulation.
    let cluster = Cluster::preset("a100x8", 16).unwrap();
    let mut cfg = SimConfig::new(
        shape.clone(),
        Mesh::new(16, 1, 1).unwrap(),
        ScheduleSpec::ONE_F_ONE_B,
        1,
        64,
    );
    let dense = simulate(&cfg, &cluster).unwrap().bytes.dp;
    cfg.compression = by(powersgd);
    assert!(simulate(&cfg, &cluster).unwrap().bytes.dp < 0.05 * dense);
}
