//! What a run is built from: the dataset a config names, the model config it implies, the
//! seeded model, the optimizer settings and the keyed random streams.

use std::path::Path;

use burn::tensor::Device;
use meshrec_model::data::Dataset;
use meshrec_model::optim::AdamWConfig;
use meshrec_model::params::init_normal;
use meshrec_model::{ModelConfig, Recommender};

use crate::config::RunConfig;
use crate::error::RunError;

/// Loads the dataset a config names.
pub fn load_dataset(config: &RunConfig) -> Result<Dataset, RunError> {
    if config.data.path == "synthetic" {
        return Ok(config.data.synthetic.dataset()?);
    }
    Ok(Dataset::load(Path::new(&config.data.path))?)
}

/// The model config of a run on a dataset (catalogue size and genres come from the data).
pub fn dataset_model_config(
    config: &RunConfig,
    dataset: &Dataset,
) -> Result<ModelConfig, RunError> {
    let genres = dataset.features.as_ref().map(|f| f.num_genres);
    Ok(config.model_config(dataset.num_items, genres)?)
}

/// The items' genres, when the dataset has them (the model's side-feature tokens).
pub fn item_genres(dataset: &Dataset) -> Option<Vec<Vec<u32>>> {
    dataset.features.as_ref().map(|f| f.item_genres.clone())
}

/// Builds and seeds the model for a dataset.
pub fn build_model(
    config: &RunConfig,
    dataset: &Dataset,
    device: &Device,
) -> Result<(ModelConfig, Recommender), RunError> {
    let model_config = dataset_model_config(config, dataset)?;
    let genres = dataset.features.as_ref();
    let model = Recommender::new(
        &model_config,
        genres.map(|f| f.item_genres.as_slice()),
        device,
    );
    let model = init_normal(
        model,
        config.train.seed,
        model_config.init_std,
        model_config.n_layers,
        device,
    );
    Ok((model_config, model))
}

/// The AdamW settings of `[train]`.
pub fn adamw_config(config: &RunConfig) -> AdamWConfig {
    let t = &config.train;
    AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    }
}

/// The dropout stream of `step`: reproducible and resumable.
pub fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed ^ step.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
