//! Text and graph fused into the item table: each item starts from its ID embedding plus a
//! learned projection of its pre-trained text vector, then LightGCN-style propagation over
//! the heterogeneous user–item graph (normalised per relation, messages of a node's relations
//! averaged, layers averaged) gives the representation that both the input lookup and the
//! tied output head use. Trained end to end with the rest of the model.
//!
//! The relation matrices are held dense (`users × items` and the small attribute blocks): for
//! MovieLens-100K that is 6 MB per direction and the propagation is a few matrix products per
//! step; a catalogue of 10⁵ items would need a sparse kernel (`FusionShape::check` refuses
//! graphs over [`MAX_DENSE_GRAPH_CELLS`]).

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::{Bipartite, InteractionGraph};
use crate::error::ConfigError;
use crate::transfer::upload;

/// The largest `users × items` a dense propagation matrix may have (256 MB of f32 per
/// direction).
pub const MAX_DENSE_GRAPH_CELLS: usize = 64 << 20;

/// Pre-trained text vectors of the item rows: `vocab × dim`, row 0 (padding) zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFeatures {
    pub dim: usize,
    pub values: Vec<f32>,
}

/// Constant inputs a model is built over besides its parameters: genre lists of the genre
/// side-feature, and the fusion's text vectors and graph.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SideInputs {
    pub item_genres: Option<Vec<Vec<u32>>>,
    pub text: Option<Arc<TextFeatures>>,
    pub graph: Option<Arc<InteractionGraph>>,
}

impl SideInputs {
    /// Genre lists alone (the side-feature of the earlier issues).
    pub fn genres(item_genres: Option<Vec<Vec<u32>>>) -> Self {
        Self {
            item_genres,
            ..Self::default()
        }
    }

    pub fn item_genres(&self) -> Option<&[Vec<u32>]> {
        self.item_genres.as_deref()
    }

    /// The fusion shape these inputs give a model with `layers` propagation layers.
    pub fn fusion_shape(&self, layers: usize) -> FusionShape {
        FusionShape {
            text_dim: self.text.as_ref().map(|t| t.dim),
            graph: self.graph.as_ref().map(|g| GraphShape {
                users: g.num_users,
                genres: g.item_genre.as_ref().map_or(0, |b| b.right),
                attributes: g.user_attribute.as_ref().map_or(0, |b| b.right),
                layers,
            }),
        }
    }
}

/// The graph part of a model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphShape {
    pub users: usize,
    /// Genre nodes (0 without the item–genre relation).
    pub genres: usize,
    /// User-attribute nodes (0 without the user–attribute relation).
    pub attributes: usize,
    /// Propagation layers (LightGCN's `K`).
    pub layers: usize,
}

/// What the fusion adds to a model: the text vectors' width and the graph's node counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusionShape {
    pub text_dim: Option<usize>,
    pub graph: Option<GraphShape>,
}

impl FusionShape {
    pub fn is_active(&self) -> bool {
        self.text_dim.is_some() || self.graph.is_some()
    }

    /// Parameters the fusion adds with `d` model width.
    pub fn params(&self, d: usize) -> u64 {
        let text = self.text_dim.unwrap_or(0) * d;
        let graph = self
            .graph
            .map_or(0, |g| (g.users + g.genres + g.attributes) * d);
        (text + graph) as u64
    }

    pub fn check(&self, vocab: usize) -> Result<(), ConfigError> {
        if self.text_dim == Some(0) {
            return Err(ConfigError::new(
                "features.text",
                "the text vectors are empty",
            ));
        }
        if let Some(g) = self.graph {
            if g.layers == 0 {
                return Err(ConfigError::new(
                    "features.graph_layers",
                    "must be at least 1",
                ));
            }
            if g.users.saturating_mul(vocab) > MAX_DENSE_GRAPH_CELLS {
                return Err(ConfigError::new(
                    "features.graph",
                    format!(
                        "{} users × {vocab} items is beyond the dense propagation's {} cells",
                        g.users, MAX_DENSE_GRAPH_CELLS
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The text vectors (a constant) and their learned projection to the model width.
#[derive(Module, Debug)]
pub struct TextProjection {
    pub proj: Linear,
    pub features: Tensor<2>,
}

/// One relation's normalised adjacency in both directions (constants).
#[derive(Module, Debug)]
pub struct RelationPair {
    /// `left × right`.
    pub forward: Tensor<2>,
    /// `right × left`.
    pub backward: Tensor<2>,
}

impl RelationPair {
    fn new(b: &Bipartite, device: &Device) -> Self {
        let m = b.normalised_dense();
        let forward: Tensor<2> = upload(TensorData::new(m, [b.left, b.right]), device);
        let backward = forward.clone().transpose();
        Self { forward, backward }
    }
}

/// LightGCN-style propagation over users, items, genres and user attributes.
#[derive(Module, Debug)]
pub struct GraphPropagation {
    /// `[users, d]`.
    pub users: Embedding,
    /// `[genres + attributes, d]`, genres first; absent when neither relation is there.
    pub attributes: Option<Embedding>,
    /// Users × items.
    pub user_item: RelationPair,
    /// Items × genres.
    pub item_genre: Option<RelationPair>,
    /// Users × attributes.
    pub user_attribute: Option<RelationPair>,
    #[module(skip)]
    pub genres: usize,
    #[module(skip)]
    pub layers: usize,
}

fn mean(mut messages: Vec<Tensor<2>>) -> Tensor<2> {
    let n = messages.len();
    let first = messages.remove(0);
    let sum = messages.into_iter().fold(first, |acc, m| acc + m);
    if n == 1 {
        sum
    } else {
        sum / n as f64
    }
}

impl GraphPropagation {
    /// The item rows after `layers` steps, averaged over layers 0..=K as LightGCN does.
    pub fn propagate(&self, items0: Tensor<2>) -> Tensor<2> {
        let mut items = items0.clone();
        let mut users = self.users.weight.val();
        let mut attributes = self.attributes.as_ref().map(|a| a.weight.val());
        let mut total = items0;
        for _ in 0..self.layers {
            let mut item_msgs = vec![self.user_item.backward.clone().matmul(users.clone())];
            let mut user_msgs = vec![self.user_item.forward.clone().matmul(items.clone())];
            let mut next_attributes = Vec::new();
            if let (Some(rel), Some(attrs)) = (&self.item_genre, &attributes) {
                let genres = attrs.clone().narrow(0, 0, self.genres);
                item_msgs.push(rel.forward.clone().matmul(genres));
                next_attributes.push(rel.backward.clone().matmul(items.clone()));
            }
            if let (Some(rel), Some(attrs)) = (&self.user_attribute, &attributes) {
                let rows = attrs.dims()[0] - self.genres;
                let user_attrs = attrs.clone().narrow(0, self.genres, rows);
                user_msgs.push(rel.forward.clone().matmul(user_attrs));
                next_attributes.push(rel.backward.clone().matmul(users.clone()));
            }
            items = mean(item_msgs);
            users = mean(user_msgs);
            if !next_attributes.is_empty() {
                attributes = Some(Tensor::cat(next_attributes, 0));
            }
            total = total + items.clone();
        }
        total / (self.layers + 1) as f64
    }
}

/// Text projection and graph propagation on the full item table.
#[derive(Module, Debug)]
pub struct Fusion {
    pub text: Option<TextProjection>,
    pub graph: Option<GraphPropagation>,
}

impl Fusion {
    /// The fusion of `shape` over `side`'s constants, or `None` when the shape has neither
    /// part (or the inputs lack what it names: callers check [`SideInputs::fusion_shape`]
    /// against the config first).
    pub fn new(shape: &FusionShape, side: &SideInputs, d: usize, device: &Device) -> Option<Self> {
        let text = match (shape.text_dim, &side.text) {
            (Some(dim), Some(t)) if t.dim == dim => {
                let rows = t.values.len() / dim;
                Some(TextProjection {
                    proj: LinearConfig::new(dim, d).with_bias(false).init(device),
                    features: upload(TensorData::new(t.values.clone(), [rows, dim]), device),
                })
            }
            _ => None,
        };
        let graph = match (shape.graph, &side.graph) {
            (Some(g), Some(graph)) => {
                let nodes = g.genres + g.attributes;
                Some(GraphPropagation {
                    users: EmbeddingConfig::new(g.users, d).init(device),
                    attributes: (nodes > 0).then(|| EmbeddingConfig::new(nodes, d).init(device)),
                    user_item: RelationPair::new(&graph.user_item, device),
                    item_genre: graph
                        .item_genre
                        .as_ref()
                        .map(|b| RelationPair::new(b, device)),
                    user_attribute: graph
                        .user_attribute
                        .as_ref()
                        .map(|b| RelationPair::new(b, device)),
                    genres: g.genres,
                    layers: g.layers,
                })
            }
            _ => None,
        };
        (text.is_some() || graph.is_some()).then_some(Self { text, graph })
    }

    /// The fused table from the ID rows `[vocab, d]`.
    pub fn table(&self, id_rows: Tensor<2>) -> Tensor<2> {
        let items0 = match &self.text {
            Some(t) => id_rows + t.proj.forward(t.features.clone()),
            None => id_rows,
        };
        match &self.graph {
            Some(g) => g.propagate(items0),
            None => items0,
        }
    }
}
