//! The serving checkpoint: a model's weights as safetensors whose metadata carries what
//! rebuilds and serves it without a training config — the model config, each block's shape
//! (pruned blocks have fewer heads or MLP channels than the config says), the item id map
//! and the items' genres — plus a sidecar file with the users' raw ids and histories, for
//! requests that name a user rather than send a history.
//!
//! The sidecar (`<checkpoint stem>.users.tsv` beside the checkpoint, named by the metadata)
//! was chosen over re-reading the data file named in the metadata because a checkpoint then
//! serves wherever it is copied, and the histories it answers with are exactly the ones the
//! model was trained on, not whatever the data file holds today.
//!
//! A model with text/graph fusion is saved *baked*: the fusion is constant at inference, so
//! the checkpoint's item rows are the fused table and its config has no fusion
//! (`meshrec.fused_from` records what was fused). Serving needs neither the text vectors nor
//! the graph, and loading such a file into a fused model turns that model into the same
//! baked form ([`load_weights`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::Dataset;
use crate::error::{CheckpointError, Location};
use crate::fusion::{FusionShape, SideInputs};
use crate::model::{BlockDims, Recommender};

/// The value of [`keys::FORMAT`] this code writes and reads.
pub const FORMAT: &str = "meshrec-checkpoint/1";

/// The metadata keys of a serving checkpoint.
pub mod keys {
    pub const FORMAT: &str = "meshrec.format";
    pub const NAME: &str = "meshrec.name";
    pub const DATASET: &str = "meshrec.dataset";
    pub const CONFIG: &str = "meshrec.model_config";
    pub const BLOCKS: &str = "meshrec.blocks";
    pub const ITEMS: &str = "meshrec.item_tokens";
    pub const GENRES: &str = "meshrec.item_genres";
    pub const USERS: &str = "meshrec.users_file";
    pub const FUSED_FROM: &str = "meshrec.fused_from";
}

/// The sizes of one block as saved: pruning removes attention heads and MLP channels, so
/// blocks of one model may differ from each other and from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockShape {
    pub heads: usize,
    pub d_ff: usize,
}

/// What a serving checkpoint's metadata says about its model.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// What the model is, for humans and the `model` field of responses ("small",
    /// "small-pruned", "student").
    pub name: String,
    pub dataset: String,
    pub config: ModelConfig,
    pub blocks: Vec<BlockShape>,
    /// The raw item token of each dense id; index 0 is padding (empty).
    pub item_tokens: Vec<String>,
    /// Each item's genre ids, when the model has genre tokens.
    pub item_genres: Option<Vec<Vec<u32>>>,
    /// The users sidecar's file name, in the checkpoint's folder.
    pub users_file: Option<String>,
}

impl CheckpointMeta {
    /// The metadata of an unpruned model of `config` trained on `dataset`.
    pub fn new(name: impl Into<String>, config: &ModelConfig, dataset: &Dataset) -> Self {
        let item_genres = config
            .num_genres
            .and(dataset.features.as_ref())
            .map(|f| f.item_genres.clone());
        Self {
            name: name.into(),
            dataset: dataset.name.clone(),
            config: config.clone(),
            blocks: vec![
                BlockShape {
                    heads: config.n_heads,
                    d_ff: config.d_ff,
                };
                config.n_layers
            ],
            item_tokens: dataset.item_tokens.clone(),
            item_genres,
            users_file: None,
        }
    }

    /// The sizes of block `i`.
    pub fn block_dims(&self, i: usize) -> BlockDims {
        let shape = self.blocks[i];
        BlockDims {
            d_model: self.config.d_model,
            heads: shape.heads,
            head_dim: self.config.head_dim(),
            d_ff: shape.d_ff,
        }
    }

    fn check(&self, path: &Path) -> Result<(), CheckpointError> {
        let bad = |key, message: String| CheckpointError::Metadata {
            path: path.to_path_buf(),
            key,
            message,
        };
        self.config
            .validate()
            .map_err(|source| CheckpointError::Config {
                path: path.to_path_buf(),
                source,
            })?;
        if self.blocks.len() != self.config.n_layers {
            return Err(bad(
                keys::BLOCKS,
                format!(
                    "lists {} blocks but the config has n_layers = {}",
                    self.blocks.len(),
                    self.config.n_layers
                ),
            ));
        }
        if let Some(i) = self.blocks.iter().position(|b| b.heads == 0 || b.d_ff == 0) {
            return Err(bad(
                keys::BLOCKS,
                format!("block {i} has no heads or channels"),
            ));
        }
        if self.item_tokens.len() != self.config.vocab() {
            return Err(bad(
                keys::ITEMS,
                format!(
                    "has {} tokens (padding included) for a catalogue of {} items",
                    self.item_tokens.len(),
                    self.config.num_items
                ),
            ));
        }
        if self.config.num_genres.is_some() && self.item_genres.is_none() {
            return Err(bad(
                keys::GENRES,
                "is missing, but the model has genre tokens".into(),
            ));
        }
        Ok(())
    }
}

/// The block shapes of a model as it is (after pruning, say).
pub fn block_shapes(model: &Recommender) -> Vec<BlockShape> {
    model
        .blocks
        .iter()
        .map(|b| BlockShape {
            heads: b.attn.heads,
            d_ff: b.mlp.w1.weight.dims()[1],
        })
        .collect()
}

/// An untrained model of the shape `meta` describes: the frame weights are loaded into.
pub fn build_model(meta: &CheckpointMeta, device: &Device) -> Recommender {
    let config = &meta.config;
    let mut model = Recommender::new_shard(
        config,
        &SideInputs::genres(meta.item_genres.clone()),
        BlockDims::full(config),
        0,
        config.vocab(),
        0,
        device,
    );
    model.blocks = (0..meta.blocks.len())
        .map(|i| crate::model::Block::new(config, meta.block_dims(i), device))
        .collect();
    model
}

/// The users' raw ids and full histories (dense item ids, time order): what a `{"user":
/// ...}` request is answered from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserHistories {
    pub tokens: Vec<String>,
    pub items: Vec<Vec<u32>>,
}

impl UserHistories {
    pub fn from_dataset(dataset: &Dataset) -> Self {
        Self {
            tokens: dataset.user_tokens.clone(),
            items: dataset
                .users
                .iter()
                .map(|u| u.history().collect())
                .collect(),
        }
    }

    /// One line per user: the raw id, a tab, the dense item ids separated by spaces.
    fn to_text(&self) -> String {
        let mut out = String::from(
            "# meshrec users/1: raw user id, tab, the user's dense item ids in time order \
             (the checkpoint's meshrec.item_tokens maps them to raw ids)\n",
        );
        for (token, items) in self.tokens.iter().zip(&self.items) {
            out.push_str(token);
            out.push('\t');
            let ids: Vec<String> = items.iter().map(u32::to_string).collect();
            out.push_str(&ids.join(" "));
            out.push('\n');
        }
        out
    }

    /// Reads a sidecar, checking every item id against the catalogue.
    pub fn read(path: &Path, num_items: usize) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut out = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let at = || Location {
                file: path.to_path_buf(),
                line: i + 1,
            };
            let (token, ids) = line
                .split_once('\t')
                .ok_or_else(|| CheckpointError::Users {
                    at: at(),
                    message: "expected `user<TAB>item ids`".into(),
                })?;
            let items = ids
                .split_whitespace()
                .map(|s| match s.parse::<u32>() {
                    Ok(id) if id >= 1 && id as usize <= num_items => Ok(id),
                    _ => Err(CheckpointError::Users {
                        at: at(),
                        message: format!("`{s}` is not an item id in 1..={num_items}"),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.tokens.push(token.to_string());
            out.items.push(items);
        }
        Ok(out)
    }
}

/// The sidecar's file name for a checkpoint file name: `best.safetensors` ->
/// `best.users.tsv`.
pub fn users_file_name(checkpoint: &Path) -> String {
    let stem = checkpoint
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    format!("{stem}.users.tsv")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `text` to `path` atomically (temporary sibling, fsync, rename).
fn write_atomic(path: &Path, text: &str) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Saves `model` with `meta` (its block shapes taken from the model itself) and, when given,
/// the users sidecar beside it. Both files are replaced atomically.
pub fn save(
    model: &Recommender,
    meta: &CheckpointMeta,
    users: Option<&UserHistories>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let mut meta = meta.clone();
    meta.blocks = block_shapes(model);
    let fused_from = model.embed.fusion.as_ref().map(|_| meta.config.fusion);
    let baked;
    let model = match fused_from {
        Some(_) => {
            baked = bake_fusion(model);
            meta.config.fusion = FusionShape::default();
            &baked
        }
        None => model,
    };
    if let Some(users) = users {
        let name = users_file_name(path);
        let sidecar = path.with_file_name(&name);
        write_atomic(&sidecar, &users.to_text())?;
        meta.users_file = Some(name);
    }
    meta.check(path)?;
    let mut store = SafetensorsStore::from_file(path.to_path_buf())
        .overwrite(true)
        .metadata(keys::FORMAT, FORMAT)
        .metadata(keys::NAME, meta.name.clone())
        .metadata(keys::DATASET, meta.dataset.clone())
        .metadata(keys::CONFIG, to_json(&meta.config))
        .metadata(keys::BLOCKS, to_json(&meta.blocks))
        .metadata(keys::ITEMS, to_json(&meta.item_tokens));
    if let Some(genres) = &meta.item_genres {
        store = store.metadata(keys::GENRES, to_json(genres));
    }
    if let Some(users) = &meta.users_file {
        store = store.metadata(keys::USERS, users.clone());
    }
    if let Some(shape) = &fused_from {
        store = store.metadata(keys::FUSED_FROM, to_json(shape));
    }
    model
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The inference form of a fused model: its item rows replaced by the fused table, the
/// fusion removed.
pub fn bake_fusion(model: &Recommender) -> Recommender {
    let mut baked = model.clone();
    if baked.embed.fusion.is_some() {
        let table = baked.embed.table().detach();
        baked.embed.items.weight = Param::from_tensor(table);
        baked.embed.fusion = None;
    }
    baked
}

/// A metadata value: JSON text.
fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The `__metadata__` map of a safetensors file, read from its header alone.
pub fn read_raw_metadata(
    path: &Path,
) -> Result<std::collections::HashMap<String, String>, CheckpointError> {
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format(format!("no header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    // safetensors caps headers at 100 MB; a larger length is not a checkpoint.
    if len > 100_000_000 {
        return Err(format(format!("header length {len} is implausible")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format(format!("truncated header: {e}")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format(format!("header is not JSON: {e}")))?;
    let Some(meta) = header.get("__metadata__") else {
        return Ok(Default::default());
    };
    serde_json::from_value(meta.clone())
        .map_err(|e| format(format!("`__metadata__` is not a string map: {e}")))
}

/// Reads and checks a serving checkpoint's metadata.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let raw = read_raw_metadata(path)?;
    let get = |key: &'static str| {
        raw.get(key).ok_or_else(|| CheckpointError::Metadata {
            path: path.to_path_buf(),
            key,
            message: "is missing (a checkpoint saved before serving metadata existed? \
                      retrain, or save it again with `meshrec train`)"
                .into(),
        })
    };
    fn parse<T: serde::de::DeserializeOwned>(
        path: &Path,
        key: &'static str,
        text: &str,
    ) -> Result<T, CheckpointError> {
        serde_json::from_str(text).map_err(|e| CheckpointError::Metadata {
            path: path.to_path_buf(),
            key,
            message: format!("is not valid: {e}"),
        })
    }
    let format = get(keys::FORMAT)?;
    if format != FORMAT {
        return Err(CheckpointError::Metadata {
            path: path.to_path_buf(),
            key: keys::FORMAT,
            message: format!("is `{format}`; this build reads `{FORMAT}`"),
        });
    }
    let meta = CheckpointMeta {
        name: get(keys::NAME)?.clone(),
        dataset: get(keys::DATASET)?.clone(),
        config: parse(path, keys::CONFIG, get(keys::CONFIG)?)?,
        blocks: parse(path, keys::BLOCKS, get(keys::BLOCKS)?)?,
        item_tokens: parse(path, keys::ITEMS, get(keys::ITEMS)?)?,
        item_genres: match raw.get(keys::GENRES) {
            Some(text) => Some(parse(path, keys::GENRES, text)?),
            None => None,
        },
        users_file: raw.get(keys::USERS).cloned(),
    };
    meta.check(path)?;
    Ok(meta)
}

/// Loads weights into a model of the same shape (training's best model back into its
/// stepper, say), checking that every parameter was found and fits. A fused model loading a
/// baked checkpoint becomes baked (its fusion dropped: the item rows hold the fused table).
pub fn load_weights(model: &mut Recommender, path: &Path) -> Result<(), CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    if model.embed.fusion.is_some() && read_raw_metadata(path)?.contains_key(keys::FUSED_FROM) {
        model.embed.fusion = None;
    }
    let mut store = SafetensorsStore::from_file(path.to_path_buf());
    let result = model
        .load_from(&mut store)
        .map_err(|e| CheckpointError::Weights {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(CheckpointError::Weights {
            path: path.to_path_buf(),
            message: format!("errors {:?}, missing {:?}", result.errors, result.missing),
        });
    }
    Ok(())
}

/// Loads a serving checkpoint: the model rebuilt from its metadata (no training config
/// needed) with its weights, and the metadata.
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(Recommender, CheckpointMeta), CheckpointError> {
    let meta = read_meta(path)?;
    let mut model = build_model(&meta, device);
    load_weights(&mut model, path)?;
    Ok((model, meta))
}

/// The users sidecar a checkpoint names, if it names one.
pub fn load_users(
    checkpoint: &Path,
    meta: &CheckpointMeta,
) -> Result<Option<UserHistories>, CheckpointError> {
    let Some(name) = &meta.users_file else {
        return Ok(None);
    };
    let path: PathBuf = checkpoint.with_file_name(name);
    UserHistories::read(&path, meta.config.num_items).map(Some)
}
