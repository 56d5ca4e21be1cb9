//! A rank of a DP × TP × PP mesh as a [`Stepper`]: its model chunks, their host AdamW
//! state, the pipeline schedule, and the gradient synchronisation (the data-parallel
//! all-reduce in buckets overlapped with backward, then the model-parallel reductions). Runs one thread per device on
//! the local engine, or one process per device under `mpirun`.

use burn::tensor::Device;
use meshrec_comm::{Communicator, LocalCluster, ReduceOp};
use meshrec_model::data::{Batch, Dataset};
use meshrec_model::optim::{clip_by_global_norm, AdamW};
use meshrec_model::params::{param_paths, write_values, ParamInfo};
use meshrec_model::{ModelConfig, Recommender};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use meshrec_balance::{
    split_batch, CostProfile, Decision, DeviceSpec, DpBalancer, Partition, RebalanceConfig,
    Rebalancer, StageSpec,
};
use meshrec_model::optim::AdamWConfig;

use meshrec_parallel::check::{build_segments, initial_state};
use meshrec_parallel::dp::{DpEngine, DpSettings, DpTraffic};
use meshrec_parallel::exec::{
    global_grad_norm, micro_batches, reduce_model_parallel_grads, run_schedule_releasing,
    ChunkGradReady,
};
use meshrec_parallel::layout::{shard_chunk, unshard, FullState, Layout, ParamSpec, RankState};
use meshrec_parallel::mesh::{Groups, Mesh};
use meshrec_parallel::schedule::Schedule;
use meshrec_parallel::segment::{DropoutKey, Segment};
use meshrec_parallel::timeline::{busy_s, write_svg, Event, EventKind, Recorder, StageTimeline};
use meshrec_parallel::ParallelError;

use crate::checkpoint::{StateKind, TrainState};
use crate::config::{BalanceSection, DpMode, FaultSection, RunConfig};
use crate::run::{
    adamw_config, dataset_model_config, dropout_seed, load_dataset, poison_first, train_with,
    ParallelStepStats, RunError, StepResult, Stepper, Summary,
};

impl From<ParallelError> for RunError {
    fn from(e: ParallelError) -> Self {
        RunError::Parallel(e.to_string())
    }
}

impl From<meshrec_comm::CommError> for RunError {
    fn from(e: meshrec_comm::CommError) -> Self {
        RunError::Parallel(e.to_string())
    }
}

/// One rank of the mesh.
pub struct MeshRank {
    groups: Groups,
    layout: Layout,
    schedule: Schedule,
    segments: Vec<Segment>,
    optimizers: Vec<AdamW>,
    decay: Vec<Vec<bool>>,
    /// Every rank's parameter specs, to reassemble the full model.
    all_specs: Vec<RankState>,
    full_infos: Vec<ParamInfo>,
    full_shapes: std::collections::BTreeMap<String, Vec<usize>>,
    model_config: ModelConfig,
    genres: Option<Vec<Vec<u32>>>,
    clip_norm: f64,
    seed: u64,
    device: Device,
    /// Steps whose timelines are drawn, and where.
    timeline: Option<TimelineCapture>,
    mode: DpMode,
    /// The DP group's gradient reduction (DP > 1, gradient-averaging modes).
    dp_engine: Option<DpEngine>,
    /// The ranks of this rank's DP replica (same DP coordinate): they apply updates together.
    replica: Box<dyn Communicator>,
    /// Steps whose DP reduction is under way (async DP), oldest first.
    pending: VecDeque<PendingUpdate>,
    /// Updates applied so far: the parameter version.
    version: u64,
    fault: FaultSection,
    /// Under MPI a crash injected by `[fault]` kills the process, as a real one would.
    crash_aborts: bool,
    adamw: AdamWConfig,
    balance: BalanceSection,
    /// Online pipeline rebalancer (`balance.rebalance`).
    rebalancer: Option<Rebalancer>,
    /// Speed-proportional DP split (`balance.dp_split`) and the replicas' current weights.
    dp_balancer: Option<DpBalancer>,
    dp_weights: Option<Vec<f64>>,
    /// This rank's measurements over the current balancing window.
    window: Window,
}

/// Sums over a balancing window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    steps: u64,
    /// Forward + backward seconds per micro-batch.
    compute_s: f64,
    /// Seconds from the step's start to the end of its pipeline schedule (what a replica
    /// makes the others wait for).
    worker_s: f64,
}

/// A step whose gradients are on their way through the DP reduction.
#[derive(Debug, Clone, Copy)]
struct PendingUpdate {
    step: u64,
    lr: f32,
    /// The parameter version the gradients were computed on.
    version: u64,
}

/// The steps of the run whose per-rank timelines go to `timeline.svg` / `timeline.json`.
struct TimelineCapture {
    first_step: u64,
    steps: u64,
    dir: std::path::PathBuf,
    /// Per captured step, every rank's events (on the leader).
    captured: Vec<Vec<StageTimeline>>,
}

impl MeshRank {
    /// Builds this rank's chunks, initialised exactly as the one-device model would be.
    /// `concurrent_comm`: whether the engine lets the DP reduction run on its own thread.
    pub fn new(
        world: Box<dyn Communicator>,
        config: &RunConfig,
        model_config: &ModelConfig,
        genres: Option<Vec<Vec<u32>>>,
        device: &Device,
        concurrent_comm: bool,
    ) -> Result<Self, RunError> {
        let p = &config.parallel;
        let mesh = Mesh::new(p.dp, p.tp, p.pp).map_err(ParallelError::from)?;
        mesh.validate(world.size(), model_config, p.virtual_stages)
            .map_err(ParallelError::from)?;
        let layout = Layout::uniform(mesh, p.virtual_stages, model_config.n_layers)
            .map_err(ParallelError::from)?;
        let schedule = Schedule::new(p.schedule_kind()?, p.pp, p.micro_batches, p.virtual_stages)
            .map_err(ParallelError::from)?;
        let crash_aborts = config.parallel.comm == "mpi";
        let groups = Groups::new(world, mesh)?;
        let coord = groups.coord;
        let replica = groups
            .world
            .split(coord.dp as u32, groups.world.rank() as u32)?;
        let mode = config.dp.mode()?;
        let dp_engine = match mode {
            DpMode::LocalSgd { .. } => None,
            _ if mesh.dp == 1 => None,
            _ => Some(DpEngine::new(
                groups.dp.split(0, coord.dp as u32)?,
                &DpSettings {
                    bucket_bytes: (config.dp.bucket_mb * 1024.0 * 1024.0) as usize,
                    method: config.compress.method_config()?,
                    error_feedback: config.compress.error_feedback,
                    seed: config.train.seed,
                    threaded: concurrent_comm,
                },
                None,
            )?),
        };
        let (full_infos, initial) =
            initial_state(model_config, genres.as_deref(), config.train.seed, device);
        let segments = build_segments(
            model_config,
            genres.as_deref(),
            &layout,
            &groups,
            &initial,
            device,
        )?;
        let optimizers = segments
            .iter()
            .map(|s| AdamW::new(adamw_config(config), s.infos.iter().map(ParamInfo::numel)))
            .collect();
        let decay = segments
            .iter()
            .map(|s| s.infos.iter().map(ParamSpec::decays).collect())
            .collect();
        let all_specs = all_rank_specs(model_config, genres.as_deref(), &layout, device);
        let balance = config.balance.clone();
        let micro_rows = (config.train.batch_size / mesh.dp / p.micro_batches).max(1);
        let rebalancer = if balance.rebalance {
            // Relative layer costs from the model's shape (the measured stage times correct
            // them); stage state fits: the model is small next to host memory.
            let profile = CostProfile::modelled(
                &model_config.shape(&config.model.preset),
                &DeviceSpec::cpu_default(),
                micro_rows as u64,
                p.tp as u32,
            )
            .map_err(balance_err)?;
            let stages = (0..p.pp)
                .map(|s| StageSpec {
                    speed: 1.0,
                    memory_bytes: u64::MAX / 4,
                    in_flight: (p.pp - s) as u32,
                })
                .collect();
            let cfg = RebalanceConfig {
                imbalance_threshold: balance.imbalance_threshold,
                patience: balance.patience,
                noise_margin: balance.noise_margin,
                micro_batches: p.micro_batches as u32,
                ..RebalanceConfig::default()
            };
            let current =
                Partition::from_blocks_per_stage(&layout.partition).map_err(balance_err)?;
            Some(Rebalancer::new(cfg, profile, stages, current).map_err(balance_err)?)
        } else {
            None
        };
        let dp_balancer = if balance.dp_split {
            Some(
                DpBalancer::new(config.train.batch_size, mesh.dp, 0.3, 0.05)
                    .and_then(|b| b.with_hysteresis(balance.patience, balance.noise_margin))
                    .map_err(balance_err)?,
            )
        } else {
            None
        };
        Ok(Self {
            adamw: adamw_config(config),
            balance,
            rebalancer,
            dp_balancer,
            dp_weights: None,
            window: Window::default(),
            groups,
            layout,
            schedule,
            segments,
            optimizers,
            decay,
            all_specs,
            full_shapes: initial.shapes,
            full_infos,
            model_config: model_config.clone(),
            genres,
            clip_norm: config.train.clip_norm,
            seed: config.train.seed,
            device: device.clone(),
            mode,
            dp_engine,
            replica,
            pending: VecDeque::new(),
            version: 0,
            fault: config.fault.clone(),
            crash_aborts,
            timeline: (config.output.timeline_steps > 0).then(|| TimelineCapture {
                first_step: 2,
                steps: config.output.timeline_steps,
                dir: config.run_dir(),
                captured: Vec::new(),
            }),
        })
    }
}

impl MeshRank {
    /// Gathers every rank's events of `step` to the leader; after the last captured step
    /// the leader draws them.
    fn capture_timeline(&mut self, step: u64, events: &[Event]) -> Result<(), RunError> {
        let world = self.groups.world.as_ref();
        let mine = serde_json::to_vec(events).map_err(|e| RunError::Parallel(e.to_string()))?;
        let all = world.all_gatherv_bytes(&mine)?;
        let (leader, mesh) = (world.rank() == 0, self.layout.mesh);
        let Some(capture) = self.timeline.as_mut() else {
            return Ok(());
        };
        if !leader {
            return Ok(());
        }
        let mut stages = Vec::with_capacity(all.len());
        for (rank, bytes) in all.iter().enumerate() {
            let events: Vec<Event> = serde_json::from_slice(bytes)
                .map_err(|e| RunError::Parallel(format!("rank {rank}'s timeline: {e}")))?;
            let c = mesh.coord(rank);
            stages.push(StageTimeline {
                rank,
                label: format!("r{rank} dp{} tp{} pp{}", c.dp, c.tp, c.pp),
                events,
            });
        }
        capture.captured.push(stages);
        if step + 1 == capture.first_step + capture.steps {
            // Steps side by side: shift each captured step after the previous one.
            let mut merged: Vec<StageTimeline> = capture.captured[0].clone();
            let mut offset = 0.0;
            for (i, step_stages) in capture.captured.iter().enumerate() {
                let end = step_stages
                    .iter()
                    .flat_map(|s| s.events.iter().map(|e| e.end_s))
                    .fold(0.0, f64::max);
                if i > 0 {
                    for (m, s) in merged.iter_mut().zip(step_stages) {
                        m.events.extend(s.events.iter().map(|e| Event {
                            start_s: e.start_s + offset,
                            end_s: e.end_s + offset,
                            ..*e
                        }));
                    }
                }
                offset += end;
            }
            let svg = capture.dir.join("timeline.svg");
            let title = format!(
                "{} · {} · {} micro-batches · steps {}..{}",
                self.layout.describe(),
                self.schedule.kind,
                self.schedule.micro_batches,
                capture.first_step,
                step
            );
            write_svg(&svg, &title, &merged).map_err(|e| RunError::Parallel(e.to_string()))?;
            let json = capture.dir.join("timeline.json");
            let text = serde_json::to_string(&capture.captured)
                .map_err(|e| RunError::Parallel(e.to_string()))?;
            std::fs::write(&json, text).map_err(|e| RunError::Io {
                path: json.clone(),
                message: e.to_string(),
            })?;
            tracing::info!(svg = %svg.display(), "timeline written");
        }
        Ok(())
    }

    /// Utilization and bubble agreed over the ranks that met this step (all of them, or
    /// this replica's in async DP, where replicas do not wait for each other), and the
    /// bytes this rank sent per group.
    fn step_stats(
        &self,
        recorder: &Recorder,
        pipeline_s: f64,
        dp: DpTraffic,
    ) -> Result<ParallelStepStats, RunError> {
        let group = match self.mode {
            DpMode::Async { .. } => self.replica.as_ref(),
            _ => self.groups.world.as_ref(),
        };
        let events = recorder.events();
        let mut wall = [recorder.now_s() as f32];
        group.all_reduce(&mut wall, ReduceOp::Max)?;
        let wall = f64::from(wall[0]).max(1e-9);
        let pipeline = pipeline_s / wall;
        let compute = busy_s(
            events,
            &[
                EventKind::Forward,
                EventKind::Backward,
                EventKind::Optimizer,
            ],
        ) / wall;
        let mut sums = [(1.0 - pipeline) as f32, compute as f32];
        group.all_reduce(&mut sums, ReduceOp::Sum)?;
        let mut min = [compute as f32];
        group.all_reduce(&mut min, ReduceOp::Min)?;
        let n = group.size() as f64;
        let bytes = |c: &dyn Communicator| c.stats().total().bytes_sent;
        Ok(ParallelStepStats {
            utilization_mean: f64::from(sums[1]) / n,
            utilization_min: f64::from(min[0]),
            bubble: f64::from(sums[0]) / n,
            comm_bytes_dp: bytes(self.groups.dp.as_ref()) + dp.sent_bytes,
            comm_bytes_tp: bytes(self.groups.tp.as_ref()),
            comm_bytes_pp: bytes(self.groups.pp.as_ref()),
            compression_ratio: dp.compression_ratio(),
            dp_dense_bytes: dp.dense_bytes,
            dp_wire_bytes: dp.wire_bytes,
            ..Default::default()
        })
    }

    /// Rows of a batch of `n` per DP replica: speed-proportional once the DP balancer has
    /// weights (every replica keeping at least one row per micro-batch), else equal.
    fn split_of(&self, n: usize) -> Vec<usize> {
        let (dp, m) = (self.layout.mesh.dp, self.schedule.micro_batches);
        let equal = || (0..dp).map(|r| meshrec_comm::chunk_len(n, dp, r)).collect();
        match &self.dp_weights {
            Some(w) => match split_batch(n, w) {
                Ok(split) if split.batch.iter().all(|&b| b >= m) => split.batch,
                _ => equal(),
            },
            None => equal(),
        }
    }

    /// This replica's rows of a batch of `n` (the gradient sum over all rows divided by the
    /// global target count is the same whatever the split, so an uneven split weights
    /// each replica by its rows automatically).
    fn replica_rows(&self, n: usize) -> Result<std::ops::Range<usize>, RunError> {
        let split = self.split_of(n);
        let dp = self.groups.coord.dp;
        let start: usize = split[..dp].iter().sum();
        Ok(start..start + split[dp])
    }

    /// At the end of each balancing window: every rank shares its stage and replica times
    /// (so all make the same decisions), the pipeline rebalancer may move blocks and the
    /// DP balancer may re-split the batch. Returns the migrations done (0 or 1).
    fn balance_window(&mut self, step: u64) -> Result<u64, RunError> {
        if self.rebalancer.is_none() && self.dp_balancer.is_none() {
            return Ok(0);
        }
        if !(step + 1).is_multiple_of(self.balance.window_steps) {
            return Ok(0);
        }
        let (pp, dp) = (self.layout.mesh.pp, self.layout.mesh.dp);
        let coord = self.groups.coord;
        let w = std::mem::take(&mut self.window);
        let n = w.steps.max(1) as f64;
        let mut times = vec![0.0f32; pp + dp];
        times[coord.pp] = (w.compute_s / n) as f32;
        times[pp + coord.dp] = (w.worker_s / n) as f32;
        self.groups.world.all_reduce(&mut times, ReduceOp::Max)?;
        let stage_s: Vec<f64> = times[..pp]
            .iter()
            .map(|&t| f64::from(t).max(1e-9))
            .collect();
        let worker_s: Vec<f64> = times[pp..]
            .iter()
            .map(|&t| f64::from(t).max(1e-9))
            .collect();
        if let Some(b) = self.dp_balancer.as_mut() {
            if let Some(split) = b.observe(&worker_s).map_err(balance_err)? {
                if self.is_leader() {
                    tracing::info!(step, rows = ?split.batch, "DP split follows measured replica speeds");
                }
                self.dp_weights = Some(split.weights);
            }
        }
        let decision = match self.rebalancer.as_mut() {
            Some(r) => r.observe(&stage_s).map_err(balance_err)?,
            None => return Ok(0),
        };
        let Decision::Migrate(proposal) = decision else {
            if self.is_leader() {
                tracing::debug!(step, ?stage_s, ?decision, "pipeline balance kept");
            }
            return Ok(0);
        };
        let blocks = proposal.partition.blocks_per_stage();
        if self.is_leader() {
            tracing::info!(
                step,
                from = ?self.layout.partition,
                to = ?blocks,
                stage_ms = ?stage_s.iter().map(|s| (s * 1e4).round() / 10.0).collect::<Vec<_>>(),
                "rebalancing the pipeline"
            );
        }
        self.migrate(blocks)?;
        if let Some(r) = self.rebalancer.as_mut() {
            r.commit(proposal.partition).map_err(balance_err)?;
        }
        Ok(1)
    }

    /// Moves blocks between pipeline stages: the state goes through its layout-free form
    /// (gathered, then re-sharded for the new partition), parameters and AdamW moments
    /// alike, so training continues as if nothing moved.
    fn migrate(&mut self, blocks: Vec<usize>) -> Result<(), RunError> {
        let state = self.gather_state()?;
        let layout =
            Layout::with_partition(self.layout.mesh, 1, blocks, self.model_config.n_layers)
                .map_err(ParallelError::from)?;
        self.segments = build_segments(
            &self.model_config,
            self.genres.as_deref(),
            &layout,
            &self.groups,
            &state.full(StateKind::Values),
            &self.device,
        )?;
        self.optimizers = self
            .segments
            .iter()
            .map(|s| AdamW::new(self.adamw, s.infos.iter().map(ParamInfo::numel)))
            .collect();
        self.decay = self
            .segments
            .iter()
            .map(|s| s.infos.iter().map(ParamSpec::decays).collect())
            .collect();
        self.all_specs = all_rank_specs(
            &self.model_config,
            self.genres.as_deref(),
            &layout,
            &self.device,
        );
        self.layout = layout;
        self.adopt_moments(&state)?;
        if let Some(engine) = self.dp_engine.as_mut() {
            // Compressor memories follow the DP buckets, which the move reshapes.
            engine.reset_memory()?;
        }
        Ok(())
    }

    /// The whole training state, gathered on every rank (updates in flight applied first);
    /// without compressor memories.
    fn gather_state(&mut self) -> Result<TrainState, RunError> {
        self.settle()?;
        let values = self.gather_full(|me, i| me.segments[i].values())?;
        let m = self.gather_full(|me, i| me.optimizers[i].m.clone())?;
        let v = self.gather_full(|me, i| me.optimizers[i].v.clone())?;
        Ok(TrainState {
            shapes: values.shapes,
            values: values.values,
            adam_m: m.values,
            adam_v: v.values,
            optimizer_steps: self.optimizers.first().map_or(0, |o| o.step),
            partition: self.layout.partition.clone(),
            compressor: Vec::new(),
        })
    }

    /// This rank's shards of the AdamW moments and step count of `state`.
    fn adopt_moments(&mut self, state: &TrainState) -> Result<(), RunError> {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let (m, v) = (state.full(StateKind::AdamM), state.full(StateKind::AdamV));
        for (s, opt) in self.segments.iter().zip(self.optimizers.iter_mut()) {
            opt.m = shard_chunk(&m, &s.specs, &mesh, coord)?;
            opt.v = shard_chunk(&v, &s.specs, &mesh, coord)?;
            opt.step = state.optimizer_steps;
        }
        Ok(())
    }

    /// Whether every rank of this replica says `yes` (they must apply updates together).
    fn replica_agrees(&self, yes: bool) -> Result<bool, RunError> {
        if self.replica.size() == 1 {
            return Ok(yes);
        }
        let mut v = [if yes { 1.0f32 } else { 0.0 }];
        self.replica.all_reduce(&mut v, ReduceOp::Min)?;
        Ok(v[0] > 0.5)
    }

    /// The update from the gradients in the segments (already averaged over DP where it
    /// applies): model-parallel reductions, the global norm (a non-finite one skips the
    /// update on every rank of the replica), clipping and AdamW. Returns whether it skipped.
    fn apply_update(&mut self, lr: f32, recorder: &mut Recorder) -> Result<bool, RunError> {
        let (segments, groups) = (&mut self.segments, &self.groups);
        recorder.record(EventKind::AllReduce, None, None, || {
            reduce_model_parallel_grads(segments, groups)
        })?;
        let norm = global_grad_norm(&self.segments, &self.groups)?;
        self.version += 1;
        if !norm.is_finite() {
            return Ok(true);
        }
        let clip = self.clip_norm;
        let (segments, optimizers, decay) = (&mut self.segments, &mut self.optimizers, &self.decay);
        recorder.record(EventKind::Optimizer, None, None, || {
            for ((s, opt), decay) in segments.iter_mut().zip(optimizers.iter_mut()).zip(decay) {
                clip_by_global_norm(&mut s.grads, norm, clip);
                let mut values = s.values();
                opt.update(&mut values, &s.grads, lr, decay);
                s.set_values(&values)?;
            }
            Ok::<_, ParallelError>(())
        })?;
        Ok(false)
    }

    /// Takes the oldest DP reduction and applies it; returns (skipped, staleness, traffic).
    fn apply_oldest(
        &mut self,
        recorder: &mut Recorder,
    ) -> Result<(bool, u64, DpTraffic), RunError> {
        let pending = self
            .pending
            .pop_front()
            .ok_or_else(|| RunError::Parallel("no update pending".into()))?;
        let engine = self
            .dp_engine
            .as_mut()
            .ok_or_else(|| RunError::Parallel("no DP reduction engine".into()))?;
        let reduced = recorder.record(EventKind::AllReduce, None, None, || engine.take_oldest())?;
        if reduced.step != pending.step {
            return Err(RunError::Parallel(format!(
                "DP reduction of step {} arrived where step {} was expected",
                reduced.step, pending.step
            )));
        }
        reduced.write_into(&mut self.segments)?;
        let staleness = self.version - pending.version;
        let skipped = self.apply_update(pending.lr, recorder)?;
        Ok((skipped, staleness, reduced.traffic()))
    }

    /// Applies every update still in flight (before the parameters are read whole).
    fn drain(&mut self) -> Result<(), RunError> {
        let mut recorder = Recorder::new();
        while !self.pending.is_empty() {
            self.apply_oldest(&mut recorder)?;
        }
        Ok(())
    }

    /// Every rank's per-parameter buffers (`per_chunk(local chunk)`), gathered and unsharded.
    fn gather_full(
        &mut self,
        per_chunk: impl Fn(&Self, usize) -> Vec<Vec<f32>>,
    ) -> Result<FullState, RunError> {
        let mine: Vec<f32> = (0..self.segments.len())
            .flat_map(|i| per_chunk(self, i).into_iter().flatten())
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
                    let n = meshrec_parallel::layout::shard_shape(
                        spec.split,
                        shape,
                        self.layout.mesh.tp,
                        state.coord.tp,
                    )
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

    /// Before reading the whole model: updates in flight applied, local-SGD replicas averaged.
    fn settle(&mut self) -> Result<(), RunError> {
        self.drain()?;
        if matches!(self.mode, DpMode::LocalSgd { .. }) {
            average_parameters(&mut self.segments, self.groups.dp.as_ref())?;
        }
        Ok(())
    }
}

impl Stepper for MeshRank {
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError> {
        let coord = self.groups.coord;
        let world_rank = self.groups.world.rank();
        // Attention dropout (inside the TP shards) from this rank's stream; replicated-region
        // dropout keyed so TP replicas agree.
        meshrec_model::dropout::seed_dropout(
            dropout_seed(self.seed, step) ^ (world_rank as u64).wrapping_mul(0x9e37_79b9),
        );
        let slowdown = if self.fault.slow_compute_rank == world_rank {
            self.fault.slow_compute
        } else {
            1.0
        };
        for s in &mut self.segments {
            s.zero_grads();
            s.slowdown = slowdown;
            s.dropout_key = DropoutKey {
                seed: self.seed,
                step,
                dp_rank: coord.dp as u64,
            };
        }
        let step_start = Instant::now();
        let rows = self.replica_rows(batch.batch_size)?;
        let local = batch.rows(rows.start, rows.end);
        let micro = micro_batches(&local, self.schedule.micro_batches);
        if micro.len() != self.schedule.micro_batches {
            return Err(RunError::Parallel(format!(
                "a batch of {} rows cannot feed dp {} × {} micro-batches (lower parallel.micro_batches or raise train.batch_size)",
                batch.batch_size, self.layout.mesh.dp, self.schedule.micro_batches
            )));
        }
        let global_targets = batch.num_targets();
        // Local SGD: each replica follows the mean gradient of its own rows.
        let grad_scale = match self.mode {
            DpMode::LocalSgd { .. } => 1.0 / local.num_targets().max(1) as f32,
            _ => 1.0 / global_targets.max(1) as f32,
        };
        for group in [&self.groups.dp, &self.groups.tp, &self.groups.pp] {
            group.reset_stats();
        }
        let capturing = self
            .timeline
            .as_ref()
            .is_some_and(|t| (t.first_step..t.first_step + t.steps).contains(&step));
        if capturing {
            // One start for all ranks, so their rows line up.
            self.groups.world.barrier()?;
        }
        let mut recorder = Recorder::new();
        if self.fault.slow_ms > 0 && self.fault.slow_rank == world_rank {
            std::thread::sleep(std::time::Duration::from_millis(self.fault.slow_ms));
        }
        let poison = self.fault.nan_step == Some(step) && self.fault.nan_rank == world_rank;
        // DDP: each gradient joins a bucket the moment backward finalises it, and full
        // buckets are reduced over DP (on the reduction thread) while backward goes on.
        if let Some(engine) = self.dp_engine.as_mut() {
            engine.begin_step(step)?;
        }
        let mut first = true;
        let engine = &mut self.dp_engine;
        let releasing = engine.is_some();
        let mut push = |chunk: usize, param: usize, g: &[f32]| match engine.as_mut() {
            Some(e) if poison && std::mem::take(&mut first) => {
                let mut bad = [g.to_vec()];
                poison_first(&mut bad);
                e.push(chunk, param, &bad[0])
            }
            Some(e) => e.push(chunk, param, g),
            None => Ok(()),
        };
        let loss = run_schedule_releasing(
            &mut self.segments,
            &self.layout,
            &self.schedule,
            &self.groups,
            &micro,
            grad_scale,
            &mut recorder,
            releasing.then_some(&mut push as ChunkGradReady<'_>),
        )?;
        self.window.steps += 1;
        self.window.worker_s += step_start.elapsed().as_secs_f64();
        // Forward and backward are done for the step: its pipeline compute is final here.
        let pipeline_s = busy_s(
            recorder.events(),
            &[EventKind::Forward, EventKind::Backward],
        );
        self.window.compute_s += pipeline_s / self.schedule.micro_batches as f64;
        if self.fault.crash_step == Some(step) && self.fault.crash_rank == world_rank {
            // Dies mid-step: its peers are waiting on the DP and model-parallel reductions.
            if self.crash_aborts {
                eprintln!("meshrec: [fault] crash of world rank {world_rank} at step {step}");
                std::process::abort();
            }
            return Err(RunError::Parallel(format!(
                "[fault] injected crash of world rank {world_rank} at step {step}"
            )));
        }
        if poison && !releasing {
            if let Some(s) = self.segments.first_mut() {
                poison_first(&mut s.grads);
            }
        }
        let mut traffic = DpTraffic::default();
        let (mut skipped, mut staleness) = (false, Vec::new());
        match (self.mode, self.dp_engine.is_some()) {
            (_, true) => {
                if let Some(engine) = self.dp_engine.as_mut() {
                    engine.end_step(&self.segments)?;
                }
                self.pending.push_back(PendingUpdate {
                    step,
                    lr,
                    version: self.version,
                });
                let bound = match self.mode {
                    DpMode::Async { max_staleness } => max_staleness,
                    _ => 0,
                };
                // Apply what has arrived (all replica ranks together), and wait for what
                // would otherwise exceed the staleness bound.
                while let Some(head) = self.pending.front().copied() {
                    let forced = step - head.step >= bound;
                    if !forced {
                        let ready = match self.dp_engine.as_mut() {
                            Some(e) => e.oldest_ready()?,
                            None => false,
                        };
                        if !self.replica_agrees(ready)? {
                            break;
                        }
                    }
                    let (s, age, t) = self.apply_oldest(&mut recorder)?;
                    skipped |= s;
                    staleness.push(age);
                    traffic.add(t);
                }
            }
            (DpMode::LocalSgd { every }, false) => {
                skipped = self.apply_update(lr, &mut recorder)?;
                staleness.push(0);
                if (step + 1).is_multiple_of(every) {
                    let segments = &mut self.segments;
                    let dp = self.groups.dp.as_ref();
                    recorder.record(EventKind::AllReduce, None, None, || {
                        average_parameters(segments, dp)
                    })?;
                }
            }
            (_, false) => {
                skipped = self.apply_update(lr, &mut recorder)?;
                staleness.push(0);
            }
        }
        // Loss over the global batch where replicas meet every step; this replica's rows
        // in async DP (a blocking DP reduction would make it synchronous).
        let mut loss_parts = [loss.loss_sum as f32];
        let (mut loss_sum, mut loss_targets) = (loss.loss_sum, local.num_targets());
        if self.layout.mesh.dp > 1 && !matches!(self.mode, DpMode::Async { .. }) {
            self.groups.dp.all_reduce(&mut loss_parts, ReduceOp::Sum)?;
            loss_sum = f64::from(loss_parts[0]);
            loss_targets = global_targets;
        }
        let migrations = self.balance_window(step)?;
        let mut parallel = self.step_stats(&recorder, pipeline_s, traffic)?;
        parallel.migrations = migrations;
        let split = self.split_of(batch.batch_size);
        parallel.dp_rows_min = split.iter().copied().min().unwrap_or(0) as u64;
        parallel.dp_rows_max = split.iter().copied().max().unwrap_or(0) as u64;
        parallel.updates_applied = staleness.len() as u64;
        parallel.staleness_max = staleness.iter().copied().max().unwrap_or(0);
        parallel.staleness_mean =
            staleness.iter().sum::<u64>() as f64 / staleness.len().max(1) as f64;
        if capturing {
            self.capture_timeline(step, recorder.events())?;
        }
        Ok(StepResult {
            loss_sum,
            loss_targets,
            targets: global_targets,
            skipped,
            parallel: Some(parallel),
        })
    }

    fn full_model(&mut self) -> Result<Recommender, RunError> {
        self.settle()?;
        let full = self.gather_full(|me, i| me.segments[i].values())?;
        let model = Recommender::new(&self.model_config, self.genres.as_deref(), &self.device);
        let values = full.to_ordered(&self.full_infos)?;
        debug_assert_eq!(param_paths(&model).len(), values.len());
        Ok(write_values(model, &values, &self.device))
    }

    fn is_leader(&self) -> bool {
        self.groups.world.rank() == 0
    }

    fn agree(&mut self, flags: [bool; 2]) -> Result<[bool; 2], RunError> {
        let mut v = flags.map(|f| if f { 1.0f32 } else { 0.0 });
        self.groups.world.broadcast(&mut v, 0)?;
        Ok(v.map(|x| x > 0.5))
    }

    fn export_state(&mut self) -> Result<Option<TrainState>, RunError> {
        let mut state = self.gather_state()?;
        let memory = match self.dp_engine.as_mut() {
            Some(e) => e.memory_bytes()?,
            None => Vec::new(),
        };
        let compressor = self.groups.world.all_gatherv_bytes(&memory)?;
        if !self.is_leader() {
            return Ok(None);
        }
        if compressor.iter().any(|c| !c.is_empty()) {
            state.compressor = compressor;
        }
        Ok(Some(state))
    }

    fn import_state(&mut self, state: &TrainState, same_layout: bool) -> Result<(), RunError> {
        let (mesh, coord) = (self.layout.mesh, self.groups.coord);
        let values = state.full(StateKind::Values);
        for s in &mut self.segments {
            s.set_values(&shard_chunk(&values, &s.specs, &mesh, coord)?)?;
        }
        self.adopt_moments(state)?;
        self.version = state.optimizer_steps;
        // Compressor memories follow the DP buckets: only the same layout and partition
        // (the rebalancer may have moved blocks since) can take them.
        let same_buckets = same_layout && state.partition == self.layout.partition;
        let rank = self.groups.world.rank();
        if let (true, Some(engine), Some(bytes)) = (
            same_buckets,
            self.dp_engine.as_mut(),
            state.compressor.get(rank),
        ) {
            engine.restore_memory(bytes)?;
        }
        Ok(())
    }
}

/// The parameter specs of every rank of `layout` (derived, not communicated).
fn all_rank_specs(
    model_config: &ModelConfig,
    genres: Option<&[Vec<u32>]>,
    layout: &Layout,
    device: &Device,
) -> Vec<RankState> {
    let mesh = layout.mesh;
    (0..mesh.world_size())
        .map(|r| {
            let coord = mesh.coord(r);
            let chunks = (0..layout.virtual_stages)
                .map(|local| {
                    let k = layout.model_chunk(coord.pp, local);
                    let s = Segment::new(model_config, genres, layout, coord, k, device);
                    (s.specs, Vec::new())
                })
                .collect();
            RankState { coord, chunks }
        })
        .collect()
}

fn balance_err(e: meshrec_balance::BalanceError) -> RunError {
    RunError::Parallel(format!("balance: {e}"))
}

/// Local SGD's synchronisation: every parameter replaced by its mean over the DP group.
fn average_parameters(
    segments: &mut [Segment],
    dp: &dyn Communicator,
) -> Result<(), ParallelError> {
    if dp.size() == 1 {
        return Ok(());
    }
    for s in segments.iter_mut() {
        let mut values = s.values();
        for v in values.iter_mut() {
            dp.all_reduce(v, ReduceOp::Avg)?;
        }
        s.set_values(&values)?;
    }
    Ok(())
}

/// Trains the whole mesh of `[parallel]` in this process, one thread per device on the
/// local engine; returns the leader's summary.
pub fn train_local(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Summary, RunError> {
    let dataset = load_dataset(config)?;
    let model_config = dataset_model_config(config, &dataset)?;
    let world = config.parallel.world_size();
    let results = LocalCluster::run(world, |comm| {
        rank_main(
            Box::new(comm),
            config,
            &dataset,
            &model_config,
            device,
            device_name,
            true,
            resume,
        )
    })
    .map_err(|e| RunError::Parallel(e.to_string()))?;
    leader_result(results)
}

/// The leader's result of a mesh run on the local engine (the others return `None`); if any
/// rank failed, every failing rank's account: the first failure and what it did to the
/// others.
pub(crate) fn leader_result<T>(results: Vec<Result<Option<T>, RunError>>) -> Result<T, RunError> {
    let mut leader = None;
    let mut failures = Vec::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(Some(t)) => leader = Some(t),
            Ok(None) => {}
            Err(e) => failures.push(format!("rank {rank}: {e}")),
        }
    }
    if !failures.is_empty() {
        return Err(RunError::Parallel(failures.join("; ")));
    }
    leader.ok_or_else(|| RunError::Parallel("the leader returned nothing".into()))
}

/// One rank's whole run (any engine).
pub fn rank_main(
    world: Box<dyn Communicator>,
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    device: &Device,
    device_name: &str,
    concurrent_comm: bool,
    resume: Option<&Path>,
) -> Result<Option<Summary>, RunError> {
    let genres = dataset.features.as_ref().map(|f| f.item_genres.clone());
    let mut rank = MeshRank::new(world, config, model_config, genres, device, concurrent_comm)?;
    if rank.is_leader() {
        tracing::info!(
            layout = rank.layout.describe(),
            schedule = %rank.schedule.kind,
            micro_batches = rank.schedule.micro_batches,
            comm = config.parallel.comm,
            "mesh of {} ranks",
            rank.layout.mesh.world_size()
        );
    }
    train_with(
        config,
        dataset,
        model_config,
        &mut rank,
        device,
        device_name,
        resume,
    )
}

/// This process's rank of a run launched by `mpirun -np N meshrec train --comm mpi`; world
/// rank 0 returns the summary.
#[cfg(feature = "mpi")]
pub fn train_mpi(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Option<Summary>, RunError> {
    use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
    let runtime = MpiRuntime::init().map_err(|e| RunError::Parallel(format!("MPI init: {e}")))?;
    let world = runtime.world(MpiConfig::default());
    if world.size() != config.parallel.world_size() {
        return Err(RunError::Parallel(format!(
            "mpirun started {} processes but [parallel] dp {} × tp {} × pp {} needs {}",
            world.size(),
            config.parallel.dp,
            config.parallel.tp,
            config.parallel.pp,
            config.parallel.world_size()
        )));
    }
    let dataset = load_dataset(config)?;
    let model_config = dataset_model_config(config, &dataset)?;
    rank_main(
        Box::new(world),
        config,
        &dataset,
        &model_config,
        device,
        device_name,
        runtime.concurrent_threads(),
        resume,
    )
}

/// Without the `mpi` feature there is no MPI engine to run on.
#[cfg(not(feature = "mpi"))]
pub fn train_mpi(
    _: &RunConfig,
    _: &Device,
    _: &str,
    _: Option<&Path>,
) -> Result<Option<Summary>, RunError> {
    Err(RunError::Parallel(
        "parallel.comm = \"mpi\" needs a build with `--features mpi`".into(),
    ))
}
