//! The run configuration as the cluster simulator sees it: `meshrec simulate` and the
//! simulator's validation against measured steps. Everything the simulator returns is
//! **simulated** (modelled), and its reports say so.

use meshrec_balance::report::SimSpec;
use meshrec_balance::{CostProfile, ModelShape};
use meshrec_model::ModelConfig;
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::Mesh;

use crate::config::RunConfig;
use crate::run::RunError;

/// The simulator's description of `config`'s run of `model` on the `cluster` preset, with
/// the trainer's own stage partition (not the partitioner's) so that prediction and
/// measurement run the same layout.
pub fn sim_spec(
    config: &RunConfig,
    model: &ModelConfig,
    cluster: &str,
    profile: Option<CostProfile>,
) -> Result<SimSpec, RunError> {
    let p = &config.parallel;
    let shape: ModelShape = model.shape(&config.model.preset);
    let mut spec = SimSpec::new(shape, cluster, p.dp, p.tp, p.pp, config.train.batch_size);
    spec.micro_batches = p.micro_batches;
    spec.schedule = p.schedule.clone();
    spec.virtual_stages = p.virtual_stages;
    spec.dp_mode = config.dp.mode.clone();
    spec.max_staleness = config.dp.max_staleness;
    spec.sync_every = config.dp.sync_every;
    let c = &config.compress;
    spec.compressor = match c.method.as_str() {
        "none" => "identity".into(),
        m => m.into(),
    };
    spec.compressor_param = match c.method.as_str() {
        "qsgd" => f64::from(c.levels),
        "powersgd" => c.rank as f64,
        _ => c.ratio,
    };
    spec.bucket_mb = config.dp.bucket_mb * 1.048_576;
    let mesh = Mesh::new(p.dp, p.tp, p.pp).map_err(|e| RunError::Parallel(e.to_string()))?;
    let layout = Layout::uniform(mesh, p.virtual_stages, model.n_layers)
        .map_err(|e| RunError::Parallel(e.to_string()))?;
    spec.blocks_per_stage = Some(layout.partition);
    spec.balance = false;
    spec.profile = profile;
    Ok(spec)
}
