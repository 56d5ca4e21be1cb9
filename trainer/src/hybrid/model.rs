//! A rank's share of the model and its optimizer: its chunks of the layout with their host
//! AdamW state, the update from the step's gradients (model-parallel reductions, global
//! norm, clipping, AdamW), and the layout-free state gathered from or handed back to the
//! shards (checkpoints, block migration, evaluation).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use meshrec_comm::ReduceOp;
use meshrec_model::optim::AdamWConfig;
use meshrec_model::params::{param_paths, write_values, ParamInfo};
use meshrec_model::{ModelConfig, Recommender, SideInputs};
use meshrec_parallel::exec::reduce_model_parallel_grads;
use meshrec_parallel::layout::{
    shard_chunk, shard_shape, unshard, FullState, Layout, RankState, SliceMap, Split,
};
use meshrec_parallel::mesh::Groups;
use meshrec_parallel::optim::RankOptimizer;
use meshrec_parallel::rank::{all_rank_specs, build_segments, initial_state};
use meshrec_parallel::segment::{DropoutKey, Segment};
use meshrec_parallel::ParallelError;
use meshrec_pipeline::timeline::{EventKind, Recorder};
use meshrec_pipeline::{Recompute, ZeroStage};

use crate::checkpoint::{self, Manifest, ShardIndex, StateKind, TrainState};
use crate::checkpoint_shard::{self, shard_file, RankShard, ShardEntry, Wanted};
use crate::error::RunError;
use crate::stepper::HeldMemory;

/// How a rank saves memory: ZeRO's sharding and activation recomputation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    pub zero: ZeroStage,
    pub recompute: Recompute,
}

/// A rank's parameters and optimizer state as they were before an update: what an elastic
/// run rolls back to when survivors disagree on whether the step happened (Horovod's
/// in-memory commit, one step deep).
pub struct RankSnapshot {
    values: Vec<Vec<Vec<f32>>>,
    optimizer: RankOptimizer,
    version: u64,
}

impl RankSnapshot {
    /// Updates applied when it was taken.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// This rank's chunks of the layout, their optimizer state, and what it takes to reassemble
/// the whole model from every rank's slices.
pub struct RankModel {
    pub groups: Groups,
    pub layout: Layout,
    pub segments: Vec<Segment>,
    optimizer: RankOptimizer,
    /// Every rank's parameter specs (derived from the layout), to reassemble the model.
    all_specs: Vec<RankState>,
    full_infos: Vec<ParamInfo>,
    full_shapes: BTreeMap<String, Vec<usize>>,
    model_config: ModelConfig,
    side: SideInputs,
    adamw: AdamWConfig,
    zero: ZeroStage,
    recompute: Recompute,
    clip_norm: f64,
    device: Device,
    /// Updates applied so far: the parameter version (async DP measures staleness by it).
    pub version: u64,
}

impl RankModel {
    /// This rank's chunks of `layout`, initialised exactly as the one-device model would be
    /// (keyed by `seed` and parameter path).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        groups: Groups,
        layout: Layout,
        model_config: &ModelConfig,
        side: SideInputs,
        seed: u64,
        adamw: AdamWConfig,
        memory: MemoryPlan,
        clip_norm: f64,
        device: &Device,
    ) -> Result<Self, RunError> {
        let MemoryPlan { zero, recompute } = memory;
        let (full_infos, initial) = initial_state(model_config, &side, seed, device);
        let mut model = Self {
            optimizer: RankOptimizer::new(adamw, &[], &groups, zero),
            groups,
            layout,
            segments: Vec::new(),
            all_specs: Vec::new(),
            full_infos,
            full_shapes: initial.shapes.clone(),
            model_config: model_config.clone(),
            side,
            adamw,
            zero,
            recompute,
            clip_norm,
            device: device.clone(),
            version: 0,
        };
        model.build(model.layout.clone(), &initial)?;
        Ok(model)
    }

    /// (Re)builds this rank's chunks of `layout` from a full state, with fresh optimizers.
    fn build(&mut self, layout: Layout, values: &FullState) -> Result<(), RunError> {
        self.segments = build_segments(
            &self.model_config,
            &self.side,
            &layout,
            &self.groups,
            values,
            &self.device,
        )?;
        for s in &mut self.segments {
            s.set_recompute(self.recompute);
        }
        self.optimizer = RankOptimizer::new(self.adamw, &self.segments, &self.groups, self.zero);
        self.all_specs = all_rank_specs(&self.model_config, &self.side, &layout, &self.device)?;
        self.layout = layout;
        Ok(())
    }

    /// Zeroes the gradients and keys the step's dropout masks.
    pub fn begin_step(&mut self, seed: u64, step: u64) {
        let dp_rank = self.groups.coord.dp as u64;
        for s in &mut self.segments {
            s.zero_grads();
            s.dropout_key = DropoutKey {
                seed,
                step,
                dp_rank,
            };
        }
    }

    /// The update from the gradients in the segments (already averaged over DP where it
    /// applies): model-parallel reductions, the global norm (a non-finite one skips the
    /// update on every rank of the replica), clipping and AdamW. Returns whether it skipped.
    pub fn apply_update(&mut self, lr: f32, recorder: &mut Recorder) -> Result<bool, RunError> {
        let (segments, groups) = (&mut self.segments, &self.groups);
        recorder.record(EventKind::GradAllReduce, None, None, || {
            reduce_model_parallel_grads(segments, groups)
        })?;
        self.version += 1;
        let (segments, optimizer, groups) = (&mut self.segments, &mut self.optimizer, &self.groups);
        let (lr, clip) = (lr, self.clip_norm);
        let step = recorder.record(EventKind::Optimizer, None, None, || {
            optimizer.step(segments, groups, lr, clip)
        })?;
        Ok(step.skipped)
    }

    /// This rank's parameters and optimizer state now (a copy).
    pub fn snapshot(&self) -> RankSnapshot {
        RankSnapshot {
            values: self.segments.iter().map(Segment::values).collect(),
            optimizer: self.optimizer.clone(),
            version: self.version,
        }
    }

    /// Back to `snapshot`'s state.
    pub fn restore(&mut self, snapshot: RankSnapshot) -> Result<(), RunError> {
        for (s, values) in self.segments.iter_mut().zip(&snapshot.values) {
            s.set_values(values)?;
        }
        self.optimizer = snapshot.optimizer;
        self.version = snapshot.version;
        Ok(())
    }

    /// The same chunks and state on a new mesh that differs only in its DP size (an elastic
    /// membership change): TP and PP coordinates, partition and shapes stay.
    pub fn regroup(&mut self, groups: Groups) -> Result<(), RunError> {
        let (old, new) = (self.layout.mesh, groups.mesh);
        if (old.tp, old.pp) != (new.tp, new.pp)
            || groups.coord.tp != self.groups.coord.tp
            || groups.coord.pp != self.groups.coord.pp
        {
            return Err(RunError::Parallel(format!(
                "a membership change may only change the DP size: {old:?} at {} cannot become {new:?} at {}",
                self.groups.coord, groups.coord
            )));
        }
        self.optimizer.regroup(&groups)?;
        for s in &mut self.segments {
            s.abandon_step();
        }
        self.layout.mesh = new;
        self.groups = groups;
        // Every world rank's slices, to reassemble the model: the world changed.
        self.all_specs =
            all_rank_specs(&self.model_config, &self.side, &self.layout, &self.device)?;
        Ok(())
    }

    /// Parameters, moments and step count broadcast from DP rank 0 to the rest of the DP
    /// group (a joining replica takes its donor's state). Collective over DP.
    pub fn broadcast_from_dp_root(&mut self) -> Result<(), RunError> {
        let dp = self.groups.dp.as_ref();
        for s in &mut self.segments {
            let mut values = s.values();
            for v in values.iter_mut() {
                dp.broadcast(v, 0)?;
            }
            s.set_values(&values)?;
        }
        for moment in self.optimizer.moments_mut() {
            dp.broadcast(moment, 0)?;
        }
        let mut version = self.version.to_le_bytes().to_vec();
        dp.broadcast_bytes(&mut version, 0)?;
        let bytes: [u8; 8] = version
            .as_slice()
            .try_into()
            .map_err(|_| RunError::Parallel("the donor sent a malformed step count".into()))?;
        self.version = u64::from_le_bytes(bytes);
        self.optimizer.set_steps(self.version);
        Ok(())
    }

    /// The bytes this rank holds now: its chunks' parameter tensors, gradient buffers and
    /// AdamW moments (under ZeRO, the shards), counted from the buffers.
    pub fn held_memory(&self) -> HeldMemory {
        let f32_bytes = std::mem::size_of::<f32>() as u64;
        HeldMemory {
            param_bytes: self
                .segments
                .iter()
                .map(|s| f32_bytes * s.chunk.num_params() as u64)
                .sum(),
            grad_bytes: self
                .segments
                .iter()
                .flat_map(|s| &s.grads)
                .map(|g| f32_bytes * g.capacity() as u64)
                .sum(),
            optimizer_bytes: self.optimizer.held_bytes(),
        }
    }

    /// Every parameter replaced by its mean over the DP group (local SGD's
    /// synchronisation).
    pub fn average_over_dp(&mut self) -> Result<(), RunError> {
        let group = self.groups.dp.as_ref();
        if group.size() == 1 {
            return Ok(());
        }
        for s in &mut self.segments {
            let mut values = s.values();
            for v in values.iter_mut() {
                group.all_reduce(v, ReduceOp::Avg)?;
            }
            s.set_values(&values)?;
        }
        Ok(())
    }

    /// Every rank's per-parameter buffers (`per_chunk(local chunk)`), gathered over the
    /// world and unsharded. Collective.
    fn gather_full(
        &self,
        per_chunk: impl Fn(usize) -> Vec<Vec<f32>>,
    ) -> Result<FullState, RunError> {
        let mine: Vec<f32> = (0..self.segments.len())
            .flat_map(|i| per_chunk(i).into_iter().flatten())
            .collect();
        let gathered = self.groups.world.all_gatherv(&mine)?;
        let mut ranks = Vec::with_capacity(gathered.len());
        for (state, flat) in self.all_specs.iter().zip(gathered) {
            let mut at = 0usize;
            let mut chunks = Vec::new();
            for (specs, _) in &state.chunks {
                let mut values = Vec::with_capacity(specs.len());
                for spec in specs {
                    let shape = self.full_shapes.get(&spec.full_path).ok_or_else(|| {
                        RunError::Parallel(format!("unknown parameter `{}`", spec.full_path))
                    })?;
                    let n = shard_shape(spec.split, shape, self.layout.mesh.tp, state.coord.tp)
                        .iter()
                        .product::<usize>();
                    let slice = flat.get(at..at + n).ok_or_else(|| {
                        RunError::Parallel(format!("rank {:?} sent too few values", state.coord))
                    })?;
                    values.push(slice.to_vec());
                    at += n;
                }
                chunks.push((specs.clone(), values));
            }
            ranks.push(RankState {
                coord: state.coord,
                chunks,
            });
        }
        Ok(unshard(&self.full_shapes, &ranks, &self.layout.mesh)?)
    }

    /// Parameters and AdamW moments of the whole model, on every rank (without compressor
    /// memories). Collective; the caller settles updates in flight first.
    pub fn gather_state(&self) -> Result<TrainState, RunError> {
        let values = self.gather_full(|i| self.segments[i].values())?;
        let (m, v) = self.optimizer.full_moments(&self.groups)?;
        let m = self.gather_full(|i| m[i].clone())?;
        let v = self.gather_full(|i| v[i].clone())?;
        Ok(TrainState {
            shapes: values.shapes,
            values: values.values,
            adam_m: m.values,
            adam_v: v.values,
            optimizer_steps: self.optimizer.steps(),
            partition: self.layout.partition.clone(),
            compressor: Vec::new(),
        })
    }

    /// What this rank saves of the training state in a sharded checkpoint: its slices of
    /// the parameters where it is the one copy that saves them (DP rank 0, TP rank 0 for
    /// replicated parameters, never the head's tied copy of the table) and the moments it
    /// holds (its ZeRO shard of every slice; without ZeRO, DP rank 0's).
    pub fn shard(&self) -> RankShard {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let zero_sharded = self.zero.shards_optimizer();
        let mut entries = Vec::new();
        for (c, seg) in self.segments.iter().enumerate() {
            let values = seg.values();
            for (p, spec) in seg.specs.iter().enumerate() {
                if spec.tied_copy || (spec.split == Split::Replicated && coord.tp != 0) {
                    continue;
                }
                let save_values = coord.dp == 0;
                let save_moments = zero_sharded || coord.dp == 0;
                let moments = self.optimizer.moments_of(c, p).filter(|_| save_moments);
                if !save_values && moments.is_none() {
                    continue;
                }
                let (moments_from, m, v) = match moments {
                    Some((range, m, v)) => (range.start, m.to_vec(), v.to_vec()),
                    None => (0, Vec::new(), Vec::new()),
                };
                entries.push(ShardEntry {
                    path: spec.full_path.clone(),
                    split: spec.split,
                    tp: coord.tp,
                    tp_size: mesh.tp,
                    values: save_values.then(|| values[p].clone()),
                    moments_from,
                    m,
                    v,
                });
            }
        }
        RankShard {
            rank: self.groups.world.rank(),
            entries,
        }
    }

    /// The index of a sharded checkpoint of this model (shard files of every world rank).
    pub fn shard_index(&self) -> ShardIndex {
        ShardIndex {
            shards: (0..self.groups.world.size()).map(shard_file).collect(),
            shapes: self.full_shapes.clone(),
            optimizer_steps: self.optimizer.steps(),
            partition: self.layout.partition.clone(),
        }
    }

    /// Takes this rank's slices of a sharded checkpoint saved by any layout, reading the
    /// shard files one at a time (never the whole model at once).
    pub fn adopt_shards(
        &mut self,
        dir: &Path,
        manifest: &Manifest,
        index: &ShardIndex,
    ) -> Result<(), RunError> {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let sizes: Vec<Vec<usize>> = self
            .segments
            .iter()
            .map(|s| s.infos.iter().map(ParamInfo::numel).collect())
            .collect();
        let zeros = || -> Vec<Vec<Vec<f32>>> {
            sizes
                .iter()
                .map(|c| c.iter().map(|&n| vec![0.0f32; n]).collect())
                .collect()
        };
        let (mut values, mut m, mut v) = (zeros(), zeros(), zeros());
        {
            let mut wanted = Vec::new();
            for (seg, (vc, (mc, vvc))) in self
                .segments
                .iter()
                .zip(values.iter_mut().zip(m.iter_mut().zip(v.iter_mut())))
            {
                for (spec, (vp, (mp, vvp))) in seg
                    .specs
                    .iter()
                    .zip(vc.iter_mut().zip(mc.iter_mut().zip(vvc.iter_mut())))
                {
                    let shape = index.shapes.get(&spec.full_path).ok_or_else(|| {
                        checkpoint::bad(
                            &dir.join("manifest.json"),
                            format!("has no shape for `{}`", spec.full_path),
                        )
                    })?;
                    let map = SliceMap::new(spec.split, shape, mesh.tp, coord.tp);
                    wanted.push(Wanted::new(&spec.full_path, map, vp, mp, vvp));
                }
            }
            checkpoint_shard::fill(dir, manifest, index, &mut wanted)?;
        }
        for (s, vals) in self.segments.iter_mut().zip(&values) {
            s.set_values(vals)?;
        }
        self.optimizer.load_moments(m, v, index.optimizer_steps)?;
        self.version = index.optimizer_steps;
        Ok(())
    }

    /// Takes this rank's slices of a layout-free state: parameters, AdamW moments and step.
    pub fn adopt(&mut self, state: &TrainState) -> Result<(), RunError> {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let values = state.full(StateKind::Values);
        for s in &mut self.segments {
            s.set_values(&shard_chunk(&values, &s.specs, &mesh, coord)?)?;
        }
        self.adopt_moments(state)?;
        self.version = state.optimizer_steps;
        Ok(())
    }

    fn adopt_moments(&mut self, state: &TrainState) -> Result<(), RunError> {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let (m, v) = (state.full(StateKind::AdamM), state.full(StateKind::AdamV));
        let mut ms = Vec::with_capacity(self.segments.len());
        let mut vs = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            ms.push(shard_chunk(&m, &s.specs, &mesh, coord)?);
            vs.push(shard_chunk(&v, &s.specs, &mesh, coord)?);
        }
        Ok(self.optimizer.load_moments(ms, vs, state.optimizer_steps)?)
    }

    /// This rank's chunks of another partition, freshly initialised (not collective: a
    /// joining replica's, which then takes its state from a donor).
    pub fn rebuild_with_partition(
        &mut self,
        blocks: Vec<usize>,
        seed: u64,
    ) -> Result<(), RunError> {
        let (_, initial) = initial_state(&self.model_config, &self.side, seed, &self.device);
        let layout =
            Layout::with_partition(self.layout.mesh, 1, blocks, self.model_config.n_layers)
                .map_err(ParallelError::from)?
                .with_sequence_parallel(self.layout.sequence_parallel);
        self.build(layout, &initial)
    }

    /// Moves blocks between pipeline stages: the state goes through its layout-free form
    /// (gathered, then re-sharded for the new partition), parameters and AdamW moments
    /// alike, so training continues as if nothing moved. Collective; the caller settles
    /// updates in flight first.
    pub fn repartition(&mut self, blocks: Vec<usize>) -> Result<(), RunError> {
        let state = self.gather_state()?;
        let layout =
            Layout::with_partition(self.layout.mesh, 1, blocks, self.model_config.n_layers)
                .map_err(ParallelError::from)?
                .with_sequence_parallel(self.layout.sequence_parallel);
        self.build(layout, &state.full(StateKind::Values))?;
        self.adopt_moments(&state)
    }

    /// The whole model with the current parameters, on every rank. Collective; the caller
    /// settles updates in flight first.
    pub fn full_model(&self) -> Result<Recommender, RunError> {
        let full = self.gather_full(|i| self.segments[i].values())?;
        let model = Recommender::new(&self.model_config, &self.side, &self.device);
        let values = full.to_ordered(&self.full_infos)?;
        debug_assert_eq!(param_paths(&model).len(), values.len());
        Ok(write_values(model, &values, &self.device))
    }
}
