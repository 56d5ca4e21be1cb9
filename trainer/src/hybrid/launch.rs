//! Starting a mesh run: every rank as a thread on the local engine, or this process's rank
//! under `mpirun`; the layout is checked against the model before any rank starts work, and
//! the leader's summary (or every failing rank's account) comes back.

use std::path::Path;

use burn::tensor::Device;
use meshrec_comm::{Communicator, LocalCluster};
use meshrec_model::data::Dataset;
use meshrec_model::ModelConfig;
use meshrec_parallel::mesh::validate_layout;
use meshrec_pipeline::Mesh;

use crate::config::RunConfig;
use crate::error::RunError;
use crate::hybrid::rank::MeshRank;
use crate::metrics::Summary;
use crate::setup::{dataset_model_config, load_dataset, side_inputs};
use crate::stepper::Stepper;
use crate::train::{train_with, LoopHooks, NoHooks};

/// Checks the run's layout against the world size and the model (the schedule was checked
/// with the config): the errors every rank would meet alike, found once before any rank
/// starts.
pub fn check_layout(
    config: &RunConfig,
    model_config: &ModelConfig,
    world_size: usize,
) -> Result<(), RunError> {
    let p = &config.parallel;
    let mesh = Mesh::new(p.dp, p.tp, p.pp)?;
    Ok(validate_layout(
        &mesh,
        world_size,
        model_config,
        p.virtual_stages,
    )?)
}

/// The run's dataset and model config, with the layout checked against them and a world of
/// `[parallel]`'s size: what every way of starting a mesh does first.
pub fn prepare(config: &RunConfig) -> Result<(Dataset, ModelConfig), RunError> {
    let dataset = load_dataset(config)?;
    let model_config = dataset_model_config(config, &dataset)?;
    check_layout(config, &model_config, config.parallel.world_size())?;
    Ok((dataset, model_config))
}

/// Trains the whole mesh of `[parallel]` in this process, one thread per device on the
/// local engine; returns the leader's summary.
pub fn train_local(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Summary, RunError> {
    let (dataset, model_config) = prepare(config)?;
    let results = LocalCluster::run(config.parallel.world_size(), |comm| {
        in_rank_pool(config, || {
            rank_main(
                Box::new(comm),
                config,
                &dataset,
                &model_config,
                device,
                device_name,
                true,
                resume,
                &mut NoHooks,
            )
        })
    })
    .map_err(|e| RunError::Parallel(e.to_string()))?;
    leader_result(results)
}

/// Runs one rank of a local mesh in a rayon pool of its own (`cores / world` threads, at
/// least one): burn's CPU kernels split their work over rayon, and from a thread outside a
/// pool every kernel call would hand its work to the global pool the ranks share and sleep
/// until it is done — a wake-up per kernel, and ranks whose kernels wait on each other's.
/// Off with `parallel.rank_pools = false`.
pub fn in_rank_pool<T: Send>(config: &RunConfig, f: impl FnOnce() -> T + Send) -> T {
    if !config.parallel.rank_pools {
        return f();
    }
    let world = config.parallel.world_size();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match rayon::ThreadPoolBuilder::new()
        .num_threads((cores / world.max(1)).max(1))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// The leader's result of a mesh run on the local engine (the others return `None`); if any
/// rank failed, every failing rank's account: the first failure and what it did to the
/// others.
pub fn leader_result<T>(results: Vec<Result<Option<T>, RunError>>) -> Result<T, RunError> {
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
#[allow(clippy::too_many_arguments)]
pub fn rank_main(
    world: Box<dyn Communicator>,
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    device: &Device,
    device_name: &str,
    concurrent_comm: bool,
    resume: Option<&Path>,
    hooks: &mut dyn LoopHooks,
) -> Result<Option<Summary>, RunError> {
    let side = side_inputs(config, dataset, model_config, device)?;
    let mut rank = MeshRank::new(world, config, model_config, side, device, concurrent_comm)?;
    if rank.is_leader() {
        tracing::info!(
            layout = rank.describe(),
            comm = config.parallel.comm,
            "mesh of {} ranks",
            rank.world_size()
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
        hooks,
    )
}

/// This process's rank of a run launched by `mpirun -np N meshrec train --comm mpi`; world
/// rank 0 returns the summary. A layout every rank rejects alike is reported by world rank
/// 0 alone.
#[cfg(feature = "mpi")]
pub fn train_mpi(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Option<Summary>, RunError> {
    use crate::elastic::{health_file, Heartbeat, PhaseHooks, RankHealth};
    use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
    use meshrec_comm::Observed;
    use std::sync::Arc;
    let runtime = MpiRuntime::init().map_err(|e| RunError::Parallel(format!("MPI init: {e}")))?;
    let world = runtime.world(MpiConfig::default());
    let leader = world.rank() == 0;
    // Every rank meets these errors alike. World rank 0 prints the report, then all meet
    // at a barrier before any exits: a rank leaving first would have mpirun abort the job
    // before the report is out.
    let reported = |e: RunError| {
        if leader {
            eprintln!("Error: {e}");
        }
        let _ = meshrec_comm::Communicator::barrier(&world);
        RunError::ReportedByLeader
    };
    if world.size() != config.parallel.world_size() {
        return Err(reported(RunError::Parallel(format!(
            "mpirun started {} processes but [parallel] dp {} × tp {} × pp {} needs {}",
            world.size(),
            config.parallel.dp,
            config.parallel.tp,
            config.parallel.pp,
            config.parallel.world_size()
        ))));
    }
    let dataset = load_dataset(config).map_err(reported)?;
    let model_config = dataset_model_config(config, &dataset).map_err(reported)?;
    check_layout(config, &model_config, world.size()).map_err(reported)?;
    // Under `meshrec launch`, every rank reports its heartbeat and progress to a file the
    // supervisor reads.
    let watched = std::env::var_os(crate::elastic::HEALTH_DIR_ENV).map(|dir| {
        let health = RankHealth::new(world.rank(), config.elastic.budgets());
        let file = health_file(std::path::Path::new(&dir), world.rank());
        let beat = Heartbeat::start(
            Arc::clone(&health),
            config.elastic.beat_interval(),
            Some(file),
        );
        (health, beat)
    });
    let concurrent = runtime.concurrent_threads();
    let (world, mut hooks): (Box<dyn Communicator>, Box<dyn LoopHooks>) = match &watched {
        Some((health, _)) => (
            Box::new(Observed::new(Box::new(world), Arc::clone(health) as _)),
            Box::new(PhaseHooks(Arc::clone(health))),
        ),
        None => (Box::new(world), Box::new(NoHooks)),
    };
    rank_main(
        world,
        config,
        &dataset,
        &model_config,
        device,
        device_name,
        concurrent,
        resume,
        hooks.as_mut(),
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
