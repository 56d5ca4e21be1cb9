//! The heterogeneous user–item graph the fusion model propagates over: user–item edges of
//! the training split only (a valid or test interaction never enters it), item–genre edges,
//! and user–attribute edges (age bucket, gender, occupation), each relation a bipartite edge
//! list with LightGCN's symmetric normalisation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::split::Dataset;
use crate::error::DataError;

/// The relations a graph may hold besides users–items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// User–item interactions of the training split.
    UserItem,
    /// Item–genre, from the item side file.
    ItemGenre,
    /// User–attribute (age bucket, gender, occupation), from the user side file.
    UserAttribute,
}

impl Relation {
    pub const ALL: [Relation; 3] = [
        Relation::UserItem,
        Relation::ItemGenre,
        Relation::UserAttribute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Relation::UserItem => "user_item",
            Relation::ItemGenre => "item_genre",
            Relation::UserAttribute => "user_attribute",
        }
    }
}

/// The edges of one relation between a left node set and a right one, deduplicated and
/// sorted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bipartite {
    pub left: usize,
    pub right: usize,
    pub edges: Vec<(u32, u32)>,
}

impl Bipartite {
    fn new(left: usize, right: usize, edges: BTreeSet<(u32, u32)>) -> Self {
        Self {
            left,
            right,
            edges: edges.into_iter().collect(),
        }
    }

    /// Degrees of the left and of the right nodes.
    pub fn degrees(&self) -> (Vec<u32>, Vec<u32>) {
        let mut left = vec![0u32; self.left];
        let mut right = vec![0u32; self.right];
        for &(l, r) in &self.edges {
            left[l as usize] += 1;
            right[r as usize] += 1;
        }
        (left, right)
    }

    /// The normalised adjacency `Â[l][r] = 1 / sqrt(deg(l) · deg(r))` as a dense row-major
    /// `left × right` matrix (LightGCN's propagation matrix of this relation).
    pub fn normalised_dense(&self) -> Vec<f32> {
        let (dl, dr) = self.degrees();
        let mut m = vec![0.0f32; self.left * self.right];
        for &(l, r) in &self.edges {
            let w = 1.0 / (f64::from(dl[l as usize]) * f64::from(dr[r as usize])).sqrt();
            m[l as usize * self.right + r as usize] = w as f32;
        }
        m
    }
}

/// MovieLens-1M's age groups, applied to MovieLens-100K's ages in years.
fn age_bucket(age: u8) -> &'static str {
    match age {
        0..=17 => "under 18",
        18..=24 => "18-24",
        25..=34 => "25-34",
        35..=44 => "35-44",
        45..=49 => "45-49",
        50..=55 => "50-55",
        _ => "56+",
    }
}

/// Users `0..num_users`, items `0..vocab` (row 0 is padding and has no edge), genres and
/// user-attribute values as further node sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteractionGraph {
    pub num_users: usize,
    /// Item rows including the padding row 0.
    pub vocab: usize,
    pub user_item: Bipartite,
    pub item_genre: Option<Bipartite>,
    pub user_attribute: Option<Bipartite>,
    pub genre_names: Vec<String>,
    /// `age:25-34`, `gender:F`, `occupation:engineer`, … in attribute-node order.
    pub attribute_names: Vec<String>,
}

impl InteractionGraph {
    /// Builds the graph of `relations` (user–item always) from the dataset's training split
    /// and side information; a relation whose side file is absent or incomplete is an error
    /// naming the file.
    pub fn build(dataset: &Dataset, relations: &[Relation]) -> Result<Self, DataError> {
        let vocab = dataset.num_items + 1;
        let num_users = dataset.num_users();
        let user_item: BTreeSet<(u32, u32)> = dataset
            .users
            .iter()
            .enumerate()
            .flat_map(|(u, split)| split.train.iter().map(move |&i| (u as u32, i)))
            .collect();
        let mut graph = Self {
            num_users,
            vocab,
            user_item: Bipartite::new(num_users, vocab, user_item),
            item_genre: None,
            user_attribute: None,
            genre_names: Vec::new(),
            attribute_names: Vec::new(),
        };
        if relations.contains(&Relation::ItemGenre) {
            let features = dataset
                .features
                .as_ref()
                .ok_or_else(|| missing_side("item genres", dataset))?;
            let edges = features
                .item_genres
                .iter()
                .enumerate()
                .flat_map(|(item, genres)| genres.iter().map(move |&g| (item as u32, g)))
                .collect();
            graph.item_genre = Some(Bipartite::new(vocab, features.num_genres, edges));
            graph.genre_names = features.genre_names.clone();
        }
        if relations.contains(&Relation::UserAttribute) {
            let side = dataset
                .side
                .users
                .as_ref()
                .ok_or_else(|| missing_side("users", dataset))?;
            let users = side.complete()?;
            let values: Vec<[String; 3]> = users
                .iter()
                .map(|u| {
                    [
                        format!("age:{}", age_bucket(u.age)),
                        format!(
                            "gender:{}",
                            match u.gender {
                                super::side::Gender::Female => "F",
                                super::side::Gender::Male => "M",
                            }
                        ),
                        format!("occupation:{}", u.occupation),
                    ]
                })
                .collect();
            let names: Vec<String> = values
                .iter()
                .flatten()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let index = |name: &str| {
                names
                    .binary_search_by(|n| n.as_str().cmp(name))
                    .map(|i| i as u32)
            };
            let mut edges = BTreeSet::new();
            for (u, attrs) in values.iter().enumerate() {
                for a in attrs {
                    if let Ok(i) = index(a) {
                        edges.insert((u as u32, i));
                    }
                }
            }
            graph.user_attribute = Some(Bipartite::new(num_users, names.len(), edges));
            graph.attribute_names = names;
        }
        Ok(graph)
    }

    /// Nodes besides users and items: genres, then user attributes.
    pub fn num_attribute_nodes(&self) -> usize {
        self.genre_names.len() + self.attribute_names.len()
    }
}

fn missing_side(what: &'static str, dataset: &Dataset) -> DataError {
    DataError::InvalidParameter {
        key: "features.graph_relations",
        message: format!(
            "the graph needs the {what} side file, which dataset `{}` lacks (for ml-100k: \
             `cargo xtask data ml-100k` brings ml-100k.item and ml-100k.user)",
            dataset.name
        ),
    }
}
