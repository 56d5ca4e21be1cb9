//! What a run is built from: the dataset a config names, the model config it implies, the
//! seeded model, the optimizer settings and the keyed random streams.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use meshrec_model::data::{Dataset, InteractionGraph};
use meshrec_model::fusion::FusionShape;
use meshrec_model::optim::AdamWConfig;
use meshrec_model::params::init_normal;
use meshrec_model::{ModelConfig, Recommender, SideInputs, TextFeatures};

use crate::config::{invalid, FeaturesSection, RunConfig};
use crate::error::RunError;

/// Loads the dataset a config names.
pub fn load_dataset(config: &RunConfig) -> Result<Dataset, RunError> {
    if config.data.path == "synthetic" {
        return Ok(config.data.synthetic.dataset()?);
    }
    Ok(Dataset::load(Path::new(&config.data.path))?)
}

/// The model config of a run on a dataset (catalogue size, genres and the fusion's shape
/// come from the data).
pub fn dataset_model_config(
    config: &RunConfig,
    dataset: &Dataset,
) -> Result<ModelConfig, RunError> {
    let genres = dataset.features.as_ref().map(|f| f.num_genres);
    let mut model = config.model_config(dataset.num_items, genres)?;
    if config.features.is_active() {
        model.fusion = fusion_shape(&config.features, dataset)?;
        model.validate().map_err(|e| invalid(e.key, e.message))?;
    }
    Ok(model)
}

/// The fusion part of the model's shape over `dataset`, known without encoding anything
/// (the encoder's width from its `config.json`, the graph's node counts from building it).
fn fusion_shape(features: &FeaturesSection, dataset: &Dataset) -> Result<FusionShape, RunError> {
    let text_dim = if features.text {
        let path = Path::new(&features.text_model).join("config.json");
        if !path.is_file() {
            return Err(invalid(
                "features.text_model",
                format!(
                    "{}: no sentence encoder there; run `cargo xtask data minilm`",
                    path.display()
                ),
            )
            .into());
        }
        let bert = meshrec_text::BertConfig::read(&path)
            .map_err(|e| invalid("features.text_model", e.to_string()))?;
        Some(bert.hidden_size)
    } else {
        None
    };
    let mut side = SideInputs::default();
    if features.graph {
        side.graph = Some(Arc::new(InteractionGraph::build(
            dataset,
            &features.relations(),
        )?));
    }
    Ok(FusionShape {
        text_dim,
        graph: side.fusion_shape(features.graph_layers).graph,
    })
}

/// The text vectors of every item row (row 0, padding, zeros), encoded once and cached.
fn text_features(
    features: &FeaturesSection,
    data_path: &str,
    dataset: &Dataset,
    device: &Device,
) -> Result<TextFeatures, RunError> {
    let side = dataset.side.items.as_ref().ok_or_else(|| {
        invalid(
            "features.text",
            format!(
                "the item texts come from the item side file (title, year, genres), which \
                 dataset `{}` at {data_path} lacks; for ml-100k run `cargo xtask data ml-100k`",
                dataset.name
            ),
        )
    })?;
    let texts: Vec<String> = side.complete()?.iter().map(|i| i.text()).collect();
    let model = Path::new(&features.text_model);
    let cache = features.cache_path(data_path, dataset);
    let table = meshrec_text::encode_cached(model, &texts, &cache, device)
        .map_err(|e| invalid("features.text_model", e.to_string()))?;
    let mut values = vec![0.0f32; table.dim];
    values.extend_from_slice(&table.values);
    Ok(TextFeatures {
        dim: table.dim,
        values,
    })
}

/// The constant inputs of the run's model (genre lists; the fused text vectors and graph),
/// checked against the model config's fusion shape. Text encoding runs on `device` without
/// autodiff, once: the vectors are cached beside the data.
pub fn side_inputs(
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    device: &Device,
) -> Result<SideInputs, RunError> {
    let features = &config.features;
    let mut side = SideInputs::genres(dataset.features.as_ref().map(|f| f.item_genres.clone()));
    if features.text {
        side.text = Some(Arc::new(text_features(
            features,
            &config.data.path,
            dataset,
            device,
        )?));
    }
    if features.graph {
        side.graph = Some(Arc::new(InteractionGraph::build(
            dataset,
            &features.relations(),
        )?));
    }
    let expected = &model_config.fusion;
    let got = side.fusion_shape(expected.graph.map_or(0, |g| g.layers));
    if got != *expected {
        return Err(invalid(
            "features",
            format!("the side inputs give the fusion {got:?}, the model expects {expected:?}"),
        )
        .into());
    }
    Ok(side)
}

/// Builds and seeds the model for a dataset.
pub fn build_model(
    config: &RunConfig,
    dataset: &Dataset,
    device: &Device,
) -> Result<(ModelConfig, Recommender), RunError> {
    let model_config = dataset_model_config(config, dataset)?;
    let side = side_inputs(config, dataset, &model_config, device)?;
    let model = Recommender::new(&model_config, &side, device);
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
        freeze_variance_after: (t.freeze_variance_after > 0).then_some(t.freeze_variance_after),
    }
}

/// The dropout stream of `step`: reproducible and resumable.
pub fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed ^ step.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
