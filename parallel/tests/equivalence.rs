//! The design's invariant on the local engine: every TP × PP layout, schedule and
//! micro-batch count gives one device's loss, gradients and AdamW update (tiny preset,
//! dropout off), and 1F1B never stashes more than `pp` micro-batches; a model with text and
//! graph fused into its item table too, on the layouts fusion supports (one device through
//! the segment path, data parallel with and without ZeRO, pipelines plain and interleaved).

use meshrec_comm::LocalCluster;
use meshrec_model::data::Batch;
use meshrec_model::device::test_device;
use meshrec_model::ModelConfig;
use meshrec_model::SideInputs;
use meshrec_parallel::check::{
    layout_step, reference_step, tiny_case, tiny_fusion_case, worst_deviation, RankOutcome,
    Reference, StepSettings,
};
use meshrec_parallel::layout::{unshard, FullState, Layout, RankState};
use meshrec_parallel::mesh::Mesh;
use meshrec_parallel::rank::initial_state;
use meshrec_pipeline::schedule::{Schedule, ScheduleKind};

const TOLERANCE: f32 = 1e-4;

fn config() -> ModelConfig {
    tiny_case().0
}

fn genres() -> SideInputs {
    tiny_case().1
}

fn batch() -> Batch {
    tiny_case().2
}

fn reference(config: &ModelConfig) -> Reference {
    reference_with(config, &genres())
}

fn reference_with(config: &ModelConfig, side: &SideInputs) -> Reference {
    let device = test_device();
    let (_, initial) = initial_state(config, side, 3, &device);
    reference_step(
        config,
        side,
        &initial,
        &batch(),
        StepSettings::default(),
        &device,
    )
    .unwrap()
}

/// Every rank's outcome of one step of `layout` with `kind` on `m` micro-batches.
fn run_layout(
    config: &ModelConfig,
    side: &SideInputs,
    initial: &FullState,
    layout: &Layout,
    kind: ScheduleKind,
    m: usize,
    settings: StepSettings,
) -> Vec<RankOutcome> {
    let schedule = Schedule::new(kind, layout.mesh.pp, m, layout.virtual_stages).unwrap();
    let outcomes = LocalCluster::run(layout.mesh.world_size(), |comm| {
        layout_step(
            Box::new(comm),
            config,
            side,
            layout,
            &schedule,
            &batch(),
            initial,
            settings.clone(),
            &test_device(),
        )
    })
    .unwrap();
    outcomes
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{} {kind:?} m{m}: {e}", layout.describe()))
}

/// Runs `layout` with `kind` on `m` micro-batches and checks it against `want`; returns the
/// peak number of stashed micro-batches on any chunk.
fn check_layout(
    config: &ModelConfig,
    want: &Reference,
    layout: &Layout,
    kind: ScheduleKind,
    m: usize,
) -> usize {
    check_layout_with(config, want, layout, kind, m, StepSettings::default())
}

fn check_layout_with(
    config: &ModelConfig,
    want: &Reference,
    layout: &Layout,
    kind: ScheduleKind,
    m: usize,
    settings: StepSettings,
) -> usize {
    check_layout_over(config, &genres(), want, layout, kind, m, settings)
}

/// [`check_layout_with`] for a model built over `side`.
fn check_layout_over(
    config: &ModelConfig,
    side: &SideInputs,
    want: &Reference,
    layout: &Layout,
    kind: ScheduleKind,
    m: usize,
    settings: StepSettings,
) -> usize {
    let outcomes = run_layout(config, side, &want.initial, layout, kind, m, settings);
    let what = format!("{} {kind:?} m{m}", layout.describe());
    for o in &outcomes {
        let loss = o.loss.loss_sum / o.loss.targets as f64;
        assert!(
            ((loss - want.loss) / want.loss).abs() < f64::from(TOLERANCE),
            "{what}: rank {} loss {loss} vs {}",
            o.rank,
            want.loss
        );
    }
    let grads: Vec<RankState> = outcomes.iter().map(|o| o.grads.clone()).collect();
    let got = unshard(&want.grads.shapes, &grads, &layout.mesh).unwrap();
    let (path, err) = worst_deviation(&want.grads, &got, 1e-6).unwrap();
    assert!(
        err < TOLERANCE,
        "{what}: gradient of `{path}` off by {err:e} (relative)"
    );
    let updated: Vec<RankState> = outcomes.iter().map(|o| o.updated.clone()).collect();
    let got = unshard(&want.updated.shapes, &updated, &layout.mesh).unwrap();
    let (path, err) = worst_deviation(&want.updated, &got, 1e-6).unwrap();
    assert!(
        err < TOLERANCE,
        "{what}: updated `{path}` off by {err:e} (relative)"
    );
    outcomes
        .iter()
        .flat_map(|o| o.peak_in_flight.iter().copied())
        .max()
        .unwrap_or(0)
}

#[test]
fn every_tp_pp_layout_schedule_and_micro_batch_count_matches_one_device() {
    let config = config();
    let want = reference(&config);
    for tp in [1, 2, 4] {
        for pp in [1, 2, 3] {
            let layout =
                Layout::uniform(Mesh::new(1, tp, pp).unwrap(), 1, config.n_layers).unwrap();
            for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                for m in [1, 2, 4, 8] {
                    let peak = check_layout(&config, &want, &layout, kind, m);
                    if kind == ScheduleKind::OneFOneB {
                        assert!(peak <= pp, "1F1B stashed {peak} micro-batches with pp {pp}");
                    } else {
                        assert_eq!(peak, m, "GPipe keeps every micro-batch");
                    }
                }
            }
        }
    }
}

#[test]
fn uneven_partitions_and_interleaved_schedules_match_one_device() {
    let config = config();
    let want = reference(&config);
    // 4 blocks over 3 stages, heavy last stage; and over 2 stages, 3 + 1.
    for (pp, partition) in [(3, vec![1, 1, 2]), (2, vec![3, 1])] {
        for tp in [1, 2] {
            let layout = Layout::with_partition(
                Mesh::new(1, tp, pp).unwrap(),
                1,
                partition.clone(),
                config.n_layers,
            )
            .unwrap();
            check_layout(&config, &want, &layout, ScheduleKind::OneFOneB, 4);
        }
    }
    // Interleaved: two chunks per device, micro-batches a multiple of pp.
    for tp in [1, 2] {
        let layout = Layout::uniform(Mesh::new(1, tp, 2).unwrap(), 2, config.n_layers).unwrap();
        for m in [2, 4, 8] {
            check_layout(&config, &want, &layout, ScheduleKind::Interleaved, m);
        }
    }
    // One pipeline rank holding every chunk: messages to itself.
    let layout = Layout::uniform(Mesh::new(1, 1, 1).unwrap(), 4, config.n_layers).unwrap();
    check_layout(&config, &want, &layout, ScheduleKind::Interleaved, 2);
}

#[test]
fn data_parallel_and_full_hybrid_match_one_device() {
    let config = config();
    let want = reference(&config);
    let layout = Layout::uniform(Mesh::new(2, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    check_layout(&config, &want, &layout, ScheduleKind::OneFOneB, 2);
    let layout = Layout::uniform(Mesh::new(2, 1, 1).unwrap(), 1, config.n_layers).unwrap();
    check_layout(&config, &want, &layout, ScheduleKind::GPipe, 1);
}

#[test]
fn rope_swiglu_and_scaled_embedding_layouts_match_one_device() {
    let mut config = config();
    config.positions = meshrec_model::config::Positions::Rope;
    config.mlp = meshrec_model::config::MlpKind::SwiGlu;
    config.norm = meshrec_model::NormKind::Layer;
    config.scale_embedding = true;
    let want = reference(&config);
    let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    check_layout(&config, &want, &layout, ScheduleKind::OneFOneB, 2);
}

#[test]
fn compressed_and_inline_data_parallel_reductions_match_one_device() {
    use meshrec_compress::MethodConfig;
    let config = config();
    let want = reference(&config);
    let layout = Layout::uniform(Mesh::new(2, 2, 1).unwrap(), 1, config.n_layers).unwrap();
    // Top-k keeping every coordinate goes through compression, the payload all-gather and
    // error feedback, and must lose nothing.
    let mut settings = StepSettings::default();
    settings.dp.method = MethodConfig::TopK { ratio: 1.0 };
    settings.dp.memory.error_feedback = true;
    check_layout_with(&config, &want, &layout, ScheduleKind::OneFOneB, 2, settings);
    // The same reduction run inline at bucket boundaries (engines without concurrent threads).
    let mut settings = StepSettings::default();
    settings.dp.threaded = false;
    let layout = Layout::uniform(Mesh::new(2, 1, 2).unwrap(), 1, config.n_layers).unwrap();
    check_layout_with(&config, &want, &layout, ScheduleKind::GPipe, 2, settings);
}

/// ZeRO-1 and ZeRO-2 (sharded AdamW moments; reduce-scattered gradients) give one device's
/// gradients and update on DP layouts combined with TP and PP, including dp 4, where most
/// parameters do not split evenly and the last ranks' shards are short or empty.
#[test]
fn zero_sharded_optimizer_and_gradients_match_one_device() {
    use meshrec_pipeline::ZeroStage;
    let config = config();
    let want = reference(&config);
    for zero in [ZeroStage::Optimizer, ZeroStage::Gradients] {
        let mut settings = StepSettings::default();
        settings.dp.zero = zero;
        let layout = Layout::uniform(Mesh::new(2, 2, 1).unwrap(), 1, config.n_layers).unwrap();
        check_layout_with(
            &config,
            &want,
            &layout,
            ScheduleKind::OneFOneB,
            2,
            settings.clone(),
        );
        // Interleaving puts the item table and its tied copy on one pipeline rank.
        let layout = Layout::uniform(Mesh::new(2, 1, 2).unwrap(), 2, config.n_layers).unwrap();
        check_layout_with(
            &config,
            &want,
            &layout,
            ScheduleKind::Interleaved,
            2,
            settings.clone(),
        );
        let layout = Layout::uniform(Mesh::new(4, 1, 1).unwrap(), 1, config.n_layers).unwrap();
        check_layout_with(&config, &want, &layout, ScheduleKind::GPipe, 1, settings);
    }
}

/// Selective and full recomputation give one device's gradients and update on TP and PP
/// layouts; with dropout on they reproduce the masks of the run that keeps everything, so
/// they equal it too (dropout's masks are keyed by step, micro-batch and site).
#[test]
fn recomputation_keeps_gradients_exact() {
    use meshrec_pipeline::Recompute;
    let config = config();
    let want = reference(&config);
    for recompute in [Recompute::Selective, Recompute::Full] {
        let settings = StepSettings {
            recompute,
            ..StepSettings::default()
        };
        let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
        check_layout_with(
            &config,
            &want,
            &layout,
            ScheduleKind::OneFOneB,
            2,
            settings.clone(),
        );
        let layout = Layout::uniform(Mesh::new(2, 1, 1).unwrap(), 1, config.n_layers).unwrap();
        check_layout_with(&config, &want, &layout, ScheduleKind::GPipe, 2, settings);
    }
    // Dropout on: each mode against keeping everything, same layout and masks.
    let mut config = config;
    config.dropout = 0.3;
    let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    let run = |recompute| {
        let settings = StepSettings {
            recompute,
            dropout: true,
            ..StepSettings::default()
        };
        let outcomes = run_layout(
            &config,
            &genres(),
            &want.initial,
            &layout,
            ScheduleKind::OneFOneB,
            2,
            settings,
        );
        let states: Vec<RankState> = outcomes.into_iter().map(|o| o.grads).collect();
        unshard(&want.grads.shapes, &states, &layout.mesh).unwrap()
    };
    let kept = run(Recompute::None);
    // Selective reruns the very kernels on the very buffers: bit for bit. Full reruns a
    // whole block into fresh buffers, and its reductions may round differently (seen:
    // 3e-7 relative).
    for (recompute, bound) in [(Recompute::Selective, 0.0), (Recompute::Full, 1e-5)] {
        let (path, err) = worst_deviation(&kept, &run(recompute), 1e-6).unwrap();
        assert!(
            err <= bound,
            "{recompute} with dropout: gradient of `{path}` off by {err:e}"
        );
    }
}

/// Sequence parallelism (norms, dropout and the residual stream split along the sequence,
/// reduce-scatter + all-gather instead of each TP all-reduce) gives one device's step on
/// TP layouts with PP, DP and ZeRO, and with dropout on the very step TP gives without it.
#[test]
fn sequence_parallelism_matches_one_device() {
    let config = config();
    let want = reference(&config);
    let sp = |mesh: Mesh, v: usize| {
        Layout::uniform(mesh, v, config.n_layers)
            .unwrap()
            .with_sequence_parallel(true)
    };
    let settings = StepSettings::default();
    check_layout_with(
        &config,
        &want,
        &sp(Mesh::new(1, 2, 1).unwrap(), 1),
        ScheduleKind::GPipe,
        2,
        settings.clone(),
    );
    check_layout_with(
        &config,
        &want,
        &sp(Mesh::new(1, 4, 1).unwrap(), 1),
        ScheduleKind::GPipe,
        1,
        settings.clone(),
    );
    check_layout_with(
        &config,
        &want,
        &sp(Mesh::new(1, 2, 2).unwrap(), 1),
        ScheduleKind::OneFOneB,
        2,
        settings.clone(),
    );
    let mut zero = settings;
    zero.dp.zero = meshrec_pipeline::ZeroStage::Gradients;
    check_layout_with(
        &config,
        &want,
        &sp(Mesh::new(2, 2, 1).unwrap(), 1),
        ScheduleKind::OneFOneB,
        2,
        zero,
    );
    // With recomputation too.
    for recompute in [
        meshrec_pipeline::Recompute::Selective,
        meshrec_pipeline::Recompute::Full,
    ] {
        let settings = StepSettings {
            recompute,
            ..StepSettings::default()
        };
        check_layout_with(
            &config,
            &want,
            &sp(Mesh::new(1, 2, 2).unwrap(), 1),
            ScheduleKind::OneFOneB,
            2,
            settings,
        );
    }
    // Dropout on: the masks of the sequence-parallel step are the TP step's rows.
    let mut config = config;
    config.dropout = 0.3;
    let dropout = StepSettings {
        dropout: true,
        ..StepSettings::default()
    };
    let grads = |layout: &Layout, recompute| {
        let settings = StepSettings {
            recompute,
            ..dropout.clone()
        };
        let outcomes = run_layout(
            &config,
            &genres(),
            &want.initial,
            layout,
            ScheduleKind::OneFOneB,
            2,
            settings,
        );
        let states: Vec<RankState> = outcomes.into_iter().map(|o| o.grads).collect();
        unshard(&want.grads.shapes, &states, &layout.mesh).unwrap()
    };
    use meshrec_pipeline::Recompute;
    let tp = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    let kept = grads(&tp, Recompute::None);
    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let (path, err) = worst_deviation(
            &kept,
            &grads(&tp.clone().with_sequence_parallel(true), recompute),
            1e-6,
        )
        .unwrap();
        assert!(
            err < TOLERANCE,
            "sequence parallelism ({recompute}) with dropout: `{path}` off by {err:e}"
        );
    }
}

#[test]
fn fused_text_and_graph_match_one_device_under_dp_and_pp() {
    use meshrec_pipeline::ZeroStage;
    let (config, side, _) = tiny_fusion_case();
    let want = reference_with(&config, &side);
    assert!(
        want.grads
            .shapes
            .keys()
            .any(|p| p.starts_with("embed.fusion.graph.users")),
        "the reference has the fusion's parameters"
    );
    for (dp, m, zero) in [
        (1, 1, ZeroStage::Off),
        (1, 4, ZeroStage::Off),
        (2, 2, ZeroStage::Off),
        (2, 1, ZeroStage::Optimizer),
    ] {
        let layout = Layout::uniform(Mesh::new(dp, 1, 1).unwrap(), 1, config.n_layers).unwrap();
        let mut settings = StepSettings::default();
        settings.dp.zero = zero;
        check_layout_over(
            &config,
            &side,
            &want,
            &layout,
            ScheduleKind::GPipe,
            m,
            settings,
        );
    }
    // Pipelines: the last stage recomputes the fused table from its tied copies (their
    // gradients summed with the first stage's over the embedding group); interleaved on two
    // ranks, and every chunk on one rank (originals and copies in one process); with dp.
    let pipelines = [
        (Mesh::new(1, 1, 2).unwrap(), 1, ScheduleKind::OneFOneB, 4),
        (Mesh::new(1, 1, 3).unwrap(), 1, ScheduleKind::GPipe, 2),
        (Mesh::new(1, 1, 2).unwrap(), 2, ScheduleKind::Interleaved, 4),
        (Mesh::new(1, 1, 1).unwrap(), 4, ScheduleKind::Interleaved, 2),
        (Mesh::new(2, 1, 2).unwrap(), 1, ScheduleKind::OneFOneB, 2),
    ];
    for (mesh, v, kind, m) in pipelines {
        let layout = Layout::uniform(mesh, v, config.n_layers).unwrap();
        check_layout_over(
            &config,
            &side,
            &want,
            &layout,
            kind,
            m,
            StepSettings::default(),
        );
    }
}
