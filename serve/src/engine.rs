//! The inference engine of one worker: the model's last-position representation for a batch
//! of histories, scores against the whole catalogue, and the top k by partial selection.
//!
//! With burn's kernels and an f32 table it runs exactly what offline evaluation runs
//! (`meshrec_model::step::last_hidden`, then `score_into` against the tied table), so its
//! ranking is the offline ranking; the host kernels and int8 are the accelerated variants.

use burn::module::Module;
use burn::tensor::Device;
use meshrec_model::data::{EvalBatch, PAD};
use meshrec_model::loss::{score_into, TableShard};
use meshrec_model::params::to_host as host;
use meshrec_model::step::last_hidden;
use meshrec_model::Recommender;

use crate::config::Kernels;
use crate::host_model::HostModel;
use crate::quant::Int8Rows;
use crate::topk::{top_k, Scored};

/// How an engine runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSettings {
    pub kernels: Kernels,
    pub int8: bool,
}

/// One recommendation to compute: the context the model reads (the most recent `max_len`
/// known items), the items left out of the answer and how many to return.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub context: Vec<u32>,
    pub exclude: Vec<u32>,
    pub k: usize,
}

impl Query {
    /// A query for a full history (dense ids, time order): the model reads its last
    /// `max_len` items; with `exclude_seen` every history item is left out of the answer.
    pub fn from_history(history: &[u32], max_len: usize, k: usize, exclude_seen: bool) -> Self {
        let start = history.len().saturating_sub(max_len);
        Self {
            context: history[start..].to_vec(),
            exclude: if exclude_seen {
                history.to_vec()
            } else {
                Vec::new()
            },
            k,
        }
    }
}

enum Forward {
    // Boxed: the module is far larger than the host model's handle.
    Burn {
        model: Box<Recommender>,
        device: Device,
    },
    Host(HostModel),
}

enum Table {
    F32(Vec<f32>),
    Int8(Int8Rows),
}

/// A model ready to answer queries on one device.
pub struct Engine {
    forward: Forward,
    table: Table,
    d: usize,
    vocab: usize,
    pub max_len: usize,
    pub settings: EngineSettings,
}

impl Engine {
    /// Builds an engine from a loaded model, moved to `device` for burn's kernels (the host
    /// kernels copy the weights out). int8 always runs on the host kernels.
    pub fn new(
        model: &Recommender,
        max_len: usize,
        settings: EngineSettings,
        device: &Device,
    ) -> Self {
        let [vocab, d] = model.embed.items.weight.dims();
        let f32_table = host(model.item_table());
        let (table, forward) = if settings.int8 {
            let q = Int8Rows::quantize(&f32_table, vocab, d);
            let forward = Forward::Host(HostModel::new(model, true, Some(&q)));
            (Table::Int8(q), forward)
        } else {
            let forward = match settings.kernels {
                Kernels::Burn => Forward::Burn {
                    model: Box::new(model.clone().valid().fork(device).no_grad()),
                    device: device.clone(),
                },
                Kernels::Host => Forward::Host(HostModel::new(model, false, None)),
            };
            (Table::F32(f32_table), forward)
        };
        Self {
            forward,
            table,
            d,
            vocab,
            max_len,
            settings,
        }
    }

    /// Items in the catalogue (padding excluded).
    pub fn num_items(&self) -> usize {
        self.vocab - 1
    }

    /// Bytes of the scoring table (int8 rows and their scales, or f32).
    pub fn table_bytes(&self) -> usize {
        match &self.table {
            Table::F32(t) => 4 * t.len(),
            Table::Int8(q) => q.bytes(),
        }
    }

    /// The final hidden state at the last position of each context, `[n, d]`. The model
    /// reads the most recent `max_len` items of each (non-empty) context, as offline
    /// evaluation does.
    pub fn last_hidden(&self, contexts: &[&[u32]]) -> Vec<f32> {
        let s = self.max_len;
        let contexts: Vec<&[u32]> = contexts
            .iter()
            .map(|c| &c[c.len().saturating_sub(s)..])
            .collect();
        match &self.forward {
            Forward::Host(m) => m.last_hidden(&contexts),
            Forward::Burn { model, device } => {
                // Right-padded to max_len, as offline evaluation pads: the same shapes give
                // the same numbers.
                let n = contexts.len();
                let mut flat = vec![PAD; n * s];
                let mut lengths = Vec::with_capacity(n);
                for (i, c) in contexts.iter().enumerate() {
                    flat[i * s..i * s + c.len()].copy_from_slice(c);
                    lengths.push(c.len());
                }
                let targets = vec![PAD; n];
                let histories = vec![Vec::new(); n];
                let batch = EvalBatch {
                    seq_len: s,
                    contexts: &flat,
                    lengths: &lengths,
                    targets: &targets,
                    histories: &histories,
                };
                last_hidden(model, &batch, device)
            }
        }
    }

    /// Scores of `n` hidden states against every row of the table, padding column
    /// included: `[n, num_items + 1]`.
    pub fn scores(&self, h: &[f32]) -> Vec<f32> {
        let n = h.len() / self.d;
        let mut out = vec![0f32; n * self.vocab];
        match &self.table {
            Table::F32(t) => score_into(&mut out, h, TableShard::new(t, self.d, 0)),
            Table::Int8(q) => q.score(h, &mut out),
        }
        out
    }

    /// The catalogue scores of each query's context (`[n, num_items + 1]`).
    pub fn score_contexts(&self, contexts: &[&[u32]]) -> Vec<f32> {
        self.scores(&self.last_hidden(contexts))
    }

    /// One forward for the whole batch, then each query's top k.
    pub fn recommend(&self, queries: &[Query]) -> Vec<Vec<Scored>> {
        if queries.is_empty() {
            return Vec::new();
        }
        let contexts: Vec<&[u32]> = queries.iter().map(|q| q.context.as_slice()).collect();
        let scores = self.score_contexts(&contexts);
        let v = self.vocab;
        queries
            .iter()
            .enumerate()
            .map(|(i, q)| top_k(&scores[i * v..(i + 1) * v], q.k, &q.exclude))
            .collect()
    }
}
