//! The invariant of the design, executable: one optimizer step of any layout on a global
//! batch gives the same loss, gradients and updated parameters as one device. Used by the
//! equivalence tests (local engine, every layout) and by the MPI example (`mpirun -np 4`),
//! and by anyone who wants to check a layout before a long run.

use burn::tensor::Device;
use meshrec_comm::Communicator;
use meshrec_model::data::Batch;
use meshrec_model::optim::{clip_by_global_norm, sum_of_squares, AdamW, AdamWConfig};
use meshrec_model::params::{param_paths, ParamInfo};
use meshrec_model::step::forward_backward;
use meshrec_model::{ModelConfig, Recommender, SideInputs};

use meshrec_pipeline::timeline::Recorder;
use meshrec_pipeline::{Recompute, Schedule};

use crate::dp::{DpEngine, DpSettings};
use crate::error::ParallelError;
use crate::exec::{micro_batches, reduce_model_parallel_grads, run_schedule, StepLoss};
use crate::layout::{shard_chunk, FullState, Layout, ParamSpec, RankState};
use crate::mesh::Groups;
use crate::optim::{whole_grads, RankOptimizer};
use crate::rank::build_segments;
use crate::segment::Segment;

/// The case the equivalence suite and the MPI check run: the `tiny` preset (4 blocks, 4
/// heads, so TP up to 4 and PP up to 4) with genre side-features, dropout off, and a batch
/// of eight right-padded sequences over a 41-item catalogue.
pub fn tiny_case() -> (ModelConfig, SideInputs, Batch) {
    const NUM_ITEMS: usize = 41;
    let mut config = ModelConfig::preset(meshrec_model::Preset::Tiny, NUM_ITEMS);
    config.dropout = 0.0;
    config.num_genres = Some(5);
    let genres = (0..=NUM_ITEMS as u32)
        .map(|i| vec![i % 5, (i * 7) % 5])
        .collect();
    let (b, s) = (8, 8);
    let mut inputs = vec![0u32; b * s];
    let mut targets = vec![0u32; b * s];
    for r in 0..b {
        let len = s - (r % 3);
        for t in 0..len {
            inputs[r * s + t] = 1 + ((r * 13 + t * 5) % NUM_ITEMS) as u32;
            targets[r * s + t] = 1 + ((r * 13 + t * 5 + 3) % NUM_ITEMS) as u32;
        }
    }
    let batch = Batch {
        batch_size: b,
        seq_len: s,
        inputs,
        targets,
    };
    (config, SideInputs::genres(Some(genres)), batch)
}

/// [`tiny_case`] with text and graph fused into the item table: seeded 6-d "text" vectors
/// and a graph of 12 users over the catalogue with genre and attribute relations.
pub fn tiny_fusion_case() -> (ModelConfig, SideInputs, Batch) {
    use meshrec_model::data::{Bipartite, InteractionGraph};
    use meshrec_model::TextFeatures;
    use std::sync::Arc;
    let (mut config, mut side, batch) = tiny_case();
    let vocab = config.vocab();
    let dim = 6;
    let text = (0..vocab * dim)
        .map(|i| {
            if i < dim {
                0.0
            } else {
                ((i * 37 % 23) as f32 - 11.0) / 11.0
            }
        })
        .collect();
    let users = 12;
    let edges = |left: usize, right: usize, per: usize, salt: usize| Bipartite {
        left,
        right,
        edges: (0..left)
            .flat_map(|l| {
                (0..per).map(move |k| (l as u32, (1 + (l * salt + k * 7) % (right - 1)) as u32))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let genres = edges(vocab, 5, 2, 3);
    let graph = InteractionGraph {
        num_users: users,
        vocab,
        user_item: edges(users, vocab, 6, 5),
        item_genre: Some(Bipartite {
            edges: genres.edges.iter().map(|&(i, g)| (i, g - 1)).collect(),
            ..genres
        }),
        user_attribute: Some(edges(users, 4, 2, 1)),
        genre_names: (0..5).map(|g| format!("g{g}")).collect(),
        attribute_names: (0..4).map(|a| format!("a{a}")).collect(),
    };
    side.text = Some(Arc::new(TextFeatures { dim, values: text }));
    side.graph = Some(Arc::new(graph));
    config.fusion = side.fusion_shape(2);
    (config, side, batch)
}

/// The optimizer settings of a checked step.
#[derive(Debug, Clone)]
pub struct StepSettings {
    pub adamw: AdamWConfig,
    pub lr: f32,
    /// Global-norm clipping threshold (0 disables).
    pub clip_norm: f64,
    /// How the DP group reduces gradients.
    pub dp: DpSettings,
    /// What backward recomputes instead of keeping.
    pub recompute: Recompute,
    /// Dropout on (the model's own rates; masks keyed by step, micro-batch and site) or off
    /// (what the one-device reference runs).
    pub dropout: bool,
}

impl Default for StepSettings {
    /// PyTorch's AdamW but `eps = 1e-5` (burn's default): Adam's first step is about
    /// `lr · sign(g)`, so with a tiny `eps` float rounding of a near-zero gradient (other
    /// summation orders on other layouts and backends) could flip a full-size update.
    fn default() -> Self {
        Self {
            adamw: AdamWConfig {
                eps: 1e-5,
                ..AdamWConfig::default()
            },
            lr: 1e-2,
            clip_norm: 0.5,
            dp: DpSettings {
                bucket_bytes: 4096,
                method: meshrec_compress::MethodConfig::Identity,
                memory: meshrec_compress::MemoryOptions {
                    error_feedback: false,
                    ..Default::default()
                },
                threaded: true,
                zero: meshrec_pipeline::ZeroStage::Off,
            },
            recompute: Recompute::None,
            dropout: false,
        }
    }
}

/// One device's step: the ground truth.
#[derive(Debug, Clone)]
pub struct Reference {
    pub infos: Vec<ParamInfo>,
    pub initial: FullState,
    pub loss: f64,
    pub grads: FullState,
    pub updated: FullState,
}

/// Runs the step on one device from `initial`.
pub fn reference_step(
    config: &ModelConfig,
    side: &SideInputs,
    initial: &FullState,
    batch: &Batch,
    settings: StepSettings,
    device: &Device,
) -> Result<Reference, ParallelError> {
    let device = &device.clone().autodiff();
    let model = Recommender::new(config, side, device);
    let infos = param_paths(&model);
    let mut values = initial.to_ordered(&infos)?;
    let model = meshrec_model::params::write_values(model, &values, device);
    let targets = batch.num_targets().max(1);
    let mut out = forward_backward(&model, batch, 1.0 / targets as f32, device);
    let grads = FullState::from_ordered(&infos, out.grads.clone());
    let norm = sum_of_squares(&out.grads).sqrt();
    clip_by_global_norm(&mut out.grads, norm, settings.clip_norm);
    let decay: Vec<bool> = infos.iter().map(ParamSpec::decays).collect();
    let mut adamw = AdamW::new(settings.adamw, infos.iter().map(ParamInfo::numel));
    adamw.update(&mut values, &out.grads, settings.lr, &decay);
    Ok(Reference {
        loss: out.loss_sum / targets as f64,
        grads,
        updated: FullState::from_ordered(&infos, values),
        initial: initial.clone(),
        infos,
    })
}

/// What one rank of a layout ends the step with.
#[derive(Debug, Clone)]
pub struct RankOutcome {
    pub rank: usize,
    pub loss: StepLoss,
    /// Gradients after the model-parallel and data-parallel reductions.
    pub grads: RankState,
    pub updated: RankState,
    /// Per local chunk, the most micro-batches stashed at once.
    pub peak_in_flight: Vec<usize>,
}

/// Runs the step of `layout` on this rank (`world` spans the whole layout), dropout off
/// unless `settings.dropout`: the global batch is split over data-parallel ranks, then
/// into micro-batches.
pub fn layout_step(
    world: Box<dyn Communicator>,
    config: &ModelConfig,
    side: &SideInputs,
    layout: &Layout,
    schedule: &Schedule,
    batch: &Batch,
    initial: &FullState,
    settings: StepSettings,
    device: &Device,
) -> Result<RankOutcome, ParallelError> {
    let rank = world.rank();
    let groups = Groups::new(world, layout.mesh)?;
    let mut segments = build_segments(config, side, layout, &groups, initial, device)?;
    for s in &mut segments {
        s.set_training(settings.dropout);
        s.set_recompute(settings.recompute);
    }
    let rows = meshrec_comm::chunk_range(batch.batch_size, layout.mesh.dp, groups.coord.dp);
    let local = batch.rows(rows.start, rows.end);
    let micro = micro_batches(&local, schedule.micro_batches);
    let grad_scale = 1.0 / batch.num_targets().max(1) as f32;
    let mut timeline = Recorder::new();
    // Data parallelism as DDP does it: buckets reduced on the DP thread while backward
    // still runs (small buckets here, so the tiny model spans several).
    let mut dp = DpEngine::new(
        groups.dp.split(0, groups.coord.dp as u32)?,
        &settings.dp,
        None,
    )?;
    dp.begin_step(0)?;
    let mut loss = run_schedule(
        &mut segments,
        layout,
        schedule,
        &groups,
        &micro,
        grad_scale,
        &mut timeline,
        &mut dp,
    )?;
    dp.end_step(&segments)?;
    dp.take_oldest()?.write_into(&mut segments)?;
    reduce_model_parallel_grads(&mut segments, &groups)?;
    if layout.mesh.dp > 1 {
        let mut both = [loss.loss_sum as f32, loss.targets as f32];
        groups
            .dp
            .all_reduce(&mut both, meshrec_comm::ReduceOp::Sum)?;
        loss = StepLoss {
            loss_sum: f64::from(both[0]),
            targets: both[1].round() as usize,
        };
    }
    let zero = settings.dp.zero;
    let grads = RankState {
        coord: groups.coord,
        chunks: segments
            .iter()
            .map(|s| s.specs.clone())
            .zip(whole_grads(&segments, &groups, zero)?)
            .collect(),
    };
    let mut optimizer = RankOptimizer::new(settings.adamw, &segments, &groups, zero);
    optimizer.step(&mut segments, &groups, settings.lr, settings.clip_norm)?;
    let chunks = segments
        .iter()
        .map(|s| (s.specs.clone(), s.values()))
        .collect();
    Ok(RankOutcome {
        rank,
        loss,
        grads,
        updated: RankState {
            coord: groups.coord,
            chunks,
        },
        peak_in_flight: segments.iter().map(Segment::peak_in_flight).collect(),
    })
}

/// Largest relative deviation of `got` from `want` over all parameters: per parameter,
/// `max |got - want| / max(max |want|, floor)`. Returns the worst parameter and its error.
pub fn worst_deviation(
    want: &FullState,
    got: &FullState,
    floor: f32,
) -> Result<(String, f32), ParallelError> {
    let mut worst = (String::new(), 0.0f32);
    for (path, w) in &want.values {
        let g = got
            .values
            .get(path)
            .ok_or_else(|| ParallelError::State(format!("`{path}` is missing")))?;
        if g.len() != w.len() {
            return Err(ParallelError::State(format!(
                "`{path}` has {} values, want {}",
                g.len(),
                w.len()
            )));
        }
        let scale = w.iter().fold(floor, |m, x| m.max(x.abs()));
        let diff = w
            .iter()
            .zip(g)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = if diff.is_nan() {
            f32::INFINITY
        } else {
            diff / scale
        };
        if rel > worst.1 {
            worst = (path.clone(), rel);
        }
    }
    Ok(worst)
}

/// This rank's slices of a full state, for comparing one rank without gathering the others
/// (what the MPI check does in each process).
pub fn rank_slices(
    full: &FullState,
    rank: &RankState,
    layout: &Layout,
) -> Result<RankState, ParallelError> {
    let chunks = rank
        .chunks
        .iter()
        .map(|(specs, _)| {
            Ok((
                specs.clone(),
                shard_chunk(full, specs, &layout.mesh, rank.coord)?,
            ))
        })
        .collect::<Result<_, ParallelError>>()?;
    Ok(RankState {
        coord: rank.coord,
        chunks,
    })
}

/// Largest relative deviation between two states of one rank (same specs).
pub fn rank_deviation(
    want: &RankState,
    got: &RankState,
    floor: f32,
) -> Result<(String, f32), ParallelError> {
    let mut w = FullState::default();
    let mut g = FullState::default();
    for ((specs, wv), (_, gv)) in want.chunks.iter().zip(&got.chunks) {
        for ((spec, a), b) in specs.iter().zip(wv).zip(gv) {
            w.values.insert(
                spec.local_path.clone() + &format!("@{}", spec.full_path),
                a.clone(),
            );
            g.values.insert(
                spec.local_path.clone() + &format!("@{}", spec.full_path),
                b.clone(),
            );
        }
    }
    worst_deviation(&w, &g, floor)
}
