//! The sentence encoder against references: a tiny random BERT written in Hugging Face's
//! safetensors layout and run by a plain-Rust BERT, a hand-made WordPiece vocabulary, and (with
//! the real weights fetched) all-MiniLM-L6-v2 against sentence-transformers' vectors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use meshrec_text::{encode_cached, Bert, BertConfig, SentenceEncoder, TextError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};

/// Tensors by Hugging Face name: shape and values.
type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

const VOCAB: [&str; 16] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "run", "##ning", "!", ",", "the",
    "toy", "story", "(", ")",
];

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: VOCAB.len(),
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        position_embedding_type: "absolute".into(),
    }
}

/// Random weights under Hugging Face's `BertModel` names, PyTorch layout (`[out, in]`).
fn hf_weights(c: &BertConfig, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, rng: &mut ChaCha8Rng| {
        let n = shape.iter().product();
        let values = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        w.insert(name, (shape, values));
    };
    let (h, f) = (c.hidden_size, c.intermediate_size);
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![c.vocab_size, h],
        &mut rng,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![c.max_position_embeddings, h],
        &mut rng,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        &mut rng,
    );
    add("embeddings.LayerNorm.weight".into(), vec![h], &mut rng);
    add("embeddings.LayerNorm.bias".into(), vec![h], &mut rng);
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            add(format!("{p}{m}.weight"), vec![h, h], &mut rng);
            add(format!("{p}{m}.bias"), vec![h], &mut rng);
        }
        add(
            format!("{p}attention.output.LayerNorm.weight"),
            vec![h],
            &mut rng,
        );
        add(
            format!("{p}attention.output.LayerNorm.bias"),
            vec![h],
            &mut rng,
        );
        add(
            format!("{p}intermediate.dense.weight"),
            vec![f, h],
            &mut rng,
        );
        add(format!("{p}intermediate.dense.bias"), vec![f], &mut rng);
        add(format!("{p}output.dense.weight"), vec![h, f], &mut rng);
        add(format!("{p}output.dense.bias"), vec![h], &mut rng);
        add(format!("{p}output.LayerNorm.weight"), vec![h], &mut rng);
        add(format!("{p}output.LayerNorm.bias"), vec![h], &mut rng);
    }
    add("pooler.dense.weight".into(), vec![h, h], &mut rng);
    add("pooler.dense.bias".into(), vec![h], &mut rng);
    w
}

fn write_safetensors(path: &Path, weights: &Weights) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(k, (shape, v))| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// BERT as the paper and Hugging Face's `BertModel` define it, on plain vectors.
fn reference_forward(c: &BertConfig, w: &Weights, ids: &[u32]) -> Vec<Vec<f32>> {
    let h = c.hidden_size;
    let get = |k: &str| &w[k].1;
    // PyTorch linear: y = x W^T + b with W [out, in].
    let linear = |x: &[f32], name: &str| -> Vec<f32> {
        let (shape, weight) = &w[&format!("{name}.weight")];
        let bias = get(&format!("{name}.bias"));
        (0..shape[0])
            .map(|o| {
                bias[o]
                    + (0..shape[1])
                        .map(|i| weight[o * shape[1] + i] * x[i])
                        .sum::<f32>()
            })
            .collect()
    };
    let norm = |x: &[f32], name: &str| -> Vec<f32> {
        let (g, b) = (get(&format!("{name}.weight")), get(&format!("{name}.bias")));
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (var + c.layer_norm_eps as f32).sqrt();
        x.iter()
            .enumerate()
            .map(|(i, v)| (v - mean) * inv * g[i] + b[i])
            .collect()
    };
    let add = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
    let row = |name: &str, r: usize| get(name)[r * h..(r + 1) * h].to_vec();
    let mut x: Vec<Vec<f32>> = ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            let e = add(
                &add(
                    &row("embeddings.word_embeddings.weight", id as usize),
                    &row("embeddings.position_embeddings.weight", pos),
                ),
                &row("embeddings.token_type_embeddings.weight", 0),
            );
            norm(&e, "embeddings.LayerNorm")
        })
        .collect();
    let heads = c.num_attention_heads;
    let dh = h / heads;
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        let q: Vec<_> = x
            .iter()
            .map(|t| linear(t, &format!("{p}attention.self.query")))
            .collect();
        let k: Vec<_> = x
            .iter()
            .map(|t| linear(t, &format!("{p}attention.self.key")))
            .collect();
        let v: Vec<_> = x
            .iter()
            .map(|t| linear(t, &format!("{p}attention.self.value")))
            .collect();
        let mut ctx = vec![vec![0.0f32; h]; x.len()];
        for hd in 0..heads {
            let r = hd * dh..(hd + 1) * dh;
            for i in 0..x.len() {
                let scores: Vec<f32> = (0..x.len())
                    .map(|j| {
                        q[i][r.clone()]
                            .iter()
                            .zip(&k[j][r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (dh as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = exp.iter().sum();
                for j in 0..x.len() {
                    for (d, out) in r.clone().zip(ctx[i][r.clone()].iter_mut()) {
                        *out += exp[j] / total * v[j][d];
                    }
                }
            }
        }
        x = x
            .iter()
            .zip(&ctx)
            .map(|(t, cx)| {
                let a = norm(
                    &add(&linear(cx, &format!("{p}attention.output.dense")), t),
                    &format!("{p}attention.output.LayerNorm"),
                );
                let inner: Vec<f32> = linear(&a, &format!("{p}intermediate.dense"))
                    .iter()
                    .map(|&z| 0.5 * z * (1.0 + libm::erff(z / std::f32::consts::SQRT_2)))
                    .collect();
                norm(
                    &add(&linear(&inner, &format!("{p}output.dense")), &a),
                    &format!("{p}output.LayerNorm"),
                )
            })
            .collect();
    }
    x
}

fn mean_pool_normalised(tokens: &[Vec<f32>]) -> Vec<f32> {
    let h = tokens[0].len();
    let mut m = vec![0.0f32; h];
    for t in tokens {
        m.iter_mut()
            .zip(t)
            .for_each(|(a, b)| *a += b / tokens.len() as f32);
    }
    let n = m.iter().map(|x| x * x).sum::<f32>().sqrt();
    m.iter().map(|x| x / n).collect()
}

/// A `tokenizer.json` as Hugging Face writes it for BERT (lower-casing normaliser, BERT
/// pre-tokeniser, WordPiece, `[CLS] … [SEP]`), over [`VOCAB`].
fn tiny_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i.into()))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// A model folder of the tiny BERT (config, tokenizer, weights, sentence-transformers files).
fn tiny_model_dir(seed: u64) -> (tempfile::TempDir, Weights) {
    let dir = tempfile::tempdir().unwrap();
    let c = tiny_config();
    let config = serde_json::json!({
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "model_type": "bert"
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    std::fs::write(
        dir.path().join("modules.json"),
        r#"[{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Pooling"}, {"type": "sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    let weights = hf_weights(&c, seed);
    write_safetensors(&dir.path().join("model.safetensors"), &weights);
    (dir, weights)
}

fn device() -> Device {
    Device::default()
}

#[test]
fn wordpiece_splits_as_bert_does() {
    let (dir, _) = tiny_model_dir(1);
    let encoder = SentenceEncoder::load(dir.path(), &device()).unwrap();
    // Lower-cased, punctuation split off, longest-match subwords, unknown words as [UNK].
    assert_eq!(
        encoder.tokenize("Unaffable, RUNNING!").unwrap(),
        vec![2, 4, 5, 6, 10, 7, 8, 9, 3]
    );
    assert_eq!(
        encoder.tokenize("Toy Story (zebra)").unwrap(),
        vec![2, 12, 13, 14, 1, 15, 3]
    );
}

#[test]
fn hugging_face_weights_load_and_match_a_plain_bert() {
    let (dir, weights) = tiny_model_dir(7);
    let encoder = SentenceEncoder::load(dir.path(), &device()).unwrap();
    let texts = ["unaffable, running!", "toy story", "the"];
    let got = encoder.encode(&texts.map(String::from), 8).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = encoder.tokenize(text).unwrap();
        let want = mean_pool_normalised(&reference_forward(&tiny_config(), &weights, &ids));
        let row = &got[i * 8..(i + 1) * 8];
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{text}: {row:?} vs {want:?}");
        }
    }
}

#[test]
fn padding_in_a_batch_changes_no_vector() {
    let (dir, _) = tiny_model_dir(3);
    let encoder = SentenceEncoder::load(dir.path(), &device()).unwrap();
    let texts: Vec<String> = ["the", "unaffable running toy story, the story!", "toy"]
        .map(String::from)
        .into();
    let batched = encoder.encode(&texts, 3).unwrap();
    let alone = encoder.encode(&texts, 1).unwrap();
    for (a, b) in batched.iter().zip(&alone) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn a_missing_or_incomplete_model_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    let err = SentenceEncoder::load(empty.path(), &device())
        .err()
        .unwrap();
    assert!(matches!(err, TextError::NotFetched { .. }));
    assert!(err.to_string().contains("cargo xtask data minilm"), "{err}");

    let (dir, mut weights) = tiny_model_dir(2);
    weights.remove("encoder.layer.1.intermediate.dense.weight");
    write_safetensors(&dir.path().join("model.safetensors"), &weights);
    let err = Bert::load(
        &tiny_config(),
        &dir.path().join("model.safetensors"),
        &device(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("layers.1.intermediate.weight"),
        "{err}"
    );

    let (dir, _) = tiny_model_dir(2);
    std::fs::write(dir.path().join("config.json"), r#"{"vocab_size": 16}"#).unwrap();
    let err = SentenceEncoder::load(dir.path(), &device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn the_cache_is_reused_until_the_texts_change() {
    let (dir, _) = tiny_model_dir(5);
    let cache = dir.path().join("items.textcache");
    let texts: Vec<String> = vec!["toy story".into(), "the".into()];
    let first = encode_cached(dir.path(), &texts, &cache, &device()).unwrap();
    let stamp = std::fs::metadata(&cache).unwrap().modified().unwrap();
    let again = encode_cached(dir.path(), &texts, &cache, &device()).unwrap();
    assert_eq!(first, again);
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        stamp
    );
    let other: Vec<String> = vec!["toy".into()];
    let changed = encode_cached(dir.path(), &other, &cache, &device()).unwrap();
    assert_eq!(changed.rows(), 1);
}

/// The folder `cargo xtask data minilm` fills.
fn minilm_dir() -> PathBuf {
    std::env::var_os("MESHREC_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/minilm"))
}

#[test]
#[ignore = "needs the all-MiniLM-L6-v2 weights: `cargo xtask data minilm` runs it"]
fn minilm_matches_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let sentences: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
    let token_ids: Vec<Vec<u32>> = serde_json::from_value(fixture["token_ids"].clone()).unwrap();
    let vectors: Vec<Vec<f32>> = serde_json::from_value(fixture["vectors"].clone()).unwrap();
    let encoder = SentenceEncoder::load(&minilm_dir(), &device()).unwrap();
    assert_eq!(encoder.dim(), 384);
    let got = encoder.encode(&sentences, 4).unwrap();
    for (i, sentence) in sentences.iter().enumerate() {
        assert_eq!(
            encoder.tokenize(sentence).unwrap(),
            token_ids[i],
            "{sentence}"
        );
        let row = &got[i * 384..(i + 1) * 384];
        let dot: f32 = row.iter().zip(&vectors[i]).map(|(a, b)| a * b).sum();
        let norms = row.iter().map(|x| x * x).sum::<f32>().sqrt()
            * vectors[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = dot / norms;
        println!("cosine {cosine:.6}  {sentence}");
        assert!(cosine >= 0.999, "{sentence}: cosine {cosine}");
    }
}
