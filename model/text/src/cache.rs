//! Item texts encoded once: a file of vectors beside the data, keyed by the SHA-256 of the
//! encoder's weights and of the texts, so a changed model or catalogue is re-encoded and a
//! stale file is never read as current.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::encoder::SentenceEncoder;
use crate::error::TextError;

/// Encoded texts: `rows × dim` floats, row-major, one row per text in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTable {
    pub dim: usize,
    pub values: Vec<f32>,
}

impl TextTable {
    pub fn rows(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// The first line of a cache file; the floats follow it as little-endian `f32`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    format: String,
    key: String,
    rows: usize,
    dim: usize,
}

const FORMAT: &str = "meshrec-text-cache-v1";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TextError + '_ {
    move |source| TextError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache key of `texts` under the encoder in `model_dir`.
pub fn cache_key(model_dir: &Path, texts: &[String]) -> Result<String, TextError> {
    let weights = model_dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(io(&weights))?;
    let mut hash = Sha256::new();
    hash.update(Sha256::digest(&bytes));
    for text in texts {
        hash.update((text.len() as u64).to_le_bytes());
        hash.update(text.as_bytes());
    }
    Ok(format!("{:x}", hash.finalize()))
}

/// Reads a cache file; `Ok(None)` when it belongs to another key (or does not exist).
fn read_cache(path: &Path, key: &str) -> Result<Option<TextTable>, TextError> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    let corrupt = |message: String| TextError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header: Header =
        serde_json::from_slice(&bytes[..newline]).map_err(|e| corrupt(format!("header: {e}")))?;
    if header.format != FORMAT || header.key != key {
        return Ok(None);
    }
    let body = &bytes[newline + 1..];
    if body.len() != header.rows * header.dim * 4 {
        return Err(corrupt(format!(
            "{} bytes of vectors, the header promises {} × {} floats",
            body.len(),
            header.rows,
            header.dim
        )));
    }
    let values = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Some(TextTable {
        dim: header.dim,
        values,
    }))
}

/// Writes the cache next to `path` and renames it into place, so a reader never sees half
/// a file.
fn write_cache(path: &Path, key: &str, table: &TextTable) -> Result<(), TextError> {
    let header = Header {
        format: FORMAT.into(),
        key: key.into(),
        rows: table.rows(),
        dim: table.dim,
    };
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut head = serde_json::to_vec(&header).map_err(|e| TextError::Cache {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    head.push(b'\n');
    file.write_all(&head).map_err(io(&tmp))?;
    file.write_all(bytemuck::cast_slice(&table.values))
        .map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The vectors of `texts` under the encoder in `model_dir`: read from `cache` when it holds
/// this key, else encoded on `device` and written there.
pub fn encode_cached(
    model_dir: &Path,
    texts: &[String],
    cache: &Path,
    device: &Device,
) -> Result<TextTable, TextError> {
    let key = cache_key(model_dir, texts)?;
    if let Some(table) = read_cache(cache, &key)? {
        tracing::info!(path = %cache.display(), rows = table.rows(), "text features from cache");
        return Ok(table);
    }
    let encoder = SentenceEncoder::load(model_dir, device)?;
    let started = std::time::Instant::now();
    let values = encoder
        .encode(texts, 64)
        .map_err(|message| TextError::Tokenizer {
            path: model_dir.join("tokenizer.json"),
            message,
        })?;
    let table = TextTable {
        dim: encoder.dim(),
        values,
    };
    tracing::info!(
        texts = texts.len(),
        seconds = started.elapsed().as_secs_f64(),
        "encoded item texts"
    );
    write_cache(cache, &key, &table)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_round_trips_and_another_key_misses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.cache");
        let table = TextTable {
            dim: 3,
            values: vec![1.0, -2.0, 0.5, 3.25, 0.0, -0.125],
        };
        write_cache(&path, "k1", &table).unwrap();
        assert_eq!(read_cache(&path, "k1").unwrap(), Some(table));
        assert_eq!(read_cache(&path, "k2").unwrap(), None);
    }

    #[test]
    fn a_truncated_cache_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.cache");
        let table = TextTable {
            dim: 2,
            values: vec![1.0; 4],
        };
        write_cache(&path, "k", &table).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_cache(&path, "k").unwrap_err().to_string();
        assert!(err.contains("text.cache") && err.contains("2 × 2"), "{err}");
    }
}
