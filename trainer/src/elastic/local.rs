//! An elastic run on the local engine: every rank a thread of this process, as
//! `hybrid::train_local` runs them, but a rank's failure (an error, a panic, a hang the
//! watchdog finds) no longer ends the run. Its replica leaves, the survivors meet at the
//! [`Membership`]'s rendezvous, roll back the partial step where they applied it, rebuild
//! their groups on a new world of the remaining replicas and continue from memory with the
//! global batch re-split. A replica joins at `elastic.join_step`: new threads take their
//! DP peers' state. No process restarts.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::Device;
use meshrec_comm::{Communicator, LocalCluster, LocalCommunicator, LocalConfig, Observed};
use meshrec_model::data::Dataset;
use meshrec_model::ModelConfig;
use meshrec_pipeline::Mesh;

use crate::checkpoint::Progress;
use crate::checkpoint_policy::CheckpointPolicy;
use crate::config::RunConfig;
use crate::elastic::health::{Heartbeat, PhaseHooks, RankHealth};
use crate::elastic::membership::{Arrival, Arrived, Assignment, Membership, Settings};
use crate::elastic::phase::Phase;
use crate::elastic::watchdog::{watch, StopOnDrop};
use crate::error::RunError;
use crate::faults::{ConfigFaults, FaultWitness, NoFaults};
use crate::hybrid::launch::{in_rank_pool, prepare};
use crate::hybrid::rank::MeshRank;
use crate::metrics::Summary;
use crate::setup::side_inputs;
use crate::stepper::Stepper;
use crate::train::{run_loop, LoopEnd, LoopHooks, LoopInputs, RunTotals};

/// How one rank thread of an elastic run ended.
enum MemberEnd {
    /// The run finished; the leader has the summary.
    Finished(Option<Box<Summary>>),
    /// Its replica left the run.
    Left(String),
}

/// The loop's hooks in an elastic rank: phases go to the rank's health, and the loop stops
/// at the join step once.
struct ElasticHooks {
    phases: PhaseHooks,
    join_step: Option<u64>,
}

impl LoopHooks for ElasticHooks {
    fn phase(&mut self, phase: Phase, step: u64) {
        self.phases.phase(phase, step);
    }

    fn regroup_before(&mut self, step: u64) -> bool {
        if self.join_step == Some(step) {
            self.join_step = None;
            return true;
        }
        false
    }
}

/// What every rank thread shares.
struct Shared<'a> {
    config: &'a RunConfig,
    dataset: &'a Dataset,
    model_config: &'a ModelConfig,
    device: &'a Device,
    device_name: &'a str,
    membership: &'a Membership,
    active: &'a AtomicUsize,
}

/// Trains `[parallel]`'s mesh elastically in this process; returns the leader's summary,
/// with the membership changes.
pub fn train_elastic_local(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Summary, RunError> {
    let (dataset, model_config) = prepare(config)?;
    let p = &config.parallel;
    let mesh = Mesh::new(p.dp, p.tp, p.pp)?;
    let local = LocalConfig::default();
    let comms = LocalCluster::with_config(p.world_size(), local.clone())
        .map_err(|e| RunError::Parallel(e.to_string()))?
        .into_communicators();
    let abort = comms
        .first()
        .map(LocalCommunicator::abort_handle)
        .ok_or_else(|| RunError::Parallel("an empty mesh".into()))?;
    let (joiners_tx, joiners) = crossbeam_channel::unbounded();
    let e = &config.elastic;
    let timeout = Duration::from_secs_f64(e.timeout_s);
    let membership = Membership::new(
        mesh,
        abort,
        Settings {
            timeout,
            min_dp: e.min_dp,
            max_dp: e.max_dp_for(p.dp),
            local,
        },
        joiners_tx,
    );
    let active = AtomicUsize::new(comms.len());
    let shared = Shared {
        config,
        dataset: &dataset,
        model_config: &model_config,
        device,
        device_name,
        membership: &membership,
        active: &active,
    };
    let ends: Mutex<Vec<Result<MemberEnd, RunError>>> = Mutex::new(Vec::new());
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let _stop_watchdog = StopOnDrop(Arc::clone(&stop));
        let (shared, ends) = (&shared, &ends);
        let flag = Arc::clone(&stop);
        s.spawn(move || watch(shared.membership, timeout, &flag));
        for comm in comms {
            let comm = Box::new(comm);
            s.spawn(move || {
                let end = in_rank_pool(config, || member(shared, Start::First { comm, resume }));
                record(ends, shared, end)
            });
        }
        // Joining replicas' ranks get threads as the membership admits them.
        while active.load(Ordering::Acquire) > 0 {
            if let Ok(a) = joiners.recv_timeout(Duration::from_millis(20)) {
                active.fetch_add(1, Ordering::AcqRel);
                s.spawn(move || {
                    let end = in_rank_pool(config, || member(shared, Start::Join(Box::new(a))));
                    record(ends, shared, end)
                });
            }
        }
    });
    let events = membership.events();
    let mut left = Vec::new();
    let mut errors = Vec::new();
    let mut summary = None;
    for end in ends.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match end {
            Ok(MemberEnd::Finished(Some(s))) => summary = Some(*s),
            Ok(MemberEnd::Finished(None)) => {}
            Ok(MemberEnd::Left(why)) => left.push(why),
            Err(e) => errors.push(e.to_string()),
        }
    }
    match summary {
        Some(mut s) if errors.is_empty() => {
            s.membership = events;
            crate::metrics::write_summary(&config.run_dir(), &s)?;
            Ok(s)
        }
        _ => {
            errors.sort();
            errors.dedup();
            let why = if errors.is_empty() { left } else { errors };
            Err(RunError::Parallel(why.join("; ")))
        }
    }
}

fn record(
    ends: &Mutex<Vec<Result<MemberEnd, RunError>>>,
    shared: &Shared<'_>,
    end: Result<MemberEnd, RunError>,
) {
    ends.lock().unwrap_or_else(|e| e.into_inner()).push(end);
    shared.active.fetch_sub(1, Ordering::AcqRel);
}

/// How a rank thread starts.
enum Start<'a> {
    First {
        comm: Box<LocalCommunicator>,
        resume: Option<&'a Path>,
    },
    Join(Box<Assignment>),
}

/// The run's config with the DP size of a new membership.
fn with_dp(config: &RunConfig, dp: usize) -> RunConfig {
    let mut c = config.clone();
    c.parallel.dp = dp;
    c
}

fn observed(comm: LocalCommunicator, health: &Arc<RankHealth>) -> Box<dyn Communicator> {
    Box::new(Observed::new(Box::new(comm), Arc::clone(health) as _))
}

/// One rank thread, through every membership it belongs to.
fn member(shared: &Shared<'_>, start: Start<'_>) -> Result<MemberEnd, RunError> {
    let Shared {
        config,
        dataset,
        model_config,
        device,
        device_name,
        membership,
        ..
    } = *shared;
    let side = side_inputs(config, dataset, model_config, device)?;
    let (comm, mut generation, mut config_now, joining) = match start {
        Start::First { comm, resume } => (*comm, 0, config.clone(), Err(resume)),
        Start::Join(a) => {
            let a = *a;
            let c = with_dp(config, a.mesh.dp);
            (a.comm, a.generation, c, Ok((a.progress, a.partition)))
        }
    };
    let world_rank = comm.world_rank();
    let health = RankHealth::new(world_rank, config.elastic.budgets());
    let _heartbeat = Heartbeat::start(Arc::clone(&health), config.elastic.beat_interval(), None);
    let _exited = ExitMark(Arc::clone(&health));
    let witness = FaultWitness::default();
    membership.enlist(generation, world_rank, Arc::clone(&health), witness.clone());
    let mut rank = MeshRank::new(
        observed(comm, &health),
        &config_now,
        model_config,
        side.clone(),
        device,
        true,
    )?;
    let mut metrics_from = None;
    let mut progress = match joining {
        Ok((progress, partition)) => {
            rank = rank.with_faults(Box::new(NoFaults)).join(partition)?;
            metrics_from = Some(progress.step);
            progress
        }
        Err(resume) => {
            rank = rank.with_faults(Box::new(
                ConfigFaults::new(&config.fault, world_rank, false).witnessed(witness.clone()),
            ));
            match resume {
                Some(path) => {
                    let p = CheckpointPolicy::new(config)?.resume(path, config, &mut rank)?;
                    metrics_from = Some(p.step);
                    p
                }
                None => Progress::default(),
            }
        }
    };
    let mut totals = RunTotals::default();
    let mut hooks = ElasticHooks {
        phases: PhaseHooks(Arc::clone(&health)),
        join_step: config
            .elastic
            .join_step
            .filter(|s| *s >= progress.step && generation == 0),
    };
    loop {
        let inputs = LoopInputs {
            config: &config_now,
            dataset,
            model_config,
            device,
            device_name,
        };
        let me = rank.world_rank();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            run_loop(
                &inputs,
                &mut rank,
                &mut progress,
                &mut totals,
                metrics_from,
                &mut hooks,
            )
        }));
        match ran {
            Ok(Ok(LoopEnd::Finished(summary))) => return Ok(MemberEnd::Finished(summary)),
            Ok(Ok(LoopEnd::Regroup)) => membership.request_join(generation),
            Ok(Err(e)) => {
                if let Some(why) = membership.fail(generation, me, &e.to_string()) {
                    return Ok(MemberEnd::Left(why));
                }
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                membership.fail(generation, me, &format!("panicked: {message}"));
                return Ok(MemberEnd::Left(format!(
                    "world rank {me} panicked: {message}"
                )));
            }
        }
        health.enter(Phase::Rendezvous, progress.step);
        let arrival = Arrival {
            progress: progress.clone(),
            applied: rank.applied(),
            partition: rank.partition(),
        };
        meshrec_comm::WaitProbe::enter(health.as_ref());
        let arrived = membership.arrive(generation, me, arrival);
        meshrec_comm::WaitProbe::leave(health.as_ref());
        let a = match arrived {
            Arrived::Continue(a) => *a,
            Arrived::Leave(why) => return Ok(MemberEnd::Left(why)),
            Arrived::Stop(why) => return Err(RunError::Parallel(why)),
        };
        rank.roll_back_to(a.applied)?;
        progress = a.progress;
        generation = a.generation;
        config_now = with_dp(config, a.mesh.dp);
        health.set_world_rank(a.world_rank);
        membership.enlist(
            generation,
            a.world_rank,
            Arc::clone(&health),
            witness.clone(),
        );
        let world = observed(a.comm, &health);
        // A rank that cannot take its place says so, so that the others do not wait for it.
        let taken = rank
            .regroup(world, &config_now, Box::new(NoFaults))
            .and_then(|mut r| {
                if a.joined {
                    r.share_state()?;
                }
                Ok(r)
            });
        rank = match taken {
            Ok(r) => r,
            Err(e) => {
                let why = format!("could not take its place in the new membership: {e}");
                membership.fail(generation, a.world_rank, &why);
                return Ok(MemberEnd::Left(format!(
                    "world rank {}: {why}",
                    a.world_rank
                )));
            }
        };
        metrics_from = Some(progress.step);
        if let Some(why) = a.below_min {
            health.enter(Phase::Checkpoint, progress.step);
            CheckpointPolicy::new(&config_now)?.save(&mut rank, &progress)?;
            return Err(RunError::Parallel(format!(
                "{why}; the training state at step {} is saved in {}",
                progress.step,
                config.run_dir().join("checkpoints").display()
            )));
        }
        if rank.is_leader() {
            membership.resumed(generation);
        }
    }
}

/// Marks the rank's health exited when its thread ends, however it ends.
struct ExitMark(Arc<RankHealth>);

impl Drop for ExitMark {
    fn drop(&mut self) {
        self.0.mark_exited();
    }
}
