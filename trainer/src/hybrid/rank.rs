//! One rank of a DP × TP × PP mesh as a [`Stepper`], composed of parts that each own their
//! state: its share of the model ([`RankModel`]), the DP mode's update policy
//! ([`DpUpdater`]), the online balancers ([`OnlineBalancer`]), the timeline capture
//! ([`TimelineCapture`]) and the fault hooks ([`FaultHooks`]). A step runs the pipeline
//! schedule with the data-parallel reduction fed as backward releases gradients, then lets
//! the DP policy apply what it applies.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use meshrec_comm::{all_reduce_as, Communicator, ReduceOp};
use meshrec_model::data::Batch;
use meshrec_model::{ModelConfig, Recommender, SideInputs};
use meshrec_parallel::dp::{DpEngine, DpTraffic};
use meshrec_parallel::exec::{micro_batches, run_schedule, StepHooks};
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::{validate_layout, Groups};
use meshrec_parallel::ParallelError;
use meshrec_pipeline::timeline::{busy_s, EventKind, Recorder};
use meshrec_pipeline::{Action, Mesh, Schedule};

use crate::checkpoint::{
    compressor_file, read_verified, write_entry, FileEntry, Manifest, Progress, ShardIndex,
    TrainState,
};
use crate::checkpoint_shard::shard_file;
use crate::config::RunConfig;
use crate::error::RunError;
use crate::faults::{poison_first, stretch, ConfigFaults, FaultHooks, FaultPoint};
use crate::hybrid::balancing::OnlineBalancer;
use crate::hybrid::capture::TimelineCapture;
use crate::hybrid::dp_update::{dp_updater, DpUpdater};
use crate::hybrid::model::{MemoryPlan, RankModel, RankSnapshot};
use crate::setup::{adamw_config, dropout_seed};
use crate::stepper::{HeldMemory, Migration, ParallelStepStats, StepResult, Stepper};

/// One rank of the mesh.
pub struct MeshRank {
    model: RankModel,
    schedule: Schedule,
    dp: Box<dyn DpUpdater>,
    balancer: OnlineBalancer,
    capture: Option<TimelineCapture>,
    faults: Box<dyn FaultHooks>,
    seed: u64,
    /// Elastic: keep the state from before each update, to roll back to.
    keeps_snapshot: bool,
    snapshot: Option<RankSnapshot>,
    concurrent_comm: bool,
    model_config: ModelConfig,
}

/// What the executor's step hooks do on a mesh rank: feed the DP engine as backward
/// releases gradients (poisoning the first when a fault says so), and stretch compute on a
/// rank a fault makes slow.
struct MeshStepHooks<'a> {
    engine: Option<&'a mut DpEngine>,
    compute_stretch: f64,
    /// A poisoning fault not yet carried out.
    poison_pending: bool,
}

impl StepHooks for MeshStepHooks<'_> {
    fn releases_grads(&self) -> bool {
        self.engine.is_some()
    }

    fn grad_ready(
        &mut self,
        chunk: usize,
        param: usize,
        shape: &[usize],
        grad: &[f32],
    ) -> Result<(), ParallelError> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(());
        };
        if std::mem::take(&mut self.poison_pending) {
            let mut bad = [grad.to_vec()];
            poison_first(&mut bad);
            return engine.push(chunk, param, shape, &bad[0]);
        }
        engine.push(chunk, param, shape, grad)
    }

    fn computed(&mut self, _action: Action, elapsed: Duration) {
        stretch(elapsed, self.compute_stretch);
    }
}

impl MeshRank {
    /// Builds this rank's chunks, initialised exactly as the one-device model would be.
    /// `concurrent_comm`: whether the engine lets the DP reduction run on its own thread.
    pub fn new(
        world: Box<dyn Communicator>,
        config: &RunConfig,
        model_config: &ModelConfig,
        side: SideInputs,
        device: &Device,
        concurrent_comm: bool,
    ) -> Result<Self, RunError> {
        let p = &config.parallel;
        let mesh = Mesh::new(p.dp, p.tp, p.pp)?;
        validate_layout(&mesh, world.size(), model_config, p.virtual_stages)?;
        let layout = Layout::uniform(mesh, p.virtual_stages, model_config.n_layers)?
            .with_sequence_parallel(p.sequence_parallel);
        if layout.splits_sequence() && !model_config.max_len.is_multiple_of(p.tp) {
            return Err(RunError::Config(crate::config::invalid(
                "parallel.sequence_parallel",
                format!(
                    "splits the {} sequence positions over tp {}: tp must divide them",
                    model_config.max_len, p.tp
                ),
            )));
        }
        let schedule = p.schedule_spec()?.build(p.pp, p.micro_batches)?;
        let groups = Groups::new(world, mesh)?;
        let faults = ConfigFaults::new(&config.fault, groups.world.rank(), p.comm == "mpi");
        let dp = dp_updater(config, &groups, concurrent_comm)?;
        let balancer = OnlineBalancer::new(config, model_config, &layout)?;
        let capture = (config.output.timeline_steps > 0)
            .then(|| TimelineCapture::new(config.output.timeline_steps, config.run_dir()));
        let model = RankModel::new(
            groups,
            layout,
            model_config,
            side,
            config.train.seed,
            adamw_config(config),
            MemoryPlan {
                zero: config.dp.zero_stage()?,
                recompute: config.train.recompute()?,
            },
            config.train.clip_norm,
            device,
        )?;
        Ok(Self {
            model,
            schedule,
            dp,
            balancer,
            capture,
            faults: Box::new(faults),
            seed: config.train.seed,
            keeps_snapshot: config.elastic.enabled,
            snapshot: None,
            concurrent_comm,
            model_config: model_config.clone(),
        })
    }

    /// Updates this rank has applied (the parameters' version; the steps taken, in sync DP).
    pub fn applied(&self) -> u64 {
        self.model.version
    }

    /// The pipeline partition in use (blocks per stage).
    pub fn partition(&self) -> Vec<usize> {
        self.model.layout.partition.clone()
    }

    /// Rolls back the last update (to the state kept before it); an error if there is no
    /// such state or it is not from `applied`.
    pub fn roll_back_to(&mut self, applied: u64) -> Result<(), RunError> {
        if self.applied() == applied {
            return Ok(());
        }
        match self.snapshot.take() {
            Some(s) if s.version() == applied => self.model.restore(s),
            other => Err(RunError::Parallel(format!(
                "world rank {} applied {} updates and kept the state of {:?}: it cannot go back to {applied}",
                self.model.groups.world.rank(),
                self.applied(),
                other.map(|s| s.version())
            ))),
        }
    }

    /// This rank on a new world that differs from its mesh only in the DP size (an elastic
    /// membership change), continuing from its state in memory: the chunks, their moments
    /// and the partition stay; the groups, the DP engine and the balancer are new.
    /// Collective over `world`.
    pub fn regroup(
        self,
        world: Box<dyn Communicator>,
        config: &RunConfig,
        faults: Box<dyn FaultHooks>,
    ) -> Result<Self, RunError> {
        let Self {
            mut model,
            schedule,
            dp,
            capture,
            seed,
            keeps_snapshot,
            concurrent_comm,
            model_config,
            ..
        } = self;
        // The old DP engine's thread ends with its world.
        drop(dp);
        let p = &config.parallel;
        let mesh = Mesh::new(p.dp, p.tp, p.pp)?;
        model.regroup(Groups::new(world, mesh)?)?;
        let dp = dp_updater(config, &model.groups, concurrent_comm)?;
        let balancer = OnlineBalancer::new(config, &model_config, &model.layout)?;
        Ok(Self {
            model,
            schedule,
            dp,
            balancer,
            capture,
            faults,
            seed,
            keeps_snapshot,
            snapshot: None,
            concurrent_comm,
            model_config,
        })
    }

    /// Builds this rank with the pipeline partition a running mesh uses (a replica that
    /// joins it), then takes its DP group's state from DP rank 0.
    pub fn join(mut self, partition: Vec<usize>) -> Result<Self, RunError> {
        if self.partition() != partition {
            self.model.rebuild_with_partition(partition, self.seed)?;
        }
        self.model.broadcast_from_dp_root()?;
        Ok(self)
    }

    /// Members of a DP group that a replica joins: the state goes from DP rank 0 to the
    /// newcomers. Collective over DP.
    pub fn share_state(&mut self) -> Result<(), RunError> {
        self.dp.settle(&mut self.model)?;
        self.model.broadcast_from_dp_root()
    }

    /// The same rank with other fault hooks than `[fault]`'s.
    pub fn with_faults(mut self, faults: Box<dyn FaultHooks>) -> Self {
        self.faults = faults;
        self
    }

    /// `dp2·tp2·pp2 v1 · 1f1b · 4 micro-batches`, for logs and titles.
    pub fn describe(&self) -> String {
        format!(
            "{} · {} · {} micro-batches",
            self.model.layout.describe(),
            self.schedule.kind,
            self.schedule.micro_batches
        )
    }

    /// This rank's world rank.
    pub fn world_rank(&self) -> usize {
        self.model.groups.world.rank()
    }

    /// Ranks in the mesh.
    pub fn world_size(&self) -> usize {
        self.model.groups.world.size()
    }

    /// At the end of a balancing window, carries out a pipeline repartition the rebalancer
    /// decided.
    fn balance(&mut self, step: u64) -> Result<Option<Migration>, RunError> {
        let (mesh, coord) = (self.model.layout.mesh, self.model.groups.coord);
        let world = self.model.groups.world.as_ref();
        let Some(proposal) = self
            .balancer
            .window_end(step, world, coord, mesh.pp, mesh.dp)?
        else {
            return Ok(None);
        };
        let migration = Migration {
            blocks_per_stage: proposal.partition.blocks_per_stage(),
            modelled_bottleneck_before_s: proposal.current_bottleneck_s,
            modelled_bottleneck_after_s: proposal.predicted_bottleneck_s,
        };
        self.dp.settle(&mut self.model)?;
        self.model
            .repartition(proposal.partition.blocks_per_stage())?;
        if let Some(engine) = self.dp.engine() {
            // Compressor memories follow the DP buckets, which the move reshapes.
            engine.reset_memory()?;
        }
        self.balancer.commit(proposal)?;
        Ok(Some(migration))
    }

    /// What every world rank holds now (collective: each rank's count gathered).
    fn held_memory(&self) -> Result<Vec<HeldMemory>, RunError> {
        let world = self.model.groups.world.as_ref();
        let mine = self.model.held_memory();
        let mut all = vec![0i64; 3 * world.size()];
        let at = 3 * world.rank();
        all[at..at + 3].copy_from_slice(&[
            mine.param_bytes as i64,
            mine.grad_bytes as i64,
            mine.optimizer_bytes as i64,
        ]);
        all_reduce_as(world, &mut all, ReduceOp::Sum)?;
        Ok(all
            .chunks_exact(3)
            .map(|c| HeldMemory {
                param_bytes: c[0] as u64,
                grad_bytes: c[1] as u64,
                optimizer_bytes: c[2] as u64,
            })
            .collect())
    }

    /// Utilization and bubble agreed over the ranks that met this step (all of them, or
    /// this replica's where replicas do not wait for each other), and the bytes this rank
    /// sent per group.
    fn step_stats(
        &self,
        recorder: &Recorder,
        pipeline_s: f64,
        dp: DpTraffic,
    ) -> Result<ParallelStepStats, RunError> {
        let groups = &self.model.groups;
        let group = self.dp.stats_group(groups.world.as_ref());
        let mut wall = [recorder.now_s() as f32];
        group.all_reduce(&mut wall, ReduceOp::Max)?;
        let wall = f64::from(wall[0]).max(1e-9);
        let pipeline = pipeline_s / wall;
        let compute = busy_s(
            recorder.events(),
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
            comm_bytes_dp: bytes(groups.dp.as_ref()) + dp.sent_bytes,
            comm_bytes_tp: bytes(groups.tp.as_ref()),
            comm_bytes_pp: bytes(groups.pp.as_ref()),
            compression_ratio: dp.compression_ratio(),
            dp_dense_bytes: dp.dense_bytes,
            dp_wire_bytes: dp.wire_bytes,
            ..Default::default()
        })
    }
}

impl Stepper for MeshRank {
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError> {
        let world_rank = self.model.groups.world.rank();
        let (mesh, coord) = (self.model.layout.mesh, self.model.groups.coord);
        // Attention dropout (inside the TP shards) from this rank's stream; replicated-region
        // dropout keyed so TP replicas agree.
        meshrec_model::dropout::seed_dropout(
            dropout_seed(self.seed, step) ^ (world_rank as u64).wrapping_mul(0x9e37_79b9),
        );
        self.model.begin_step(self.seed, step);
        let step_start = Instant::now();
        let rows = self
            .balancer
            .replica_rows(batch.batch_size, mesh.dp, coord.dp);
        let local = batch.rows(rows.start, rows.end);
        let micro = micro_batches(&local, self.schedule.micro_batches);
        if micro.len() != self.schedule.micro_batches {
            return Err(RunError::Parallel(format!(
                "a batch of {} rows cannot feed dp {} × {} micro-batches (lower parallel.micro_batches or raise train.batch_size)",
                batch.batch_size, mesh.dp, self.schedule.micro_batches
            )));
        }
        let global_targets = batch.num_targets();
        let grad_scale = self.dp.grad_scale(local.num_targets(), global_targets);
        let groups = &self.model.groups;
        for group in [&groups.dp, &groups.tp, &groups.pp] {
            group.reset_stats();
        }
        let capturing = self.capture.as_ref().is_some_and(|c| c.wants(step));
        if capturing {
            // One start for all ranks, so their rows line up.
            groups.world.barrier()?;
        }
        let mut recorder = Recorder::new();
        self.faults.before_step(step);
        if let Some(engine) = self.dp.engine() {
            engine.begin_step(step)?;
        }
        let mut hooks = MeshStepHooks {
            compute_stretch: self.faults.compute_stretch(),
            poison_pending: self.faults.poisons(step),
            engine: self.dp.engine(),
        };
        let loss = run_schedule(
            &mut self.model.segments,
            &self.model.layout,
            &self.schedule,
            &self.model.groups,
            &micro,
            grad_scale,
            &mut recorder,
            &mut hooks,
        )?;
        let poison_pending = hooks.poison_pending;
        // Forward and backward are done for the step: its pipeline compute is final here.
        let pipeline_s = busy_s(
            recorder.events(),
            &[EventKind::Forward, EventKind::Backward],
        );
        self.balancer
            .record(step_start.elapsed().as_secs_f64(), pipeline_s);
        // Peers are waiting in the DP and model-parallel reductions now.
        self.faults.at(FaultPoint::MidStep, step)?;
        if poison_pending {
            if let Some(s) = self.model.segments.first_mut() {
                poison_first(&mut s.grads);
            }
        }
        if self.keeps_snapshot {
            self.snapshot = Some(self.model.snapshot());
        }
        let applied = self.dp.update(step, lr, &mut self.model, &mut recorder)?;
        self.faults.at(FaultPoint::AfterUpdate, step)?;
        let memory = self.held_memory()?;
        // Loss over the global batch where replicas meet every step; this replica's rows
        // where they do not (a blocking DP reduction would make them meet).
        let (mut loss_sum, mut loss_targets) = (loss.loss_sum, local.num_targets());
        if mesh.dp > 1 && self.dp.replicas_meet() {
            let mut parts = [loss.loss_sum as f32];
            self.model.groups.dp.all_reduce(&mut parts, ReduceOp::Sum)?;
            loss_sum = f64::from(parts[0]);
            loss_targets = global_targets;
        }
        let migration = self.balance(step)?;
        let mut parallel = self.step_stats(&recorder, pipeline_s, applied.traffic)?;
        parallel.migrations = u64::from(migration.is_some());
        let split = self.balancer.split_of(batch.batch_size, mesh.dp);
        parallel.dp_rows_min = split.iter().copied().min().unwrap_or(0) as u64;
        parallel.dp_rows_max = split.iter().copied().max().unwrap_or(0) as u64;
        let staleness = &applied.staleness;
        parallel.updates_applied = staleness.len() as u64;
        parallel.staleness_max = staleness.iter().copied().max().unwrap_or(0);
        parallel.staleness_mean =
            staleness.iter().sum::<u64>() as f64 / staleness.len().max(1) as f64;
        if capturing {
            let title = self.describe();
            if let Some(capture) = self.capture.as_mut() {
                let world = self.model.groups.world.as_ref();
                capture.capture(step, recorder.events(), world, &mesh, &title)?;
            }
        }
        Ok(StepResult {
            loss_sum,
            loss_targets,
            targets: global_targets,
            skipped: applied.skipped,
            parallel: Some(parallel),
            migration,
            memory,
        })
    }

    fn full_model(&mut self) -> Result<Recommender, RunError> {
        self.dp.settle(&mut self.model)?;
        self.model.full_model()
    }

    fn is_leader(&self) -> bool {
        self.model.groups.world.rank() == 0
    }

    fn leader_decides_stop(
        &mut self,
        stop: bool,
        progress: &mut Progress,
    ) -> Result<bool, RunError> {
        let world = self.model.groups.world.as_ref();
        // bincode, not JSON: a diverged run's NaN loss must cross as NaN (JSON writes null,
        // which then fails to parse on every rank).
        let config = bincode::config::standard();
        let mut bytes = if world.rank() == 0 {
            bincode::serde::encode_to_vec((stop, &*progress), config)
                .map_err(|e| RunError::Parallel(format!("encoding the progress: {e}")))?
        } else {
            Vec::new()
        };
        world.broadcast_bytes(&mut bytes, 0)?;
        let ((stop, leaders), _): ((bool, Progress), usize) =
            bincode::serde::decode_from_slice(&bytes, config).map_err(|e| {
                RunError::Parallel(format!("world rank 0 sent an unreadable progress: {e}"))
            })?;
        *progress = leaders;
        Ok(stop)
    }

    fn fault_point(&mut self, point: FaultPoint, step: u64) -> Result<(), RunError> {
        self.faults.at(point, step)
    }

    fn export_state(&mut self) -> Result<Option<TrainState>, RunError> {
        self.dp.settle(&mut self.model)?;
        let mut state = self.model.gather_state()?;
        let memory = match self.dp.engine() {
            Some(e) => e.memory_bytes()?,
            None => Vec::new(),
        };
        let compressor = self.model.groups.world.all_gatherv_bytes(&memory)?;
        if !self.is_leader() {
            return Ok(None);
        }
        if compressor.iter().any(|c| !c.is_empty()) {
            state.compressor = compressor;
        }
        Ok(Some(state))
    }

    fn write_shards(
        &mut self,
        tmp: &Path,
        with_compressor: bool,
    ) -> Result<Option<(Vec<FileEntry>, ShardIndex)>, RunError> {
        self.dp.settle(&mut self.model)?;
        let world = self.model.groups.world.as_ref();
        // The leader has created `tmp`.
        world.barrier()?;
        let rank = world.rank();
        let name = shard_file(rank);
        let bytes = self
            .model
            .shard()
            .to_bytes()
            .map_err(|e| crate::checkpoint::bad(&tmp.join(&name), e))?;
        let mut mine = vec![write_entry(tmp, &name, &bytes)?];
        if let Some(engine) = self.dp.engine().filter(|_| with_compressor) {
            let memory = engine.memory_bytes()?;
            mine.push(write_entry(tmp, &compressor_file(rank), &memory)?);
        }
        let encoded = serde_json::to_vec(&mine).map_err(|e| RunError::io(tmp, e))?;
        let world = self.model.groups.world.as_ref();
        let all = world.all_gatherv_bytes(&encoded)?;
        if !self.is_leader() {
            return Ok(None);
        }
        let mut files = Vec::new();
        for (r, part) in all.iter().enumerate() {
            let entries: Vec<FileEntry> = serde_json::from_slice(part).map_err(|e| {
                RunError::Parallel(format!("rank {r} described its shard files wrongly: {e}"))
            })?;
            files.extend(entries);
        }
        Ok(Some((files, self.model.shard_index())))
    }

    fn import_shards(
        &mut self,
        dir: &Path,
        manifest: &Manifest,
        index: &ShardIndex,
        same_layout: bool,
    ) -> Result<(), RunError> {
        self.model.adopt_shards(dir, manifest, index)?;
        let same_buckets = same_layout && index.partition == self.model.layout.partition;
        let name = compressor_file(self.model.groups.world.rank());
        if same_buckets && manifest.compressor.is_some() {
            if let Some(engine) = self.dp.engine() {
                engine.restore_memory(&read_verified(dir, manifest, &name)?)?;
            }
        }
        Ok(())
    }

    fn import_state(&mut self, state: &TrainState, same_layout: bool) -> Result<(), RunError> {
        self.model.adopt(state)?;
        // Compressor memories follow the DP buckets: only the same layout and partition
        // (the rebalancer may have moved blocks since) can take them.
        let same_buckets = same_layout && state.partition == self.model.layout.partition;
        let rank = self.model.groups.world.rank();
        if let (true, Some(bytes)) = (same_buckets, state.compressor.get(rank)) {
            if let Some(engine) = self.dp.engine() {
                engine.restore_memory(bytes)?;
            }
        }
        Ok(())
    }
}
