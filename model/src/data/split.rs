//! Per-user chronological sequences and the leave-one-out split.

use std::collections::HashMap;
use std::path::Path;

use super::read::{
    load_dir_or_file, read_interactions, read_item_features, InteractionFormat, RawInteraction,
};
use super::side::{load_side_info, side_files, SideInfo};
use crate::error::DataError;

/// Item id 0 is padding everywhere; real items are `1..=num_items`. It lives with the
/// dense-id mapping below, which is what reserves it.
pub const PAD: u32 = 0;

/// Categorical side features (genres) of items: `item_genres[item]` lists genre ids in
/// `0..num_genres`; index 0 is the padding item and has none.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFeatures {
    pub num_genres: usize,
    pub item_genres: Vec<Vec<u32>>,
    pub genre_names: Vec<String>,
}

/// One user's leave-one-out split. `train` is the chronological history without the last two
/// items; `valid` is the second-last item and `test` the last. Users with fewer than three
/// interactions have no valid or test item and only train.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitUser {
    pub train: Vec<u32>,
    pub valid: Option<u32>,
    pub test: Option<u32>,
}

impl SplitUser {
    /// Every item the user interacted with, in time order.
    pub fn history(&self) -> impl Iterator<Item = u32> + '_ {
        self.train
            .iter()
            .copied()
            .chain(self.valid)
            .chain(self.test)
    }
}

/// A dataset in dense ids: items `1..=num_items` (0 is padding), users `0..num_users`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub num_items: usize,
    pub num_interactions: usize,
    pub users: Vec<SplitUser>,
    /// External item token of each dense id (index 0 is the empty padding token).
    pub item_tokens: Vec<String>,
    /// External user token of each dense user id (`users[i]` is `user_tokens[i]`).
    pub user_tokens: Vec<String>,
    pub features: Option<ItemFeatures>,
    /// Titles, years, genres of items and ages, genders, occupations of users, when the
    /// side files lie beside the interactions.
    pub side: SideInfo,
}

/// Orders external tokens numerically when they all are numbers, else lexically, so that
/// dense ids do not depend on file order.
fn sorted_tokens<'a>(tokens: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut unique: Vec<String> = tokens
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    if unique.iter().all(|t| t.parse::<u64>().is_ok()) {
        unique.sort_by_key(|t| t.parse::<u64>().unwrap_or(u64::MAX));
    }
    unique
}

impl Dataset {
    /// Builds the dataset from raw interactions: dense ids, per-user sequences sorted by
    /// timestamp (file order breaks ties), then leave-one-out.
    pub fn from_interactions(name: impl Into<String>, raw: &[RawInteraction]) -> Self {
        let item_tokens: Vec<String> = std::iter::once(String::new())
            .chain(sorted_tokens(raw.iter().map(|r| r.item.as_str())))
            .collect();
        let item_id: HashMap<&str, u32> = item_tokens
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let user_tokens = sorted_tokens(raw.iter().map(|r| r.user.as_str()));
        let user_id: HashMap<&str, usize> = user_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut per_user: Vec<Vec<(f64, usize, u32)>> = vec![Vec::new(); user_tokens.len()];
        for r in raw {
            per_user[user_id[r.user.as_str()]].push((
                r.timestamp,
                r.line,
                item_id[r.item.as_str()],
            ));
        }
        let users = per_user
            .into_iter()
            .map(|mut events| {
                events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let items: Vec<u32> = events.into_iter().map(|e| e.2).collect();
                Self::split_user(items)
            })
            .collect();
        Self {
            name: name.into(),
            num_items: item_tokens.len() - 1,
            num_interactions: raw.len(),
            users,
            item_tokens,
            user_tokens,
            features: None,
            side: SideInfo::default(),
        }
    }

    fn split_user(mut items: Vec<u32>) -> SplitUser {
        if items.len() < 3 {
            return SplitUser {
                train: items,
                valid: None,
                test: None,
            };
        }
        let test = items.pop();
        let valid = items.pop();
        SplitUser {
            train: items,
            valid,
            test,
        }
    }

    /// Loads a dataset from a data file or a folder holding one (RecBole `.inter` with an
    /// optional `.item` and `.user` beside it, MovieLens `u.data` with an optional `u.item`
    /// and `u.user`, or `ratings.dat`). Side files that are absent leave their part of
    /// [`Dataset::side`] empty; side files that are present must be well formed.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let (inter, format, item_file) = load_dir_or_file(path)?;
        let raw = read_interactions(&inter, format)?;
        let name = inter
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dataset")
            .to_string();
        let mut dataset = Self::from_interactions(name, &raw);
        if let Some(item_file) = item_file {
            let features = read_item_features(&item_file)?;
            dataset.attach_features(&features);
        }
        dataset.side = load_side_info(
            &side_files(&inter, format)?,
            &dataset.item_tokens,
            &dataset.user_tokens,
        )?;
        // `u.item` holds the genres as flags; they become the same features a RecBole
        // `.item`'s `class` column gives.
        if let (InteractionFormat::MovieLens100k, Some(items)) = (format, &dataset.side.items) {
            let genres: HashMap<String, Vec<String>> = dataset
                .item_tokens
                .iter()
                .enumerate()
                .filter_map(|(id, token)| Some((token.clone(), items.get(id)?.genres.clone())))
                .collect();
            dataset.attach_features(&genres);
        }
        Ok(dataset)
    }

    /// Attaches genre features by external item token. Items of the `.item` file that never
    /// occur in the interactions are not in the catalogue and are passed over; catalogue
    /// items without an entry get no genre.
    pub fn attach_features(&mut self, features: &HashMap<String, Vec<String>>) {
        let genre_names = sorted_tokens(features.values().flatten().map(String::as_str));
        let genre_id: HashMap<&str, u32> = genre_names
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i as u32))
            .collect();
        let item_genres = self
            .item_tokens
            .iter()
            .enumerate()
            .map(|(i, token)| match (i, features.get(token)) {
                (0, _) | (_, None) => Vec::new(),
                (_, Some(genres)) => genres.iter().map(|g| genre_id[g.as_str()]).collect(),
            })
            .collect();
        self.features = Some(ItemFeatures {
            num_genres: genre_names.len(),
            item_genres,
            genre_names,
        });
    }

    pub fn num_users(&self) -> usize {
        self.users.len()
    }

    /// How often each item id occurs in the training split (index 0, padding, is 0).
    pub fn training_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.num_items + 1];
        for user in &self.users {
            for &i in &user.train {
                counts[i as usize] += 1;
            }
        }
        counts
    }

    /// Whether each item id is *cold*: in the bottom popularity quintile of the training
    /// split, i.e. its training count is at most the count at the 20th percentile of the
    /// catalogue (ties included, so the set may exceed a fifth). Padding is never cold.
    pub fn cold_items(&self) -> Vec<bool> {
        let counts = self.training_counts();
        let mut sorted: Vec<u32> = counts[1..].to_vec();
        sorted.sort_unstable();
        let Some(&threshold) = sorted.get((sorted.len() / 5).saturating_sub(1)) else {
            return vec![false; counts.len()];
        };
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| i > 0 && c <= threshold)
            .collect()
    }

    /// Users that have a valid and a test item (the ones that are evaluated).
    pub fn num_eval_users(&self) -> usize {
        self.users.iter().filter(|u| u.test.is_some()).count()
    }
}
