//! Sharded checkpoints (`checkpoint.sharded = true`): every rank writes what it holds — its
//! TP/PP slices of the parameters (one rank of each replicated copy) and the AdamW moments
//! of its slices (under ZeRO, its DP shard of them) — to a file of its own, and the
//! manifest indexes them. Loading reshards into any layout without ever holding the whole
//! model: each rank reads the shard files one at a time and keeps only the elements that
//! fall in its own slices, then checks that every element arrived exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshrec_parallel::layout::{SliceMap, Split};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    bad, load_manifest, load_state, read_verified, Manifest, ShardIndex, TrainState,
};
use crate::error::RunError;

/// Reads and verifies any checkpoint whole: manifest format and version, every file's size
/// and SHA-256, then the state — a sharded checkpoint's shards assembled into it (on this
/// one process: for tools such as `meshrec diff` and tests; a resume reads shards rank by
/// rank). A corrupted or truncated checkpoint is an error naming the file and what is wrong.
pub fn load(path: &Path) -> Result<(PathBuf, Manifest, TrainState), RunError> {
    let (dir, manifest) = load_manifest(path)?;
    let state = match &manifest.sharded {
        Some(index) => assemble(&dir, &manifest, index)?,
        None => load_state(&dir, &manifest)?,
    };
    Ok((dir, manifest, state))
}

/// The shard file of world rank `rank`.
pub fn shard_file(rank: usize) -> String {
    format!("shard-rank{rank}.bin")
}

/// What one rank saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankShard {
    pub rank: usize,
    pub entries: Vec<ShardEntry>,
}

/// One parameter's slice as one rank held it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Path in the full model.
    pub path: String,
    pub split: Split,
    /// Which TP slice (`tp` of `tp_size`).
    pub tp: usize,
    pub tp_size: usize,
    /// The slice's values, when this rank is the one that saves them.
    pub values: Option<Vec<f32>>,
    /// AdamW moments of slice elements `moments_from ..` (empty when another rank saves them).
    pub moments_from: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl RankShard {
    /// A whole state as one rank's shard (one device).
    pub fn whole(state: &TrainState) -> Self {
        let entries = state
            .values
            .iter()
            .map(|(path, values)| ShardEntry {
                path: path.clone(),
                split: Split::Replicated,
                tp: 0,
                tp_size: 1,
                values: Some(values.clone()),
                moments_from: 0,
                m: state.adam_m.get(path).cloned().unwrap_or_default(),
                v: state.adam_v.get(path).cloned().unwrap_or_default(),
            })
            .collect();
        Self { rank: 0, entries }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).map_err(|e| e.to_string())
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let (shard, used): (Self, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err("trailing bytes after the shard".into());
        }
        Ok(shard)
    }
}

/// One slice a rank wants filled from the shards: `path`'s elements that `map` places.
pub struct Wanted<'a> {
    pub path: &'a str,
    pub map: SliceMap,
    pub values: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    /// How often each element of the slice was written (values, moments): exactly once
    /// when the shards are complete.
    pub seen_values: Vec<u8>,
    pub seen_moments: Vec<u8>,
}

impl<'a> Wanted<'a> {
    pub fn new(
        path: &'a str,
        map: SliceMap,
        values: &'a mut [f32],
        m: &'a mut [f32],
        v: &'a mut [f32],
    ) -> Self {
        let n = values.len();
        Self {
            path,
            map,
            values,
            m,
            v,
            seen_values: vec![0; n],
            seen_moments: vec![0; n],
        }
    }
}

/// Reads every shard of the checkpoint in `dir`, one file at a time, into the slices of
/// `wanted`, then checks each was covered exactly once.
pub fn fill(
    dir: &Path,
    manifest: &Manifest,
    index: &ShardIndex,
    wanted: &mut [Wanted<'_>],
) -> Result<(), RunError> {
    for file in &index.shards {
        let bytes = read_verified(dir, manifest, file)?;
        let shard = RankShard::from_bytes(&bytes).map_err(|e| bad(&dir.join(file), e))?;
        for entry in &shard.entries {
            let shape = index.shapes.get(&entry.path).ok_or_else(|| {
                bad(
                    &dir.join(file),
                    format!("`{}` is not in the manifest's shapes", entry.path),
                )
            })?;
            let saved = SliceMap::new(entry.split, shape, entry.tp_size, entry.tp);
            let slice_len = saved.slice_len();
            let bad_len = entry.values.as_ref().is_some_and(|v| v.len() != slice_len)
                || entry.m.len() != entry.v.len()
                || entry.moments_from + entry.m.len() > slice_len;
            if bad_len {
                return Err(bad(
                    &dir.join(file),
                    format!("`{}` holds values or moments of the wrong size", entry.path),
                ));
            }
            for w in wanted.iter_mut().filter(|w| w.path == entry.path) {
                if let Some(values) = &entry.values {
                    for (k, x) in values.iter().enumerate() {
                        if let Some(j) = w.map.slice_index(saved.full_index(k)) {
                            w.values[j] = *x;
                            w.seen_values[j] = w.seen_values[j].saturating_add(1);
                        }
                    }
                }
                for (i, (m, v)) in entry.m.iter().zip(&entry.v).enumerate() {
                    let full = saved.full_index(entry.moments_from + i);
                    if let Some(j) = w.map.slice_index(full) {
                        w.m[j] = *m;
                        w.v[j] = *v;
                        w.seen_moments[j] = w.seen_moments[j].saturating_add(1);
                    }
                }
            }
        }
    }
    for w in wanted.iter() {
        for (what, seen) in [("values", &w.seen_values), ("moments", &w.seen_moments)] {
            if let Some(j) = seen.iter().position(|&c| c != 1) {
                return Err(bad(
                    &dir.join("manifest.json"),
                    format!(
                        "the shards hold element {j} of `{}`'s {what} {} times, not once (a shard missing or from another run)",
                        w.path, seen[j]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The whole state from a sharded checkpoint's shards (every parameter unsharded on this
/// one process): for tools (`meshrec diff`) and tests, not for resuming.
pub fn assemble(
    dir: &Path,
    manifest: &Manifest,
    index: &ShardIndex,
) -> Result<TrainState, RunError> {
    let mut values: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut m: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut v: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (path, shape) in &index.shapes {
        let n: usize = shape.iter().product();
        values.insert(path.clone(), vec![0.0; n]);
        m.insert(path.clone(), vec![0.0; n]);
        v.insert(path.clone(), vec![0.0; n]);
    }
    {
        let mut wanted: Vec<Wanted<'_>> = Vec::new();
        let mut m_iter = m.iter_mut();
        let mut v_iter = v.iter_mut();
        for (path, vals) in values.iter_mut() {
            let (Some((_, mm)), Some((_, vv))) = (m_iter.next(), v_iter.next()) else {
                break;
            };
            let shape = &index.shapes[path];
            wanted.push(Wanted::new(
                path,
                SliceMap::new(Split::Replicated, shape, 1, 0),
                vals,
                mm,
                vv,
            ));
        }
        fill(dir, manifest, index, &mut wanted)?;
    }
    Ok(TrainState {
        shapes: index.shapes.clone(),
        values,
        adam_m: m,
        adam_v: v,
        optimizer_steps: index.optimizer_steps,
        partition: index.partition.clone(),
        compressor: Vec::new(),
    })
}
