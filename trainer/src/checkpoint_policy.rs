//! When and how a run saves its training state, and how it takes one up again: the
//! cadence (every epoch's end, every `checkpoint.every_steps`, at `train.max_steps`), the
//! manifest's fixed parts (layout, RNG, compressor files, the config) built once from the
//! config, and `--resume`.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, Manifest, Progress, RngState, SavedCompressor, SavedLayout};
use crate::config::RunConfig;
use crate::error::RunError;
use crate::faults::FaultPoint;
use crate::stepper::Stepper;

/// A run's checkpointing, built once from its config.
pub struct CheckpointPolicy {
    root: PathBuf,
    every_steps: u64,
    keep: usize,
    layout: SavedLayout,
    rng: RngState,
    compressor: Option<SavedCompressor>,
    config_text: String,
    sharded: bool,
}

/// The layout a run's checkpoints record.
pub fn saved_layout(config: &RunConfig) -> SavedLayout {
    let p = &config.parallel;
    SavedLayout {
        dp: p.dp,
        tp: p.tp,
        pp: p.pp,
        virtual_stages: p.virtual_stages,
        schedule: p.schedule.clone(),
        micro_batches: p.micro_batches,
        dp_mode: config.dp.mode.clone(),
        bucket_mb: config.dp.bucket_mb,
    }
}

impl CheckpointPolicy {
    pub fn new(config: &RunConfig) -> Result<Self, RunError> {
        let compressed = config.parallel.dp > 1
            && config.compress.method_config()? != meshrec_compress::MethodConfig::Identity;
        let world = config.parallel.world_size();
        Ok(Self {
            root: config.run_dir().join("checkpoints"),
            every_steps: config.checkpoint.every_steps,
            keep: config.checkpoint.keep,
            layout: saved_layout(config),
            rng: RngState::of_seed(config.train.seed),
            compressor: compressed.then(|| SavedCompressor {
                method: config.compress.method.clone(),
                error_feedback: config.compress.error_feedback,
                files: (0..world).map(checkpoint::compressor_file).collect(),
            }),
            config_text: toml::to_string(config).unwrap_or_default(),
            sharded: config.checkpoint.sharded,
        })
    }

    /// The run's config as the manifest records it (TOML).
    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// Whether the step just done calls for a save inside the epoch (the epoch's end saves
    /// anyway, so its last step does not).
    pub fn due_mid_epoch(&self, progress: &Progress, batches_per_epoch: u64) -> bool {
        self.every_steps > 0
            && progress.step.is_multiple_of(self.every_steps)
            && progress.batch_in_epoch != batches_per_epoch
    }

    /// Saves the training state at `progress`. Collective on a mesh: every rank calls it;
    /// the leader writes the gathered state, or (sharded) every rank writes its own shard
    /// and the leader the manifest.
    pub fn save(&self, stepper: &mut dyn Stepper, progress: &Progress) -> Result<(), RunError> {
        let mut manifest = Manifest {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            layout: self.layout.clone(),
            progress: progress.clone(),
            rng: self.rng.clone(),
            compressor: self.compressor.clone(),
            files: Vec::new(),
            config: self.config_text.clone(),
            sharded: None,
        };
        let dir = if self.sharded {
            let tmp = checkpoint::tmp_dir(&self.root, progress.step);
            if stepper.is_leader() {
                checkpoint::begin_save(&self.root, progress.step)?;
            }
            let written = stepper.write_shards(&tmp, self.compressor.is_some())?;
            // Every shard is written, the manifest and the rename are not yet.
            stepper.fault_point(FaultPoint::Checkpoint, progress.step)?;
            let Some((files, index)) = written else {
                return Ok(());
            };
            manifest.sharded = Some(index);
            checkpoint::finish_save(&self.root, manifest, files, self.keep)?
        } else {
            let state = stepper.export_state()?;
            // The state is gathered, the leader has not written it yet.
            stepper.fault_point(FaultPoint::Checkpoint, progress.step)?;
            let Some(state) = state else {
                return Ok(());
            };
            checkpoint::save(&self.root, manifest, &state, self.keep)?
        };
        tracing::debug!(dir = %dir.display(), "checkpoint saved");
        Ok(())
    }

    /// Takes up the checkpoint at `path` (a checkpoint, a `checkpoints` folder or a run
    /// folder): refuses one that trained another model or data, accepts any layout, and
    /// returns where training stands.
    pub fn resume(
        &self,
        path: &Path,
        config: &RunConfig,
        stepper: &mut dyn Stepper,
    ) -> Result<Progress, RunError> {
        let (dir, manifest) = checkpoint::load_manifest(path)?;
        checkpoint::check_compatible(&manifest.config, config).map_err(|key| {
            RunError::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "`{key}` differs from the run that saved it: a resume must train the same model on the same data"
                ),
            }
        })?;
        let same_layout = manifest.layout == self.layout;
        match &manifest.sharded {
            Some(index) => stepper.import_shards(&dir, &manifest, index, same_layout)?,
            None => {
                let state = checkpoint::load_state(&dir, &manifest)?;
                stepper.import_state(&state, same_layout)?;
            }
        }
        if stepper.is_leader() {
            let l = &manifest.layout;
            tracing::info!(
                step = manifest.progress.step,
                epoch = manifest.progress.epoch + 1,
                saved_by = format!("dp{}·tp{}·pp{}", l.dp, l.tp, l.pp),
                "resuming from {}",
                dir.display()
            );
            if !same_layout && manifest.compressor.is_some() {
                tracing::warn!(
                    "the checkpoint's compressor memories follow its own DP buckets: error feedback restarts from zero in this layout"
                );
            }
        }
        Ok(manifest.progress)
    }
}
