//! How a data-parallel replica turns its step's gradients into parameter updates, one type
//! per mode: [`Undistributed`] (one replica), [`Reduced`] (sync DP, and async DP with a
//! staleness bound: the gradients go through the DP engine's buckets, updates are applied
//! in order as their reductions arrive) and [`LocalSgd`] (own gradients, parameters
//! averaged every few steps).

use std::collections::VecDeque;

use meshrec_comm::{Communicator, ReduceOp};
use meshrec_parallel::dp::{DpEngine, DpSettings, DpTraffic};
use meshrec_parallel::mesh::Groups;
use meshrec_pipeline::timeline::{EventKind, Recorder};
use meshrec_pipeline::DpMode;

use crate::config::RunConfig;
use crate::error::RunError;
use crate::hybrid::model::RankModel;

/// What a step's update did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// A non-finite gradient skipped (one of) the update(s).
    pub skipped: bool,
    /// Per update applied, how many other updates it missed (0 in sync DP).
    pub staleness: Vec<u64>,
    /// The DP reductions' bytes behind the applied updates.
    pub traffic: DpTraffic,
}

/// A DP mode's update policy. Calls are collective over the mesh like the step itself.
pub trait DpUpdater: Send {
    /// The engine that takes gradients as backward releases them (DDP's overlap), in the
    /// modes that reduce gradients.
    fn engine(&mut self) -> Option<&mut DpEngine> {
        None
    }

    /// The scale of this rank's gradient sum: one over the targets the update averages.
    fn grad_scale(&self, replica_targets: usize, global_targets: usize) -> f32 {
        let _ = replica_targets;
        1.0 / global_targets.max(1) as f32
    }

    /// After backward: applies the updates this step applies.
    fn update(
        &mut self,
        step: u64,
        lr: f32,
        model: &mut RankModel,
        recorder: &mut Recorder,
    ) -> Result<Applied, RunError>;

    /// Before the model is read whole: every update in flight applied, replicas agreeing.
    fn settle(&mut self, model: &mut RankModel) -> Result<(), RunError> {
        let _ = model;
        Ok(())
    }

    /// Whether replicas meet every step, so that the loss and the mesh statistics are the
    /// global batch's (else they are this replica's).
    fn replicas_meet(&self) -> bool {
        true
    }

    /// The group a step's statistics are agreed over: the world where replicas meet, this
    /// replica's ranks where they do not.
    fn stats_group<'a>(&'a self, world: &'a dyn Communicator) -> &'a dyn Communicator {
        world
    }
}

/// The updater of `config`'s DP mode for this rank. `concurrent_comm`: whether the engine
/// lets the DP reduction run on its own thread.
pub fn dp_updater(
    config: &RunConfig,
    groups: &Groups,
    concurrent_comm: bool,
) -> Result<Box<dyn DpUpdater>, RunError> {
    let mode = config.dp.mode()?;
    if let DpMode::LocalSgd { sync_every } = mode {
        return Ok(Box::new(LocalSgd { sync_every }));
    }
    if groups.mesh.dp == 1 {
        return Ok(Box::new(Undistributed));
    }
    let coord = groups.coord;
    let engine = DpEngine::new(
        groups.dp.split(0, coord.dp as u32)?,
        &DpSettings {
            bucket_bytes: (config.dp.bucket_mb * 1024.0 * 1024.0) as usize,
            method: config.compress.method_config()?,
            memory: config
                .compress
                .memory_options(groups.mesh.dp, config.train.seed),
            threaded: concurrent_comm,
            zero: config.dp.zero_stage()?,
        },
        None,
    )?;
    let replica = groups
        .world
        .split(coord.dp as u32, groups.world.rank() as u32)?;
    let max_staleness = match mode {
        DpMode::Async { max_staleness } => Some(max_staleness),
        _ => None,
    };
    Ok(Box::new(Reduced {
        engine,
        pending: VecDeque::new(),
        max_staleness,
        replica,
    }))
}

/// One replica: its gradients are the global batch's.
pub struct Undistributed;

impl DpUpdater for Undistributed {
    fn update(
        &mut self,
        _step: u64,
        lr: f32,
        model: &mut RankModel,
        recorder: &mut Recorder,
    ) -> Result<Applied, RunError> {
        Ok(Applied {
            skipped: model.apply_update(lr, recorder)?,
            staleness: vec![0],
            traffic: DpTraffic::default(),
        })
    }
}

/// A step whose gradients are on their way through the DP reduction.
#[derive(Debug, Clone, Copy)]
struct PendingUpdate {
    step: u64,
    lr: f32,
    /// The parameter version the gradients were computed on.
    version: u64,
}

/// Gradients averaged over the DP group in buckets: sync DP (`max_staleness` none: every
/// step waits for its own reduction) or async DP (an update is applied once its reduction
/// has arrived, at most `max_staleness` steps after the step that computed it).
pub struct Reduced {
    engine: DpEngine,
    /// Steps whose reduction is under way, oldest first.
    pending: VecDeque<PendingUpdate>,
    max_staleness: Option<u64>,
    /// The ranks of this rank's replica: they apply updates together.
    replica: Box<dyn Communicator>,
}

impl Reduced {
    /// Whether every rank of this replica says `yes`.
    fn replica_agrees(&self, yes: bool) -> Result<bool, RunError> {
        if self.replica.size() == 1 {
            return Ok(yes);
        }
        let mut v = [if yes { 1.0f32 } else { 0.0 }];
        self.replica.all_reduce(&mut v, ReduceOp::Min)?;
        Ok(v[0] > 0.5)
    }

    /// Takes the oldest reduction and applies it.
    fn apply_oldest(
        &mut self,
        model: &mut RankModel,
        recorder: &mut Recorder,
        applied: &mut Applied,
    ) -> Result<(), RunError> {
        let pending = self
            .pending
            .pop_front()
            .ok_or_else(|| RunError::Parallel("no update pending".into()))?;
        let engine = &mut self.engine;
        let reduced =
            recorder.record(EventKind::DpAllReduce, None, None, || engine.take_oldest())?;
        if reduced.step != pending.step {
            return Err(RunError::Parallel(format!(
                "DP reduction of step {} arrived where step {} was expected",
                reduced.step, pending.step
            )));
        }
        reduced.write_into(&mut model.segments)?;
        applied.staleness.push(model.version - pending.version);
        applied.skipped |= model.apply_update(pending.lr, recorder)?;
        applied.traffic.add(reduced.traffic());
        Ok(())
    }
}

impl DpUpdater for Reduced {
    fn engine(&mut self) -> Option<&mut DpEngine> {
        Some(&mut self.engine)
    }

    fn update(
        &mut self,
        step: u64,
        lr: f32,
        model: &mut RankModel,
        recorder: &mut Recorder,
    ) -> Result<Applied, RunError> {
        self.engine.end_step(&model.segments)?;
        self.pending.push_back(PendingUpdate {
            step,
            lr,
            version: model.version,
        });
        let bound = self.max_staleness.unwrap_or(0);
        let mut applied = Applied::default();
        // Apply what has arrived (all replica ranks together), and wait for what would
        // otherwise exceed the staleness bound.
        while let Some(head) = self.pending.front().copied() {
            let forced = step - head.step >= bound;
            if !forced {
                let ready = self.engine.oldest_ready()?;
                if !self.replica_agrees(ready)? {
                    break;
                }
            }
            self.apply_oldest(model, recorder, &mut applied)?;
        }
        Ok(applied)
    }

    fn settle(&mut self, model: &mut RankModel) -> Result<(), RunError> {
        let mut recorder = Recorder::new();
        let mut applied = Applied::default();
        while !self.pending.is_empty() {
            self.apply_oldest(model, &mut recorder, &mut applied)?;
        }
        Ok(())
    }

    fn replicas_meet(&self) -> bool {
        self.max_staleness.is_none()
    }

    fn stats_group<'a>(&'a self, world: &'a dyn Communicator) -> &'a dyn Communicator {
        if self.replicas_meet() {
            world
        } else {
            self.replica.as_ref()
        }
    }
}

/// Local SGD: each replica follows the mean gradient of its own rows; parameters are
/// averaged over DP every `sync_every` steps and before the model is read whole.
pub struct LocalSgd {
    sync_every: u64,
}

impl DpUpdater for LocalSgd {
    fn grad_scale(&self, replica_targets: usize, _global_targets: usize) -> f32 {
        1.0 / replica_targets.max(1) as f32
    }

    fn update(
        &mut self,
        step: u64,
        lr: f32,
        model: &mut RankModel,
        recorder: &mut Recorder,
    ) -> Result<Applied, RunError> {
        let skipped = model.apply_update(lr, recorder)?;
        if (step + 1).is_multiple_of(self.sync_every) {
            recorder.record(EventKind::DpAllReduce, None, None, || {
                model.average_over_dp()
            })?;
        }
        Ok(Applied {
            skipped,
            staleness: vec![0],
            traffic: DpTraffic::default(),
        })
    }

    fn settle(&mut self, model: &mut RankModel) -> Result<(), RunError> {
        model.average_over_dp()
    }
}
