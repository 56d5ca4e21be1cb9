//! Model configuration, size presets and their validation.

use serde::{Deserialize, Serialize};

pub use meshrec_balance::shape::{MlpKind, Positions};

use crate::error::ConfigError;
use crate::fusion::FusionShape;

/// Normalisation of the pre-norm blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    Rms,
    Layer,
}

/// Named model sizes. `tiny` is for tests; `small` is the MovieLens-100K default; the large
/// ones exist for the simulator and planner (their catalogue size is configurable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Tiny,
    Small,
    Base,
    #[serde(rename = "100m")]
    M100,
    #[serde(rename = "350m")]
    M350,
    #[serde(rename = "1b")]
    B1,
}

impl Preset {
    pub const ALL: [Preset; 6] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Base,
        Preset::M100,
        Preset::M350,
        Preset::B1,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::M100 => "100m",
            Preset::M350 => "350m",
            Preset::B1 => "1b",
        }
    }

    pub fn parse(name: &str) -> Result<Self, ConfigError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
                ConfigError::new(
                    "model.preset",
                    format!("unknown preset `{name}` (known: {})", known.join(", ")),
                )
            })
    }
}

/// Everything that fixes the model's shape and behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Items in the catalogue, padding excluded (the embedding has `num_items + 1` rows).
    pub num_items: usize,
    pub max_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub dropout: f64,
    pub norm: NormKind,
    pub mlp: MlpKind,
    pub positions: Positions,
    /// Genre side-feature tokens: the number of genres, or `None` for item ids alone.
    pub num_genres: Option<usize>,
    /// Standard deviation of the normal initialisation (GPT-2's 0.02).
    pub init_std: f64,
    /// Multiply the input embedding by `sqrt(d_model)` before adding positions.
    #[serde(default)]
    pub scale_embedding: bool,
    /// Text vectors and graph fused into the item table (issue 15); none by default.
    #[serde(default)]
    pub fusion: FusionShape,
}

impl ModelConfig {
    pub fn preset(preset: Preset, num_items: usize) -> Self {
        let (d_model, n_layers, n_heads, d_ff, max_len, dropout) = match preset {
            Preset::Tiny => (16, 4, 4, 32, 8, 0.0),
            Preset::Small => (64, 2, 2, 256, 50, 0.2),
            Preset::Base => (256, 4, 4, 1024, 200, 0.1),
            Preset::M100 => (768, 12, 12, 3072, 200, 0.1),
            Preset::M350 => (1024, 24, 16, 4096, 200, 0.1),
            Preset::B1 => (2048, 20, 16, 8192, 200, 0.1),
        };
        Self {
            num_items,
            max_len,
            d_model,
            n_layers,
            n_heads,
            d_ff,
            dropout,
            norm: NormKind::Rms,
            mlp: MlpKind::Gelu,
            positions: Positions::Learned,
            num_genres: None,
            init_std: 0.02,
            scale_embedding: false,
            fusion: FusionShape::default(),
        }
    }

    /// Rows of the item table, padding included.
    pub fn vocab(&self) -> usize {
        self.num_items + 1
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key, v: usize| {
            if v == 0 {
                Err(ConfigError::new(key, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("data.num_items", self.num_items)?;
        positive("model.max_len", self.max_len)?;
        positive("model.d_model", self.d_model)?;
        positive("model.n_layers", self.n_layers)?;
        positive("model.n_heads", self.n_heads)?;
        positive("model.d_ff", self.d_ff)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ConfigError::new(
                "model.n_heads",
                format!(
                    "d_model {} is not divisible by n_heads {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if self.positions == Positions::Rope && !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::new(
                "model.positions",
                format!(
                    "rotary positions need an even head dimension, got {}",
                    self.head_dim()
                ),
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(ConfigError::new(
                "model.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(ConfigError::new(
                "model.init_std",
                "must be a positive number",
            ));
        }
        self.fusion.check(self.vocab())?;
        if self.num_genres == Some(0) {
            return Err(ConfigError::new(
                "model.side_features",
                "the data has no genres",
            ));
        }
        Ok(())
    }

    /// The shape the cost model, simulator and planner work with (formulas live there).
    pub fn shape(&self, name: &str) -> meshrec_balance::shape::ModelShape {
        meshrec_balance::shape::ModelShape {
            name: name.to_string(),
            vocab: self.vocab() as u64,
            d_model: self.d_model as u64,
            n_layers: self.n_layers as u32,
            n_heads: self.n_heads as u32,
            d_ff: self.d_ff as u64,
            seq_len: self.max_len as u64,
            mlp: self.mlp,
            positions: self.positions,
            tied_head: true,
            bias: false,
            precision: meshrec_balance::shape::Precision::fp32(),
        }
    }

    /// Parameters of the model (from the shared formulas, plus the genre table and the
    /// fusion's projection and graph nodes).
    pub fn num_params(&self) -> u64 {
        self.shape("model").params()
            + (self.num_genres.unwrap_or(0) * self.d_model) as u64
            + self.fusion.params(self.d_model)
    }

    /// Forward FLOPs per token, multiply-add = 2.
    pub fn fwd_flops_per_token(&self) -> f64 {
        self.shape("model").fwd_flops_per_token()
    }
}
