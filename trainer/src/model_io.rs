//! The best model as a file and as a ranker: safetensors written atomically and read back
//! into a model of the same shape, and full-ranking evaluation of a model on a split.

use std::path::Path;

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
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

/// Writes the module's weights as safetensors, atomically (temp file, fsync, rename).
pub fn save_checkpoint(model: &Recommender, path: &Path) -> Result<(), RunError> {
    let tmp = path.with_extension("safetensors.tmp");
    let mut store = SafetensorsStore::from_file(tmp.clone());
    model
        .save_into(&mut store)
        .map_err(|e| RunError::Checkpoint {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
    let file = std::fs::File::open(&tmp).map_err(|e| RunError::io(&tmp, e))?;
    file.sync_all().map_err(|e| RunError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| RunError::io(path, e))
}

/// Loads weights saved by [`save_checkpoint`] into a model of the same shape.
pub fn load_checkpoint(model: &mut Recommender, path: &Path) -> Result<(), RunError> {
    if !path.is_file() {
        return Err(RunError::Checkpoint {
            path: path.into(),
            message: "no such file".into(),
        });
    }
    let mut store = SafetensorsStore::from_file(path.to_path_buf());
    let result = model
        .load_from(&mut store)
        .map_err(|e| RunError::Checkpoint {
            path: path.into(),
            message: e.to_string(),
        })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(RunError::Checkpoint {
            path: path.into(),
            message: format!(
                "does not match the model: errors {:?}, missing {:?}",
                result.errors, result.missing
            ),
        });
    }
    Ok(())
}
