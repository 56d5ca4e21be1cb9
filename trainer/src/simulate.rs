//! The run configuration as the cluster simulator sees it: `meshrec simulate` and the
//! simulator's validation against measured steps. Everything the simulator returns is
//! **simulated** (modelled), and its reports say so.

use meshrec_balance::report::SimSpec;
use meshrec_balance::{CostProfile, ModelShape};
use meshrec_model::ModelConfig;
use meshrec_parallel::layout::Layout;
use meshrec_pipeline::Mesh;

use crate::config::RunConfig;
use crate::error::RunError;

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
    let mesh = Mesh::new(p.dp, p.tp, p.pp)?;
    let mut spec = SimSpec::new(shape, cluster, mesh, config.train.batch_size);
    spec.micro_batches = p.micro_batches;
    spec.schedule = p.schedule_spec()?;
    spec.dp_mode = config.dp.mode()?;
    spec.compressor = config.compress.method_config()?;
    // `dp.bucket_mb` is MiB, the simulator's MB.
    spec.bucket_mb = config.dp.bucket_mb * 1.048_576;
    let layout = Layout::uniform(mesh, p.virtual_stages, model.n_layers)?;
    spec.blocks_per_stage = Some(layout.partition);
    spec.balance = false;
    spec.profile = profile;
    spec.zero = config.dp.zero_stage()?;
    spec.activations = meshrec_balance::ActivationPolicy {
        recompute: config.train.recompute()?,
        sequence_parallel: p.sequence_parallel,
    };
    Ok(spec)
}
