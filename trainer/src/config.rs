//! The run configuration: one TOML file, every field defaulted, unknown keys rejected,
//! `--set section.key=value` overrides, and validation that names the offending key.

pub use crate::compress_section::CompressSection;
pub(crate) use crate::config_error::invalid;
pub use crate::config_error::ConfigError;
use crate::elastic::ElasticNeeds;
pub use crate::elastic::ElasticSection;
use crate::fault_section::FaultKind;
pub use crate::fault_section::FaultSection;
pub use crate::features::FeaturesSection;
use crate::features::FusionNeeds;
use std::path::{Path, PathBuf};

use meshrec_model::config::{MlpKind, Positions};
use meshrec_model::data::{SyntheticConfig, WindowPolicy};
use meshrec_model::device::Residency;
use meshrec_model::{ModelConfig, NormKind, Preset};
use meshrec_pipeline::{DpMode, Recompute, ScheduleError, ScheduleKind, ScheduleSpec, ZeroStage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A data file or a folder holding one; `synthetic` generates data from `[data.synthetic]`.
    pub path: String,
    pub windows: WindowPolicy,
    /// Add genre tokens from the `.item` file to each item's representation.
    pub side_features: bool,
    pub synthetic: SyntheticConfig,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: "data/ml-100k".into(),
            windows: WindowPolicy::All,
            side_features: false,
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// `[model]`: a preset and optional overrides of its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub preset: String,
    pub max_len: Option<usize>,
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub d_ff: Option<usize>,
    pub dropout: Option<f64>,
    /// `rms` or `layer`.
    pub norm: Option<String>,
    /// `gelu` or `swiglu`.
    pub mlp: Option<String>,
    /// `learned` or `rope`.
    pub positions: Option<String>,
    pub init_std: Option<f64>,
    /// Multiply the input embedding by `sqrt(d_model)` (SASRec's convention).
    pub scale_embedding: Option<bool>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "small".into(),
            max_len: None,
            d_model: None,
            n_layers: None,
            n_heads: None,
            d_ff: None,
            dropout: None,
            norm: None,
            mlp: None,
            positions: None,
            init_std: None,
            scale_embedding: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip; 0 turns it off.
    pub clip_norm: f64,
    /// AdamW stops updating its second moment after this many steps (0: never), as 1-bit
    /// Adam does for compressed communication (see `AdamWConfig::freeze_variance_after`).
    /// 1-bit Adam freezes after a dense warm-up; frozen at the end of DGC's 100-step
    /// sparsity warm-up the ml-100k run diverged within an epoch (coordinates rarely sent
    /// had next to no second moment, so their first full update was huge).
    pub freeze_variance_after: u64,
    pub seed: u64,
    /// Epochs without a better valid NDCG@10 before stopping; 0 never stops early.
    pub patience: u64,
    /// `cpu`, `wgpu`, `cuda` or `cuda:N` (the `--device` flag and `BURN_DEVICE` override it).
    pub device: String,
    /// Stop after this many optimizer steps in total (0: no limit), checkpointing there;
    /// the learning-rate schedule still follows `epochs`.
    pub max_steps: u64,
    /// Activation recomputation: `none`, `selective` (the attention's scores and softmax
    /// are recomputed in backward) or `full` (each block keeps its input only). Runs on the
    /// mesh executor, also with one device.
    pub recompute: String,
    /// Where a single-device step runs its loss and AdamW: `auto` (host buffers on the CPU
    /// backend, the device on a GPU backend), `host` or `device`.
    pub residency: String,
}

impl TrainSection {
    /// The recomputation `train.recompute` names.
    pub fn recompute(&self) -> Result<Recompute, ConfigError> {
        Recompute::from_name(&self.recompute).map_err(|e| invalid("train.recompute", e.to_string()))
    }

    /// The residency `train.residency` names for a run on `device`.
    pub fn residency(&self, device: &burn::tensor::Device) -> Result<Residency, ConfigError> {
        Ok(self
            .named_residency()?
            .unwrap_or_else(|| Residency::for_device(device)))
    }

    /// `train.residency` checked: a placement, or `None` for `auto`.
    fn named_residency(&self) -> Result<Option<Residency>, ConfigError> {
        match self.residency.as_str() {
            "auto" => Ok(None),
            "host" => Ok(Some(Residency::Host)),
            "device" => Ok(Some(Residency::Device)),
            other => Err(invalid(
                "train.residency",
                format!("expected `auto`, `host` or `device`, got `{other}`"),
            )),
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 200,
            batch_size: 256,
            lr: 1e-3,
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            clip_norm: 1.0,
            freeze_variance_after: 0,
            seed: 42,
            patience: 10,
            device: "cpu".into(),
            max_steps: 0,
            recompute: "none".into(),
            residency: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    pub batch_size: usize,
    /// Evaluate on the valid split every this many epochs.
    pub every: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            batch_size: 256,
            every: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// The run's folder under `dir`.
    pub name: String,
    pub dir: PathBuf,
    /// On a mesh, draw this many steps (after two warm-up steps) of every rank's timeline
    /// into `timeline.svg` and `timeline.json` (`--timeline` sets 3).
    pub timeline_steps: u64,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            name: "run".into(),
            dir: "runs".into(),
            timeline_steps: 0,
        }
    }
}

/// The device mesh and pipeline schedule of a run (all 1: one device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    /// Micro-batches per global batch (per data-parallel rank).
    pub micro_batches: usize,
    /// `gpipe`, `1f1b` or `interleaved`.
    pub schedule: String,
    /// Model chunks per pipeline rank (interleaved only).
    pub virtual_stages: usize,
    /// `local` (one thread per device in this process) or `mpi` (one process per device,
    /// launched by `mpirun`).
    pub comm: String,
    /// Megatron's sequence parallelism inside each TP group: norms, dropout and the
    /// residual stream split along the sequence (which `tp` must divide), each TP
    /// all-reduce a reduce-scatter plus an all-gather.
    pub sequence_parallel: bool,
    /// Local engine: each rank runs burn's CPU kernels in a rayon pool of its own (`cores /
    /// world` threads, at least one). `false`: every rank's kernels go to the one global
    /// pool and the calling rank sleeps until they are done (a wake-up per kernel).
    pub rank_pools: bool,
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            dp: 1,
            tp: 1,
            pp: 1,
            micro_batches: 1,
            schedule: "1f1b".into(),
            virtual_stages: 1,
            comm: "local".into(),
            sequence_parallel: false,
            rank_pools: true,
        }
    }
}

impl ParallelSection {
    pub fn world_size(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// The pipeline schedule `[parallel]` names, with its virtual stages.
    pub fn schedule_spec(&self) -> Result<ScheduleSpec, ConfigError> {
        let kind: ScheduleKind = self
            .schedule
            .parse()
            .map_err(|e: ScheduleError| invalid("parallel.schedule", e.to_string()))?;
        Ok(ScheduleSpec {
            kind,
            virtual_stages: self.virtual_stages,
        })
    }
}

/// Data-parallel gradient synchronisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpSection {
    /// `sync` (gradients averaged every step, DDP), `async` (updates applied when their
    /// reduction arrives, at most `max_staleness` steps late) or `local_sgd` (each replica
    /// steps on its own gradients; parameters averaged every `sync_every` steps).
    pub mode: String,
    /// Size of a gradient all-reduce bucket in MB (PyTorch DDP's 25).
    pub bucket_mb: f64,
    /// Local SGD: steps between parameter averages.
    pub sync_every: u64,
    /// Async: the most steps an update may lag the step that computed it (0 = sync).
    pub max_staleness: u64,
    /// ZeRO stage (DeepSpeed's numbering): 0 none, 1 AdamW moments sharded over the DP
    /// group, 2 gradients too (buckets reduce-scattered). Sync DP only.
    pub zero: u64,
}

impl Default for DpSection {
    fn default() -> Self {
        Self {
            mode: "sync".into(),
            bucket_mb: 25.0,
            sync_every: 8,
            max_staleness: 2,
            zero: 0,
        }
    }
}

impl DpSection {
    /// The DP mode `[dp]` names, with its parameter.
    pub fn mode(&self) -> Result<DpMode, ConfigError> {
        DpMode::from_name(&self.mode, self.max_staleness, self.sync_every)
            .map_err(|e| invalid("dp.mode", e.to_string()))
    }

    /// The ZeRO stage `dp.zero` names.
    pub fn zero_stage(&self) -> Result<ZeroStage, ConfigError> {
        ZeroStage::from_number(self.zero).map_err(|e| invalid("dp.zero", e.to_string()))
    }

    /// Refuses ZeRO where its shards cannot work, with the reason.
    fn validate_zero(
        &self,
        mode: DpMode,
        method: &meshrec_compress::MethodConfig,
    ) -> Result<(), ConfigError> {
        let zero = self.zero_stage()?;
        if zero == ZeroStage::Off {
            return Ok(());
        }
        match mode {
            DpMode::Sync => {}
            DpMode::Async { .. } => {
                return Err(invalid(
                    "dp.zero",
                    "async DP lets replicas apply updates at their own pace, but a ZeRO update is \
                     only complete once every replica's shard is all-gathered: use dp.mode = \"sync\"",
                ))
            }
            DpMode::LocalSgd { .. } => {
                return Err(invalid(
                    "dp.zero",
                    "local SGD replicas hold different parameters between averages, so one \
                     replica's optimizer shard cannot update another's: use dp.mode = \"sync\"",
                ))
            }
        }
        if zero.shards_gradients() && *method != meshrec_compress::MethodConfig::Identity {
            return Err(invalid(
                "dp.zero",
                "ZeRO-2 reduce-scatters dense gradients, and a compressor's all-reduce protocol \
                 leaves every rank the whole gradient: use dp.zero = 1 with compression, or \
                 compress.method = \"none\"",
            ));
        }
        Ok(())
    }
}

/// `[checkpoint]`: training-state checkpoints for `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many steps (0: only at the end of each epoch).
    pub every_steps: u64,
    /// Checkpoints kept (the oldest are deleted once a newer one is complete).
    pub keep: usize,
    /// Each rank writes its own shard (its slices of the parameters and the moments it
    /// holds) instead of one rank writing the gathered state; any layout loads it, rank by
    /// rank, without holding the whole model. Runs on the mesh executor.
    pub sharded: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every_steps: 0,
            keep: 2,
            sharded: false,
        }
    }
}

/// `[balance]`: adaptive load balancing during training, from measured step times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSection {
    /// Move blocks between pipeline stages when measured stage times stay imbalanced.
    pub rebalance: bool,
    /// Split each global batch over DP replicas in proportion to their measured speed.
    pub dp_split: bool,
    /// Steps per measurement window (the balancers decide once per window).
    pub window_steps: u64,
    /// Stage imbalance (`max / mean - 1` of smoothed stage times) that counts.
    pub imbalance_threshold: f64,
    /// Consecutive imbalanced windows, with the same proposal, before acting.
    pub patience: u32,
    /// Standard errors of the measured window-to-window jitter a gain must clear on top
    /// of 5% (0: act on any gain above 5%).
    pub noise_margin: f64,
}

impl Default for BalanceSection {
    fn default() -> Self {
        Self {
            rebalance: false,
            dp_split: false,
            window_steps: 4,
            imbalance_threshold: 0.1,
            patience: 3,
            noise_margin: 2.0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub data: DataSection,
    pub model: ModelSection,
    pub parallel: ParallelSection,
    pub dp: DpSection,
    pub compress: CompressSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub output: OutputSection,
    pub checkpoint: CheckpointSection,
    pub balance: BalanceSection,
    pub fault: FaultSection,
    pub elastic: ElasticSection,
    pub features: FeaturesSection,
}

/// Parses a `--set` value as a TOML value, falling back to a plain string.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl RunConfig {
    /// Whether the run needs the mesh executor (segments, graph cuts) rather than the plain
    /// one-device step: several ranks, recomputation (which the executor's graph cuts
    /// carry out), or sharded checkpoints (written per rank).
    pub fn uses_mesh_executor(&self) -> bool {
        self.parallel.world_size() > 1
            || self.train.recompute != "none"
            || self.checkpoint.sharded
            || self.elastic.enabled
    }

    /// Reads `path` (if any), applies the overrides, and checks every value.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        Self::from_toml(&text, &origin, overrides)
    }

    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::BadOverride(o.clone()));
            }
            let mut node = &mut table;
            for part in &parts[..parts.len() - 1] {
                let entry = node
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                node = entry
                    .as_table_mut()
                    .ok_or_else(|| invalid(key, format!("`{part}` is not a section")))?;
            }
            node.insert(
                parts[parts.len() - 1].to_string(),
                parse_value(value.trim()),
            );
        }
        let config: RunConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.into(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(invalid("train.batch_size", "must be at least 1"));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(invalid("train.lr", "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(invalid("train.min_lr_ratio", "must be in [0, 1]"));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return Err(invalid("train.beta1", "betas must be in [0, 1)"));
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(invalid("train.eps", "must be positive"));
        }
        if !(t.clip_norm.is_finite() && t.clip_norm >= 0.0) {
            return Err(invalid("train.clip_norm", "must be zero (off) or positive"));
        }
        if self.eval.batch_size == 0 || self.eval.every == 0 {
            return Err(invalid(
                "eval.batch_size",
                "eval.batch_size and eval.every must be at least 1",
            ));
        }
        if self.output.name.is_empty()
            || self.output.name.contains(['/', '\\'])
            || self.output.name == ".."
        {
            return Err(invalid("output.name", "must be a plain folder name"));
        }
        let p = &self.parallel;
        for (key, v) in [
            ("parallel.dp", p.dp),
            ("parallel.tp", p.tp),
            ("parallel.pp", p.pp),
            ("parallel.micro_batches", p.micro_batches),
            ("parallel.virtual_stages", p.virtual_stages),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        p.schedule_spec()?
            .build(p.pp, p.micro_batches)
            .map_err(|e| invalid("parallel.schedule", e.to_string()))?;
        if p.comm != "local" && p.comm != "mpi" {
            return Err(invalid(
                "parallel.comm",
                format!("`{}`: expected local or mpi", p.comm),
            ));
        }
        if p.dp > 1 && t.batch_size < p.dp * p.micro_batches {
            return Err(invalid(
                "train.batch_size",
                format!(
                    "{} rows cannot fill dp {} × micro_batches {}",
                    t.batch_size, p.dp, p.micro_batches
                ),
            ));
        }
        t.recompute()?;
        t.named_residency()?;
        let mode = self.dp.mode()?;
        let method = self.compress.method_config()?;
        self.compress.validate_dgc(&method, p.dp, t.beta1)?;
        self.dp.validate_zero(mode, &method)?;
        self.elastic
            .check(&ElasticNeeds {
                dp: self.parallel.dp,
                sync_dp: mode == DpMode::Sync,
                zero: self.dp.zero_stage()? != ZeroStage::Off,
            })
            .map_err(|(key, message)| invalid(key, message))?;
        self.features
            .check(&FusionNeeds {
                tp: self.parallel.tp,
            })
            .map_err(|(key, message)| invalid(key, message))?;
        if self.fault.crash_kind == FaultKind::Hang && !self.elastic.enabled {
            return Err(invalid(
                "fault.crash_kind",
                "\"hang\" needs elastic.enabled = true: only an elastic run's watchdog ends a hang",
            ));
        }
        if matches!(mode, DpMode::LocalSgd { .. })
            && method != meshrec_compress::MethodConfig::Identity
        {
            return Err(invalid(
                "compress.method",
                "local SGD averages parameters, not gradients: leave compress.method = \"none\"",
            ));
        }
        if !(self.fault.slow_compute.is_finite() && self.fault.slow_compute >= 1.0) {
            return Err(invalid("fault.slow_compute", "must be a factor >= 1"));
        }
        let b = &self.balance;
        if (b.rebalance || b.dp_split) && (b.window_steps == 0 || b.patience == 0) {
            return Err(invalid(
                "balance.window_steps",
                "balance.window_steps and balance.patience must be at least 1",
            ));
        }
        for (key, v) in [
            ("balance.imbalance_threshold", b.imbalance_threshold),
            ("balance.noise_margin", b.noise_margin),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, "must be a finite number >= 0"));
            }
        }
        if b.rebalance && (p.pp < 2 || p.virtual_stages > 1) {
            return Err(invalid(
                "balance.rebalance",
                "moves blocks between pipeline stages: needs parallel.pp >= 2 and virtual_stages = 1",
            ));
        }
        if (b.rebalance || b.dp_split) && matches!(mode, DpMode::LocalSgd { .. }) {
            return Err(invalid(
                "balance.rebalance",
                "local SGD replicas hold different parameters between averages; balance sync or async DP",
            ));
        }
        if b.dp_split && p.dp < 2 {
            return Err(invalid("balance.dp_split", "needs parallel.dp >= 2"));
        }
        if self.checkpoint.keep == 0 {
            return Err(invalid("checkpoint.keep", "must be at least 1"));
        }
        for (key, rank, step) in [
            ("fault.nan_rank", self.fault.nan_rank, self.fault.nan_step),
            (
                "fault.crash_rank",
                self.fault.crash_rank,
                self.fault.crash_step,
            ),
            (
                "fault.slow_rank",
                self.fault.slow_rank,
                (self.fault.slow_ms > 0).then_some(0),
            ),
            (
                "fault.slow_compute_rank",
                self.fault.slow_compute_rank,
                (self.fault.slow_compute != 1.0).then_some(0),
            ),
        ] {
            if step.is_some() && rank >= p.world_size() {
                return Err(invalid(
                    key,
                    format!(
                        "rank {rank} is outside the world of {} ranks",
                        p.world_size()
                    ),
                ));
            }
        }
        if self.dp.sync_every == 0 {
            return Err(invalid("dp.sync_every", "must be at least 1"));
        }
        if !(self.dp.bucket_mb.is_finite() && self.dp.bucket_mb > 0.0) {
            return Err(invalid("dp.bucket_mb", "must be a positive number of MB"));
        }
        // Model keys are checked against a placeholder catalogue; the real size comes from data.
        self.model_config(1, None).map(|_| ())
    }

    /// Resolves `[model]` into a full model config for a catalogue of `num_items`.
    pub fn model_config(
        &self,
        num_items: usize,
        num_genres: Option<usize>,
    ) -> Result<ModelConfig, ConfigError> {
        let m = &self.model;
        let preset = Preset::parse(&m.preset).map_err(|e| invalid(e.key, e.message))?;
        let mut c = ModelConfig::preset(preset, num_items);
        c.max_len = m.max_len.unwrap_or(c.max_len);
        c.d_model = m.d_model.unwrap_or(c.d_model);
        c.n_layers = m.n_layers.unwrap_or(c.n_layers);
        c.n_heads = m.n_heads.unwrap_or(c.n_heads);
        c.d_ff = m.d_ff.unwrap_or(c.d_ff);
        c.dropout = m.dropout.unwrap_or(c.dropout);
        c.init_std = m.init_std.unwrap_or(c.init_std);
        c.scale_embedding = m.scale_embedding.unwrap_or(c.scale_embedding);
        if let Some(norm) = &m.norm {
            c.norm = match norm.as_str() {
                "rms" => NormKind::Rms,
                "layer" => NormKind::Layer,
                other => {
                    return Err(invalid(
                        "model.norm",
                        format!("`{other}`: expected rms or layer"),
                    ))
                }
            };
        }
        if let Some(mlp) = &m.mlp {
            c.mlp = match mlp.as_str() {
                "gelu" => MlpKind::Gelu,
                "swiglu" => MlpKind::SwiGlu,
                other => {
                    return Err(invalid(
                        "model.mlp",
                        format!("`{other}`: expected gelu or swiglu"),
                    ))
                }
            };
        }
        if let Some(pos) = &m.positions {
            c.positions = match pos.as_str() {
                "learned" => Positions::Learned,
                "rope" => Positions::Rope,
                other => {
                    return Err(invalid(
                        "model.positions",
                        format!("`{other}`: expected learned or rope"),
                    ))
                }
            };
        }
        c.num_genres = if self.data.side_features {
            num_genres.or(Some(1))
        } else {
            None
        };
        c.validate().map_err(|e| invalid(e.key, e.message))?;
        Ok(c)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.output.dir.join(&self.output.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        RunConfig::from_toml(text, "test.toml", &o)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = RunConfig::from_toml(
            "[train]\nepochs = 3\n",
            "t",
            &[
                "model.dropout=0.1".into(),
                "output.name=x".into(),
                "data.path=synthetic".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.model.dropout, Some(0.1));
        assert_eq!(c.output.name, "x");
        assert_eq!(c.data.path, "synthetic");
        assert_eq!(c.train.batch_size, 256);
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(err("[train]\nepochz = 3\n", &[]).contains("epochz"));
        assert!(err("[trian]\n", &[]).contains("trian"));
        assert!(err("", &["model.n_heads=3"]).contains("model.n_heads"));
        assert!(err("", &["model.max_len=0"]).contains("model.max_len"));
        assert!(err("", &["model.preset=huge"]).contains("model.preset"));
        assert!(err("", &["train.batch_size=0"]).contains("train.batch_size"));
        assert!(err("", &["train.lr=-1"]).contains("train.lr"));
        assert!(err("", &["model.norm=batch"]).contains("model.norm"));
        assert!(err("", &["epochs"]).contains("expected section.key=value"));
        assert!(err("[train]\nepochs = \"many\"\n", &[]).contains("epochs"));
    }

    #[test]
    fn dgc_corrections_are_checked_against_the_run() {
        let dgc = [
            "parallel.dp=2",
            "compress.method=\"topk\"",
            "compress.momentum_correction=0.9",
            "train.beta1=0",
        ];
        let ok = RunConfig::from_toml("", "t", &dgc.map(String::from)).unwrap();
        let opts = ok.compress.memory_options(2, 7);
        assert_eq!(
            (opts.momentum, opts.local_clip, opts.seed),
            (Some(0.9), None, 7)
        );
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            dgc.iter().chain(extra).copied().collect()
        };
        // AdamW's own momentum on top of the velocity is refused, as is a missing DP group,
        // a method without its own indices and momentum without the residual it lives in.
        let beta = err("", &with(&["train.beta1=0.9"]));
        assert!(beta.contains("compress.momentum_correction") && beta.contains("train.beta1"));
        assert!(err("", &with(&["parallel.dp=1"])).contains("parallel.dp >= 2"));
        assert!(err("", &with(&["compress.method=\"randk\""])).contains("topk, dgc_topk"));
        assert!(err("", &with(&["compress.error_feedback=false"])).contains("error_feedback"));
        assert!(err("", &with(&["compress.momentum_correction=1.0"])).contains("[0, 1)"));
        assert!(err(
            "",
            &["compress.method=\"powersgd\"", "compress.warmup_steps=5"]
        )
        .contains("compress.warmup_steps"));
        assert!(err("", &["compress.local_clip=-1"]).contains("compress.local_clip"));
        // Normalized selection: a decay in [0, 1), for a sparsifier only.
        let ns = RunConfig::from_toml(
            "",
            "t",
            &with(&[
                "compress.normalized_selection=0.999",
                "compress.layerwise=true",
            ])
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .unwrap()
        .compress
        .memory_options(2, 0);
        assert_eq!(
            (ns.normalized_selection, ns.layerwise_selection),
            (Some(0.999), true)
        );
        assert!(err("", &with(&["compress.normalized_selection=1.0"])).contains("[0, 1)"));
        let qsgd = err(
            "",
            &[
                "compress.method=\"qsgd\"",
                "compress.normalized_selection=0.9",
            ],
        );
        assert!(qsgd.contains("compress.normalized_selection") && qsgd.contains("topk"));
        let bf16 = RunConfig::from_toml(
            "",
            "t",
            &[
                "compress.sparse_values=\"bf16\"".into(),
                "compress.method=\"topk\"".into(),
            ],
        )
        .unwrap()
        .compress
        .memory_options(2, 0);
        assert!(bf16.bf16_values);
        assert!(err(
            "",
            &["compress.method=\"topk\"", "compress.sparse_values=\"f16\""]
        )
        .contains("expected f32 or bf16"));
        assert!(err(
            "",
            &[
                "compress.method=\"qsgd\"",
                "compress.sparse_values=\"bf16\""
            ]
        )
        .contains("compress.sparse_values"));
        // The local clip is the global norm scaled by dp^-1/2, as DGC scales it.
        let clip = RunConfig::from_toml("", "t", &["compress.local_clip=2.0".to_string()])
            .unwrap()
            .compress
            .memory_options(4, 0);
        assert_eq!(clip.local_clip, Some(1.0));
    }
}
