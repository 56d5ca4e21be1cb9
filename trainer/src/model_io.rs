//! The best model as a file and as a ranker: a serving checkpoint (safetensors with the
//! metadata `meshrec serve` needs) written atomically and read back into a model of the same
//! shape, and full-ranking evaluation of a model on a split.

use std::path::Path;

use burn::tensor::Device;
use meshrec_model::checkpoint::{self, CheckpointMeta, UserHistories};
use meshrec_model::data::EvalSet;
use meshrec_model::metrics::RankingMetrics;
use meshrec_model::step::evaluate_batch;
use meshrec_model::Recommender;

use crate::error::RunError;

/// Full-ranking metrics of a model on one split.
pub fn evaluate(
    model: &Recommender,
    set: &EvalSet,
    batch_size: usize,
    device: &Device,
) -> RankingMetrics {
    let mut metrics = RankingMetrics::default();
    for batch in set.batches(batch_size) {
        evaluate_batch(model, &batch, device, &mut metrics);
    }
    metrics
}

/// Writes the model as a serving checkpoint (`meshrec_model::checkpoint`): its weights,
/// the metadata that rebuilds and serves it without a training config (model config, block
/// shapes, item id map), and with `users` the users sidecar beside it. Atomic.
pub fn save_checkpoint(
    model: &Recommender,
    path: &Path,
    meta: &CheckpointMeta,
    users: Option<&UserHistories>,
) -> Result<(), RunError> {
    checkpoint::save(model, meta, users, path).map_err(|e| checkpoint_error(path, e))
}

fn checkpoint_error(path: &Path, e: meshrec_model::CheckpointError) -> RunError {
    RunError::Checkpoint {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Loads weights saved by [`save_checkpoint`] into a model of the same shape.
pub fn load_checkpoint(model: &mut Recommender, path: &Path) -> Result<(), RunError> {
    checkpoint::load_weights(model, path).map_err(|e| checkpoint_error(path, e))
}
