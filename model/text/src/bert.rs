//! A BERT encoder in burn (post-norm blocks, exact GELU, absolute positions), shaped so that a
//! Hugging Face `BertModel` checkpoint in safetensors loads into it by a few key renames.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::store::{KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::Deserialize;

use crate::error::TextError;

/// The fields of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "gelu_name")]
    pub hidden_act: String,
    #[serde(default = "absolute_name")]
    pub position_embedding_type: String,
}

fn gelu_name() -> String {
    "gelu".into()
}

fn absolute_name() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads `config.json`, refusing variants this encoder does not implement.
    pub fn read(path: &Path) -> Result<Self, TextError> {
        let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| TextError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| TextError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only the exact `gelu`)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Bert {
        let h = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        Bert {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(self.vocab_size, h).init(device),
                position_embeddings: EmbeddingConfig::new(self.max_position_embeddings, h)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(self.type_vocab_size, h).init(device),
                layer_norm: norm(),
            },
            layers: (0..self.num_hidden_layers)
                .map(|_| BertLayer {
                    attention: BertAttention {
                        query: linear(h, h),
                        key: linear(h, h),
                        value: linear(h, h),
                        output: linear(h, h),
                        output_norm: norm(),
                        heads: self.num_attention_heads,
                    },
                    intermediate: linear(h, self.intermediate_size),
                    output: linear(self.intermediate_size, h),
                    output_norm: norm(),
                })
                .collect(),
        }
    }
}

#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
    #[module(skip)]
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
}

/// The encoder without the pooler (sentence encoders pool the token states themselves).
#[derive(Module, Debug)]
pub struct Bert {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
}

/// Hugging Face's `BertModel` keys -> this module's paths (linear weights are transposed and
/// norm `weight`/`bias` become `gamma`/`beta` by burn's PyTorch adapter).
const HF_KEYS: [(&str, &str); 8] = [
    (r"^encoder\.layer\.(\d+)\.", "layers.$1."),
    (r"\.LayerNorm\.", ".layer_norm."),
    (r"attention\.self\.(query|key|value)\.", "attention.$1."),
    (r"attention\.output\.dense\.", "attention.output."),
    (r"attention\.output\.layer_norm\.", "attention.output_norm."),
    (r"intermediate\.dense\.", "intermediate."),
    (r"^(layers\.\d+)\.output\.dense\.", "$1.output."),
    (r"^(layers\.\d+)\.output\.layer_norm\.", "$1.output_norm."),
];

/// Tensors of a `BertModel` checkpoint the encoder does not use.
fn unused_is_expected(key: &str) -> bool {
    key.starts_with("pooler.") || key == "embeddings.position_ids"
}

impl Bert {
    /// Loads a Hugging Face BERT checkpoint (`model.safetensors`); every parameter of the
    /// module must be found in the file, and nothing but the pooler may be left over.
    pub fn load(config: &BertConfig, weights: &Path, device: &Device) -> Result<Self, TextError> {
        let weights_error = |message: String| TextError::Weights {
            path: weights.to_path_buf(),
            message,
        };
        if !weights.is_file() {
            return Err(weights_error("no such file".into()));
        }
        let mut model = config.init(device);
        let remapper = KeyRemapper::from_patterns(HF_KEYS.to_vec())
            .map_err(|e| weights_error(format!("key pattern: {e}")))?;
        let mut store = SafetensorsStore::from_file(weights.to_path_buf())
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(remapper);
        let result = model
            .load_from(&mut store)
            .map_err(|e| weights_error(e.to_string()))?;
        if !result.errors.is_empty() {
            let errors: Vec<String> = result.errors.iter().map(|e| format!("{e:?}")).collect();
            return Err(weights_error(errors.join("; ")));
        }
        if !result.missing.is_empty() {
            let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
            return Err(weights_error(format!(
                "parameters not in the file: {}",
                missing.join(", ")
            )));
        }
        let unexpected: Vec<&String> = result
            .unused
            .iter()
            .filter(|k| !unused_is_expected(k))
            .collect();
        if !unexpected.is_empty() {
            return Err(weights_error(format!(
                "tensors the encoder does not know: {unexpected:?}"
            )));
        }
        Ok(model)
    }

    /// Token states `[batch, seq, hidden]` of token ids `[batch, seq]`; `mask` is true at real
    /// tokens (padding is neither attended to nor, by the caller, pooled).
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Bool>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let e = &self.embeddings;
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device).unsqueeze::<2>();
        let types = Tensor::<2, Int>::zeros([1, s], &device);
        let x = e.word_embeddings.forward(ids)
            + e.position_embeddings.forward(positions)
            + e.token_type_embeddings.forward(types);
        let mut x = e.layer_norm.forward(x);
        let padding = mask.bool_not().reshape([b, 1, 1, s]);
        for layer in &self.layers {
            x = layer.forward(x, padding.clone());
        }
        x
    }
}

impl BertLayer {
    fn forward(&self, x: Tensor<3>, padding: Tensor<4, Bool>) -> Tensor<3> {
        let a = self.attention.forward(x, padding);
        let hidden = gelu(self.intermediate.forward(a.clone()));
        self.output_norm.forward(self.output.forward(hidden) + a)
    }
}

impl BertAttention {
    fn forward(&self, x: Tensor<3>, padding: Tensor<4, Bool>) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let dh = h / self.heads;
        let split = |t: Tensor<3>| t.reshape([b, s, self.heads, dh]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let scores = q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt();
        let scores = scores.mask_fill(padding.expand([b, self.heads, s, s]), f32::NEG_INFINITY);
        let context = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, s, h]);
        self.output_norm.forward(self.output.forward(context) + x)
    }
}
