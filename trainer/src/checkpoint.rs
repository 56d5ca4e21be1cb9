//! Training-state checkpoints for `meshrec train --resume`: layout-free (full, unsharded
//! parameters and AdamW moments whatever mesh saved them, so any other layout can load
//! them), atomic (a temporary folder, fsync, rename), and checked (a manifest with the
//! layout, the data position, the RNG state, the compressor memories and a SHA-256 per file).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use meshrec_model::params::ParamInfo;
use meshrec_parallel::layout::FullState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::RunError;

pub const FORMAT: &str = "meshrec-checkpoint";
pub const VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.bin";
const LATEST: &str = "latest";

/// The mesh that saved a checkpoint (any other may load it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLayout {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub virtual_stages: usize,
    pub schedule: String,
    pub micro_batches: usize,
    pub dp_mode: String,
    pub bucket_mb: f64,
}

/// Where training stands: the loop resumes from exactly here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// Optimizer steps taken (the next step's number).
    pub step: u64,
    /// The epoch in progress and how many of its batches are done (the data position).
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Early stopping.
    pub best_ndcg: Option<f64>,
    pub best_epoch: u64,
    pub since_best: u64,
    pub best_valid: BTreeMap<String, f64>,
    /// Totals behind the summary's throughput.
    pub train_seconds: f64,
    pub samples: u64,
    pub tokens: u64,
    pub skipped_steps: u64,
    /// The epoch in progress so far, for its line in `metrics.jsonl`.
    pub epoch_loss_sum: f64,
    pub epoch_loss_targets: u64,
    pub epoch_targets: u64,
    pub epoch_samples: u64,
    pub epoch_seconds: f64,
    pub epoch_skipped: u64,
}

/// Every random stream of a run is counter-based (a hash of the seed and a position), so
/// the seed and the progress are the complete RNG state; recorded so a reader need not
/// know the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub seed: u64,
    pub data_order: String,
    pub dropout: String,
}

impl RngState {
    pub fn of_seed(seed: u64) -> Self {
        Self {
            seed,
            data_order: "shuffle keyed by (seed, epoch)".into(),
            dropout: "xoshiro streams keyed by (seed, step, rank); replicated regions by (seed, step, dp rank, site)".into(),
        }
    }
}

/// Compressor memories (error-feedback residuals, PowerSGD warm starts), one file per world
/// rank; they follow the DP buckets, so they are restored only into the same layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedCompressor {
    pub method: String,
    pub error_feedback: bool,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub layout: SavedLayout,
    pub progress: Progress,
    pub rng: RngState,
    pub compressor: Option<SavedCompressor>,
    pub files: Vec<FileEntry>,
    /// The run's configuration (TOML), to check that a resume trains the same model.
    pub config: String,
    /// A sharded checkpoint: no state file, a shard per world rank instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharded: Option<ShardIndex>,
}

/// What a sharded checkpoint holds: each world rank's shard file (parameters and AdamW
/// moments of the slices it held, see `checkpoint_shard`), the full shapes they slice, and
/// the optimizer step. Any layout loads it, each rank reading the shard files one at a
/// time and keeping only what overlaps its own slices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    pub shards: Vec<String>,
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub optimizer_steps: u64,
    /// Blocks per pipeline chunk when saved.
    pub partition: Vec<usize>,
}

/// Parameters and AdamW state of the full model, keyed by parameter path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub values: BTreeMap<String, Vec<f32>>,
    pub adam_m: BTreeMap<String, Vec<f32>>,
    pub adam_v: BTreeMap<String, Vec<f32>>,
    pub optimizer_steps: u64,
    /// Blocks per pipeline chunk when saved (the online rebalancer may have moved them).
    pub partition: Vec<usize>,
    /// Per world rank, the bytes of its compressor memories (empty without compression).
    #[serde(skip)]
    pub compressor: Vec<Vec<u8>>,
}

impl TrainState {
    /// From per-parameter buffers in `infos` order.
    pub fn from_ordered(
        infos: &[ParamInfo],
        values: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
        optimizer_steps: u64,
    ) -> Self {
        let values = FullState::from_ordered(infos, values);
        Self {
            adam_m: FullState::from_ordered(infos, m).values,
            adam_v: FullState::from_ordered(infos, v).values,
            shapes: values.shapes,
            values: values.values,
            optimizer_steps,
            partition: Vec::new(),
            compressor: Vec::new(),
        }
    }

    /// One of the three per-parameter states as a [`FullState`] (to shard or order).
    pub fn full(&self, which: StateKind) -> FullState {
        FullState {
            shapes: self.shapes.clone(),
            values: match which {
                StateKind::Values => self.values.clone(),
                StateKind::AdamM => self.adam_m.clone(),
                StateKind::AdamV => self.adam_v.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    Values,
    AdamM,
    AdamV,
}

pub(crate) fn bad(path: &Path, message: impl Into<String>) -> RunError {
    RunError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io(path: &Path, e: std::io::Error) -> RunError {
    bad(path, e.to_string())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

fn sync_dir(path: &Path) -> Result<(), RunError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(path, e))
}

/// Writes a checkpoint under `root` (`root/step-NNNNNNNN`), points `root/latest` at it and
/// keeps the newest `keep`. Nothing is visible under the final name until every byte is on
/// disk, so a crash at any point leaves the previous checkpoint intact.
pub fn save(
    root: &Path,
    manifest: Manifest,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf, RunError> {
    let tmp = begin_save(root, manifest.progress.step)?;
    let mut files = Vec::new();
    let state_bytes = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| bad(&tmp.join(STATE), e.to_string()))?;
    files.push(write_entry(&tmp, STATE, &state_bytes)?);
    if let Some(c) = &manifest.compressor {
        if c.files.len() != state.compressor.len() {
            return Err(bad(
                &tmp,
                format!(
                    "{} compressor files named for {} ranks' memories",
                    c.files.len(),
                    state.compressor.len()
                ),
            ));
        }
        for (file, bytes) in c.files.iter().zip(&state.compressor) {
            files.push(write_entry(&tmp, file, bytes)?);
        }
    }
    finish_save(root, manifest, files, keep)
}

/// The temporary folder a checkpoint of `step` is written into (created empty; a stale one
/// from a crash is removed).
pub fn begin_save(root: &Path, step: u64) -> Result<PathBuf, RunError> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let tmp = tmp_dir(root, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    Ok(tmp)
}

/// The compressor-memory file of world rank `rank`.
pub fn compressor_file(rank: usize) -> String {
    format!("compress-rank{rank}.bin")
}

/// Where the checkpoint of `step` is written before it is complete.
pub fn tmp_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!(".{}.tmp", step_name(step)))
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes `bytes` as `dir/name`, synced, and describes it for the manifest.
pub fn write_entry(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry, RunError> {
    write_synced(&dir.join(name), bytes)?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
    })
}

/// Completes the checkpoint whose files are in [`begin_save`]'s folder: the manifest, the
/// rename to its final name, `latest`, and pruning to the newest `keep`.
pub fn finish_save(
    root: &Path,
    mut manifest: Manifest,
    files: Vec<FileEntry>,
    keep: usize,
) -> Result<PathBuf, RunError> {
    let name = step_name(manifest.progress.step);
    let dir = root.join(&name);
    let tmp = tmp_dir(root, manifest.progress.step);
    manifest.files = files;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| bad(&tmp, e.to_string()))?;
    write_synced(&tmp.join(MANIFEST), text.as_bytes())?;
    sync_dir(&tmp)?;
    if dir.exists() {
        // The same step saved again (a resumed run passing its own start).
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    let latest_tmp = root.join(".latest.tmp");
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, root.join(LATEST)).map_err(|e| io(root, e))?;
    sync_dir(root)?;
    prune(root, keep)?;
    Ok(dir)
}

/// Deletes all but the newest `keep` complete checkpoints (and stale temporary folders).
fn prune(root: &Path, keep: usize) -> Result<(), RunError> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
        let entry = entry.map_err(|e| io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for name in &steps[..excess] {
        let path = root.join(name);
        std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// The checkpoint folder `path` names: a checkpoint itself, a checkpoints root (its
/// `latest`), or a run folder (its `checkpoints/latest`).
pub fn resolve(path: &Path) -> Result<PathBuf, RunError> {
    if path.join(MANIFEST).is_file() {
        return Ok(path.to_path_buf());
    }
    for root in [path.to_path_buf(), path.join("checkpoints")] {
        let latest = root.join(LATEST);
        if latest.is_file() {
            let name = std::fs::read_to_string(&latest).map_err(|e| io(&latest, e))?;
            let dir = root.join(name.trim());
            if !dir.join(MANIFEST).is_file() {
                return Err(bad(
                    &latest,
                    format!("points at `{}`, which has no {MANIFEST}", name.trim()),
                ));
            }
            return Ok(dir);
        }
    }
    Err(bad(
        path,
        format!("no {MANIFEST} here, and no `latest` here or under checkpoints/"),
    ))
}

/// The checkpoint folder `path` names and its manifest, format and version checked.
pub fn load_manifest(path: &Path) -> Result<(PathBuf, Manifest), RunError> {
    let dir = resolve(path)?;
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| io(&manifest_path, e))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| bad(&manifest_path, e.to_string()))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(bad(
            &manifest_path,
            format!(
                "format `{}` version {} (this build reads `{FORMAT}` version {VERSION})",
                manifest.format, manifest.version
            ),
        ));
    }
    Ok((dir, manifest))
}

/// Reads file `name` of the checkpoint in `dir`, checked against its manifest entry (size
/// and SHA-256).
pub fn read_verified(dir: &Path, manifest: &Manifest, name: &str) -> Result<Vec<u8>, RunError> {
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| bad(&dir.join(MANIFEST), format!("lists no `{name}`")))?;
    let file = dir.join(name);
    let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
    if bytes.len() as u64 != entry.bytes {
        return Err(bad(
            &file,
            format!(
                "{} bytes where the manifest lists {} (truncated or overwritten)",
                bytes.len(),
                entry.bytes
            ),
        ));
    }
    if sha256_hex(&bytes) != entry.sha256 {
        return Err(bad(
            &file,
            "SHA-256 differs from the manifest's: the file is corrupted",
        ));
    }
    Ok(bytes)
}

/// The whole state of an unsharded checkpoint, every listed file verified.
pub fn load_state(dir: &Path, manifest: &Manifest) -> Result<TrainState, RunError> {
    let manifest_path = dir.join(MANIFEST);
    let mut contents = BTreeMap::new();
    for entry in &manifest.files {
        contents.insert(
            entry.name.clone(),
            read_verified(dir, manifest, &entry.name)?,
        );
    }
    let state_path = dir.join(STATE);
    let state_bytes = contents
        .remove(STATE)
        .ok_or_else(|| bad(&manifest_path, format!("lists no {STATE}")))?;
    let (mut state, used): (TrainState, usize) =
        bincode::serde::decode_from_slice(&state_bytes, bincode::config::standard())
            .map_err(|e| bad(&state_path, e.to_string()))?;
    if used != state_bytes.len() {
        return Err(bad(&state_path, "trailing bytes after the state"));
    }
    for (name, shape) in &state.shapes {
        let n: usize = shape.iter().product();
        for (what, map) in [
            ("values", &state.values),
            ("adam_m", &state.adam_m),
            ("adam_v", &state.adam_v),
        ] {
            if map.get(name).map(Vec::len) != Some(n) {
                return Err(bad(
                    &state_path,
                    format!("{what} of `{name}` missing or not of shape {shape:?}"),
                ));
            }
        }
    }
    if let Some(c) = &manifest.compressor {
        for file in &c.files {
            let bytes = contents.remove(file).ok_or_else(|| {
                bad(
                    &manifest_path,
                    format!("compressor file `{file}` not listed"),
                )
            })?;
            state.compressor.push(bytes);
        }
    }
    Ok(state)
}

/// The keys of `[model]`, `[data]` and the data-order and optimizer keys of `[train]` must
/// agree between a checkpoint and the run resuming it; the layout and everything else may
/// change. Returns the first differing key.
pub fn check_compatible(
    saved_config: &str,
    current: &crate::config::RunConfig,
) -> Result<(), String> {
    let saved: toml::Table = toml::from_str(saved_config).map_err(|e| e.to_string())?;
    let now: toml::Table = toml::Value::try_from(current)
        .map_err(|e| e.to_string())?
        .as_table()
        .cloned()
        .unwrap_or_default();
    let empty = toml::Table::new();
    for section in ["model", "data"] {
        let a = saved
            .get(section)
            .and_then(|v| v.as_table())
            .unwrap_or(&empty);
        let b = now
            .get(section)
            .and_then(|v| v.as_table())
            .unwrap_or(&empty);
        for key in a.keys().chain(b.keys()) {
            if a.get(key) != b.get(key) {
                return Err(format!("{section}.{key}"));
            }
        }
    }
    let a = saved
        .get("train")
        .and_then(|v| v.as_table())
        .unwrap_or(&empty);
    let b = now
        .get("train")
        .and_then(|v| v.as_table())
        .unwrap_or(&empty);
    for key in [
        "seed",
        "batch_size",
        "epochs",
        "lr",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "beta1",
        "beta2",
        "eps",
        "clip_norm",
        "freeze_variance_after",
    ] {
        if a.get(key) != b.get(key) {
            return Err(format!("train.{key}"));
        }
    }
    Ok(())
}

/// How far one checkpoint's parameters are from another's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamDiff {
    /// Largest `|a - b| / max(max |a| of the parameter, 1e-6)` over every element.
    pub max_rel_diff: f64,
    /// The parameter where it occurs.
    pub worst: String,
    /// Largest absolute difference.
    pub max_abs_diff: f64,
}

/// Compares the parameters of two training states of one model, `b` loaded from `b_path`.
/// Errors name that checkpoint and the first parameter it lacks or holds at another size.
pub fn param_diff(a: &TrainState, b: &TrainState, b_path: &Path) -> Result<ParamDiff, RunError> {
    let mut out = ParamDiff {
        max_rel_diff: 0.0,
        worst: String::new(),
        max_abs_diff: 0.0,
    };
    if a.values.len() != b.values.len() {
        return Err(bad(
            b_path,
            format!(
                "holds {} parameters, the other checkpoint {}",
                b.values.len(),
                a.values.len()
            ),
        ));
    }
    for (path, x) in &a.values {
        let y = b
            .values
            .get(path)
            .ok_or_else(|| bad(b_path, format!("lacks `{path}`")))?;
        if x.len() != y.len() {
            return Err(bad(
                b_path,
                format!(
                    "`{path}` has {} values, the other checkpoint {}",
                    y.len(),
                    x.len()
                ),
            ));
        }
        let scale = x.iter().fold(1e-6f64, |m, v| m.max(f64::from(v.abs())));
        let abs = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        out.max_abs_diff = out.max_abs_diff.max(abs);
        if abs / scale > out.max_rel_diff || abs.is_nan() {
            out.max_rel_diff = if abs.is_nan() {
                f64::INFINITY
            } else {
                abs / scale
            };
            out.worst = path.clone();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unsharded checkpoint read whole.
    fn load(path: &Path) -> Result<(PathBuf, Manifest, TrainState), RunError> {
        let (dir, manifest) = load_manifest(path)?;
        let state = load_state(&dir, &manifest)?;
        Ok((dir, manifest, state))
    }

    fn state() -> TrainState {
        let mut s = TrainState {
            shapes: BTreeMap::new(),
            values: BTreeMap::new(),
            adam_m: BTreeMap::new(),
            adam_v: BTreeMap::new(),
            optimizer_steps: 7,
            partition: vec![2, 2],
            compressor: vec![vec![1, 2, 3], vec![4]],
        };
        s.shapes.insert("w".into(), vec![2, 3]);
        s.values
            .insert("w".into(), (0..6).map(|i| i as f32).collect());
        s.adam_m.insert("w".into(), vec![0.5; 6]);
        s.adam_v.insert("w".into(), vec![0.25; 6]);
        s
    }

    fn manifest(step: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            layout: SavedLayout {
                dp: 2,
                tp: 1,
                pp: 1,
                virtual_stages: 1,
                schedule: "1f1b".into(),
                micro_batches: 1,
                dp_mode: "sync".into(),
                bucket_mb: 25.0,
            },
            progress: Progress {
                step,
                ..Default::default()
            },
            rng: RngState::of_seed(1),
            compressor: Some(SavedCompressor {
                method: "topk".into(),
                error_feedback: true,
                files: vec!["compress-rank0.bin".into(), "compress-rank1.bin".into()],
            }),
            files: Vec::new(),
            config: String::new(),
            sharded: None,
        }
    }

    #[test]
    fn saves_load_back_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for step in [3, 6, 9] {
            save(dir.path(), manifest(step), &state(), 2).unwrap();
        }
        let (found, m, s) = load(dir.path()).unwrap();
        assert_eq!(found, dir.path().join("step-00000009"));
        assert_eq!(m.progress.step, 9);
        assert_eq!(s, state());
        assert_eq!(s.compressor, state().compressor);
        assert!(!dir.path().join("step-00000003").exists());
        assert!(dir.path().join("step-00000006").exists());
        assert!(load(&dir.path().join("step-00000006")).is_ok());
    }

    fn corrupted(edit: impl Fn(&Path)) -> String {
        let dir = tempfile::tempdir().unwrap();
        let saved = save(dir.path(), manifest(1), &state(), 1).unwrap();
        edit(&saved);
        load(&saved).unwrap_err().to_string()
    }

    #[test]
    fn corrupted_truncated_or_foreign_checkpoints_are_rejected() {
        let err = corrupted(|d| {
            let p = d.join(STATE);
            let mut b = std::fs::read(&p).unwrap();
            let last = b.len() - 1;
            b[last] ^= 0x40;
            std::fs::write(&p, b).unwrap();
        });
        assert!(
            err.contains("state.bin") && err.contains("SHA-256"),
            "{err}"
        );
        let err = corrupted(|d| {
            let p = d.join("compress-rank1.bin");
            std::fs::write(&p, []).unwrap();
        });
        assert!(
            err.contains("compress-rank1.bin") && err.contains("truncated"),
            "{err}"
        );
        let err = corrupted(|d| {
            let p = d.join(MANIFEST);
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        });
        assert!(
            err.contains("manifest.json") && err.contains("line"),
            "{err}"
        );
        let err = corrupted(|d| {
            let p = d.join(MANIFEST);
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
        });
        assert!(err.contains("version 99"), "{err}");
        let err = corrupted(|d| std::fs::remove_file(d.join(STATE)).unwrap());
        assert!(err.contains("state.bin"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = load(empty.path()).unwrap_err().to_string();
        assert!(err.contains("latest"), "{err}");
    }

    #[test]
    fn a_stale_temporary_folder_never_shadows_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), manifest(4), &state(), 2).unwrap();
        // A save that died half-way leaves only its temporary folder.
        let tmp = dir.path().join(".step-00000006.tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join(STATE), b"partial").unwrap();
        let (found, m, _) = load(dir.path()).unwrap();
        assert_eq!(
            (found, m.progress.step),
            (dir.path().join("step-00000004"), 4)
        );
    }

    #[test]
    fn a_resume_must_train_the_same_model() {
        let saved = crate::config::RunConfig::default();
        let text = toml::to_string(&saved).unwrap();
        let mut layout_changed = saved.clone();
        layout_changed.parallel.dp = 4;
        layout_changed.train.max_steps = 10;
        assert_eq!(check_compatible(&text, &layout_changed), Ok(()));
        let mut model_changed = saved.clone();
        model_changed.model.d_model = Some(128);
        assert_eq!(
            check_compatible(&text, &model_changed),
            Err("model.d_model".into())
        );
        let mut seed_changed = saved;
        seed_changed.train.seed = 7;
        assert_eq!(
            check_compatible(&text, &seed_changed),
            Err("train.seed".into())
        );
    }
}
