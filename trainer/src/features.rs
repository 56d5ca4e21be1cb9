//! `[features]`: what is fused into the item table (issue 15) — pre-trained text vectors of
//! the items, the user–item graph — and what the rest of a config must allow for it
//! (`setup` builds the inputs from a dataset).

use std::path::{Path, PathBuf};

use meshrec_model::data::{Dataset, Relation};
use serde::{Deserialize, Serialize};

/// `[features]`, every field defaulted (nothing fused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesSection {
    /// Add a learned projection of each item's sentence vector (title, year, genres) to its
    /// ID embedding.
    pub text: bool,
    /// Propagate the item rows over the heterogeneous graph of the training split.
    pub graph: bool,
    /// Propagation layers (LightGCN's K).
    pub graph_layers: usize,
    /// Relations besides user–item: `item_genre`, `user_attribute`.
    pub graph_relations: Vec<Relation>,
    /// The sentence encoder's folder (`cargo xtask data minilm` fills the default).
    pub text_model: String,
    /// Where the encoded item texts are cached ("": beside the data, named after the
    /// dataset and the encoder).
    pub text_cache: String,
}

impl Default for FeaturesSection {
    fn default() -> Self {
        Self {
            text: false,
            graph: false,
            graph_layers: 2,
            graph_relations: Relation::ALL.to_vec(),
            text_model: "data/minilm".into(),
            text_cache: String::new(),
        }
    }
}

/// What the rest of the config must allow for fusion.
pub struct FusionNeeds {
    pub tp: usize,
}

impl FeaturesSection {
    pub fn is_active(&self) -> bool {
        self.text || self.graph
    }

    fn first_key(&self) -> &'static str {
        if self.text {
            "features.text"
        } else {
            "features.graph"
        }
    }

    /// Refusals, each as `(key, why)`.
    pub fn check(&self, needs: &FusionNeeds) -> Result<(), (&'static str, String)> {
        if self.graph && self.graph_layers == 0 {
            return Err(("features.graph_layers", "must be at least 1".into()));
        }
        if !self.is_active() {
            return Ok(());
        }
        if needs.tp > 1 {
            return Err((
                self.first_key(),
                format!(
                    "fusion needs the whole item table on a rank (the graph mixes every item \
                     with every user; the text projection is added to every row), but \
                     parallel.tp = {} splits it over a vocabulary-parallel group: use tp = 1",
                    needs.tp
                ),
            ));
        }
        Ok(())
    }

    /// The relations the graph is built with (user–item always).
    pub fn relations(&self) -> Vec<Relation> {
        let mut r = vec![Relation::UserItem];
        r.extend(
            self.graph_relations
                .iter()
                .filter(|r| **r != Relation::UserItem),
        );
        r
    }

    pub fn cache_path(&self, data_path: &str, dataset: &Dataset) -> PathBuf {
        if !self.text_cache.is_empty() {
            return PathBuf::from(&self.text_cache);
        }
        let data = Path::new(data_path);
        let dir = if data.is_dir() {
            data
        } else {
            data.parent().unwrap_or(Path::new("."))
        };
        let model = Path::new(&self.text_model)
            .file_name()
            .map_or("text".into(), |n| n.to_string_lossy().into_owned());
        dir.join(format!("{}.{model}.textcache", dataset.name))
    }
}
