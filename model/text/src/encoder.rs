//! A sentence-transformers model: tokenizer, BERT, mean pooling over real tokens, then (when
//! the model's `modules.json` says so) L2 normalisation.

use std::path::{Path, PathBuf};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{Bert, BertConfig};
use crate::error::TextError;

/// The files a sentence-encoder folder must hold.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

pub struct SentenceEncoder {
    tokenizer: Tokenizer,
    bert: Bert,
    dim: usize,
    normalize: bool,
    device: Device,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TextError> {
    let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TextError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads an optional sentence-transformers file; absent means the default.
fn read_optional<T: serde::de::DeserializeOwned>(path: PathBuf) -> Result<Option<T>, TextError> {
    if path.is_file() {
        read_json(&path).map(Some)
    } else {
        Ok(None)
    }
}

impl SentenceEncoder {
    /// Loads the encoder in `dir` (the unpacked model folder) onto `device`, which should be
    /// a plain (non-autodiff) device: encoding never needs gradients.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, TextError> {
        let missing: Vec<&str> = REQUIRED_FILES
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(TextError::NotFetched {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let config = BertConfig::read(&dir.join("config.json"))?;
        let pooling_path = dir.join("1_Pooling/config.json");
        if let Some(p) = read_optional::<PoolingConfig>(pooling_path.clone())? {
            if !p.pooling_mode_mean_tokens || p.pooling_mode_cls_token || p.pooling_mode_max_tokens
            {
                return Err(TextError::Config {
                    path: pooling_path,
                    message: "only mean pooling over tokens is supported".into(),
                });
            }
        }
        let normalize = read_optional::<Vec<ModuleEntry>>(dir.join("modules.json"))?
            .is_some_and(|m| m.iter().any(|e| e.kind.ends_with(".Normalize")));
        let max_len = read_optional::<SentenceBertConfig>(dir.join("sentence_bert_config.json"))?
            .map_or(config.max_position_embeddings, |c| c.max_seq_length)
            .min(config.max_position_embeddings);
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_error = |message: String| TextError::Tokenizer {
            path: tokenizer_path.clone(),
            message,
        };
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| tokenizer_error(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        let bert = Bert::load(&config, &dir.join("model.safetensors"), device)?;
        Ok(Self {
            tokenizer,
            bert,
            dim: config.hidden_size,
            normalize,
            device: device.clone(),
        })
    }

    /// Builds an encoder from parts (tests: a small random BERT).
    pub fn from_parts(tokenizer: Tokenizer, bert: Bert, dim: usize, normalize: bool) -> Self {
        let device = bert.embeddings.word_embeddings.weight.device();
        Self {
            tokenizer,
            bert,
            dim,
            normalize,
            device,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Token ids of one text, `[CLS] … [SEP]`, truncated to the model's length.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("cannot tokenise {text:?}: {e}"))
    }

    /// Sentence vectors of `texts`, `batch` at a time: `[texts.len(), dim]` row-major.
    pub fn encode(&self, texts: &[String], batch: usize) -> Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        for chunk in texts.chunks(batch.max(1)) {
            let ids = chunk
                .iter()
                .map(|t| self.tokenize(t))
                .collect::<Result<Vec<_>, _>>()?;
            out.extend(self.encode_ids(&ids)?);
        }
        Ok(out)
    }

    /// Mean-pooled (and normalised) vectors of tokenised texts, padded to the longest.
    pub fn encode_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>, String> {
        let b = ids.len();
        let s = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = vec![0i64; b * s];
        let mut real = vec![false; b * s];
        for (row, tokens) in ids.iter().enumerate() {
            for (col, &t) in tokens.iter().enumerate() {
                flat[row * s + col] = i64::from(t);
                real[row * s + col] = true;
            }
        }
        let device = &self.device;
        let id_tensor = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, s]), device);
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(real, [b, s]), device);
        let states = self.bert.forward(id_tensor, mask.clone());
        let weight = mask.float().unsqueeze_dim::<3>(2);
        let summed = (states * weight.clone()).sum_dim(1).reshape([b, self.dim]);
        let counts = weight.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
        let pooled = summed / counts;
        let mut v: Vec<f32> = pooled
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| format!("reading the pooled vectors: {e:?}"))?;
        if self.normalize {
            for row in v.chunks_mut(self.dim) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(v)
    }
}
