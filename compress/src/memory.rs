//! Per-tensor compression state: error-feedback residual, DGC momentum, PowerSGD's
//! warm start, the step counter behind shared seeds; serialisable for checkpoints.

use crate::error::CompressError;
use crate::methods::{Compressor, Ctx};
use crate::rng;
use crate::wire::{Apply, MethodId, Payload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Options of one tensor's memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryOptions {
    /// Keep what the compressor dropped and add it back next step.
    pub error_feedback: bool,
    /// DGC momentum correction: accumulate velocity `u = m u + g` locally and compress
    /// the accumulated velocity; sent coordinates have their velocity cleared
    /// (momentum factor masking). Needs error feedback and a sparsifying
    /// gather-then-sum method (top-k, DGC, threshold). The optimizer then runs without
    /// its own momentum.
    pub momentum: Option<f32>,
    /// DGC's local gradient clipping: scale this rank's gradient of the tensor down to
    /// this L2 norm before it enters the velocity and residual (DGC clips per tensor at
    /// the global threshold times `N^-1/2`; the caller passes the scaled value).
    pub local_clip: Option<f32>,
    /// DGC's sparsity warm-up: over the first this many steps the sparsifiers keep a
    /// fraction falling geometrically from 25% to their ratio (0: none).
    pub sparsity_warmup_steps: u64,
    /// The sparsifiers select within each layer of a bucket (DGC's layer-wise top-k)
    /// rather than over the whole bucket.
    pub layerwise_selection: bool,
    /// The sparsifiers rank coordinates by `|c| / sqrt(s)`, `s` this rank's running mean
    /// of its squared gradient with this decay (Adam's second moment, kept locally),
    /// instead of by `|c|`. Under Adam a coordinate moves by about its gradient over its
    /// own scale, so raw magnitude starves coordinates whose gradients are small but
    /// consistent; selection alone changes, every rank still sends its true values.
    pub normalized_selection: Option<f32>,
    /// The sparsifiers send their values as bf16: a kept value costs 2 bytes plus its
    /// index instead of 4; the rounding error stays in the error-feedback residual.
    pub bf16_values: bool,
    /// Run-level seed mixed into every shared seed (same on all ranks).
    pub seed: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            error_feedback: true,
            momentum: None,
            local_clip: None,
            sparsity_warmup_steps: 0,
            layerwise_selection: false,
            normalized_selection: None,
            bf16_values: false,
            seed: 0,
        }
    }
}

/// State of one tensor (or one bucket) across steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    id: u64,
    len: usize,
    step: u64,
    shape: Option<(usize, usize)>,
    /// The layers of a bucket as matrices (empty: one tensor), for per-layer PowerSGD.
    layers: Vec<(usize, usize)>,
    options: MemoryOptions,
    residual: Vec<f32>,
    velocity: Vec<f32>,
    /// Running mean of the squared gradient, for `normalized_selection`.
    grad_sq: Vec<f32>,
    warm_q: Vec<f32>,
}

/// Elements of a bucket of `(rows, cols)` layers (`None` on overflow).
fn layers_len(layers: &[(usize, usize)]) -> Option<usize> {
    layers
        .iter()
        .try_fold(0usize, |acc, &(r, c)| r.checked_mul(c)?.checked_add(acc))
}

fn mem_err(what: String) -> CompressError {
    CompressError::Memory(what)
}

impl Memory {
    /// Memory for tensor `id` (stable across ranks and restarts) of `len` elements.
    pub fn new(id: u64, len: usize, options: MemoryOptions) -> Result<Self, CompressError> {
        if let Some(c) = options.local_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(mem_err(format!(
                    "tensor {id}: local clip {c} must be a positive norm"
                )));
            }
        }
        if let Some(m) = options.momentum {
            if !(m.is_finite() && (0.0..1.0).contains(&m)) {
                return Err(mem_err(format!(
                    "tensor {id}: momentum {m} must be in [0, 1)"
                )));
            }
            if !options.error_feedback {
                return Err(mem_err(format!(
                    "tensor {id}: momentum correction needs error feedback"
                )));
            }
        }
        if let Some(b) = options.normalized_selection {
            if !(b.is_finite() && b > 0.0 && b < 1.0) {
                return Err(mem_err(format!(
                    "tensor {id}: normalized selection's decay {b} must be in (0, 1)"
                )));
            }
        }
        Ok(Self {
            id,
            len,
            step: 0,
            shape: None,
            layers: Vec::new(),
            options,
            residual: if options.error_feedback {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            velocity: if options.momentum.is_some() {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            grad_sq: if options.normalized_selection.is_some() {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            warm_q: Vec::new(),
        })
    }

    /// Sets the matrix view PowerSGD uses (`rows * cols` must equal the length).
    pub fn with_shape(mut self, rows: usize, cols: usize) -> Result<Self, CompressError> {
        if rows.checked_mul(cols) != Some(self.len) {
            return Err(mem_err(format!(
                "tensor {}: shape {rows} x {cols} does not match length {}",
                self.id, self.len
            )));
        }
        self.shape = Some((rows, cols));
        Ok(self)
    }

    /// Declares the tensor a bucket of layers, each `(rows, cols)` in order (PowerSGD then
    /// compresses each as its own matrix). A different layout than before (the bucket was
    /// refilled differently) drops the warm start, which belonged to the old layers.
    pub fn set_layers(&mut self, layers: &[(usize, usize)]) -> Result<(), CompressError> {
        if layers_len(layers) != Some(self.len) {
            return Err(mem_err(format!(
                "tensor {}: layers {layers:?} do not add up to length {}",
                self.id, self.len
            )));
        }
        if self.layers != layers {
            self.layers.clear();
            self.layers.extend_from_slice(layers);
            self.warm_q.clear();
        }
        Ok(())
    }

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn options(&self) -> &MemoryOptions {
        &self.options
    }
    /// The error-feedback residual (empty without error feedback).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
    /// The DGC velocity (empty without momentum correction).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }
    /// Seed shared by all ranks for the current step of this tensor.
    pub fn shared_seed(&self) -> u64 {
        rng::combine(rng::combine(self.options.seed, self.id), self.step)
    }

    fn check_len(&self, what: &'static str, n: usize) -> Result<(), CompressError> {
        if n == self.len {
            Ok(())
        } else {
            Err(CompressError::LengthMismatch {
                what,
                expected: self.len,
                actual: n,
            })
        }
    }

    /// Checks the method can run with these options.
    pub(crate) fn check_method(&self, method: MethodId) -> Result<(), CompressError> {
        let sparsifier = method.is_sparse();
        let needing_one = [
            (self.options.momentum.is_some(), "momentum correction"),
            (
                self.options.normalized_selection.is_some(),
                "normalized selection",
            ),
            (self.options.bf16_values, "bf16 sparse values"),
        ];
        match needing_one.into_iter().find(|&(on, _)| on && !sparsifier) {
            Some((_, what)) => Err(mem_err(format!(
                "tensor {}: {what} needs top-k, DGC or threshold, not {}",
                self.id,
                method.name()
            ))),
            None => Ok(()),
        }
    }

    /// Turns `grads` into the compensated gradient `c`: `g + residual` (with momentum
    /// correction, `u = m u + g` then `residual + u`; with local clipping, `g` clipped
    /// first). Afterwards the residual holds `c`
    /// too, ready for `absorb` to subtract what was sent.
    pub fn compensate(&mut self, grads: &mut [f32]) -> Result<(), CompressError> {
        self.check_len("gradient", grads.len())?;
        if let Some(clip) = self.options.local_clip {
            let norm = grads
                .iter()
                .map(|&g| g as f64 * g as f64)
                .sum::<f64>()
                .sqrt();
            if norm > clip as f64 {
                let scale = (clip as f64 / norm) as f32;
                grads.iter_mut().for_each(|g| *g *= scale);
            }
        }
        if let Some(b) = self.options.normalized_selection {
            for (s, &g) in self.grad_sq.iter_mut().zip(grads.iter()) {
                *s = b * *s + (1.0 - b) * g * g;
            }
        }
        if let Some(m) = self.options.momentum {
            for ((g, u), e) in grads
                .iter_mut()
                .zip(&mut self.velocity)
                .zip(&mut self.residual)
            {
                *u = m * *u + *g;
                *e += *u;
                *g = *e;
            }
        } else if self.options.error_feedback {
            for (g, e) in grads.iter_mut().zip(&mut self.residual) {
                *e += *g;
                *g = *e;
            }
        }
        Ok(())
    }

    /// After `compensate` and compressing `c` into `sent`: residual = c - decode(sent),
    /// and with momentum correction the velocity of sent coordinates is cleared.
    pub fn absorb(
        &mut self,
        sent: &Payload,
        compressor: &mut dyn Compressor,
    ) -> Result<(), CompressError> {
        if !self.options.error_feedback {
            return Ok(());
        }
        compressor.decompress_into(sent.as_bytes(), &mut self.residual, Apply::Sub)?;
        if self.options.momentum.is_some() {
            // The decode above left the sent indices (range-checked) in the scratch.
            for &i in compressor.scratch().indices() {
                self.velocity[i as usize] = 0.0;
            }
        }
        Ok(())
    }

    /// The context for this step: seeds, view, warm start.
    pub fn ctx(&mut self, rank: usize) -> Ctx<'_> {
        let shared = self.shared_seed();
        let warmup = self.warmup_progress();
        Ctx {
            shared_seed: shared,
            local_seed: rng::combine(shared, rank as u64 + 1),
            shape: self.shape,
            layers: (!self.layers.is_empty()).then_some(&self.layers[..]),
            warm: Some(&mut self.warm_q),
            warmup,
            layerwise_selection: self.options.layerwise_selection,
            selection_scale: (!self.grad_sq.is_empty()).then_some(&self.grad_sq[..]),
            bf16_values: self.options.bf16_values,
        }
    }

    /// Where this step sits in the sparsity warm-up (`None` once past it).
    fn warmup_progress(&self) -> Option<f64> {
        let total = self.options.sparsity_warmup_steps;
        (self.step < total).then(|| self.step as f64 / total as f64)
    }

    /// Splits into the context and the residual (both borrowed at once by `sync`).
    pub(crate) fn ctx_and_residual(&mut self, rank: usize) -> (Ctx<'_>, Option<&mut [f32]>) {
        let shared = self.shared_seed();
        let warmup = self.warmup_progress();
        let ctx = Ctx {
            shared_seed: shared,
            local_seed: rng::combine(shared, rank as u64 + 1),
            shape: self.shape,
            layers: (!self.layers.is_empty()).then_some(&self.layers[..]),
            warm: Some(&mut self.warm_q),
            warmup,
            layerwise_selection: self.options.layerwise_selection,
            selection_scale: (!self.grad_sq.is_empty()).then_some(&self.grad_sq[..]),
            bf16_values: self.options.bf16_values,
        };
        let res = if self.options.error_feedback {
            Some(&mut self.residual[..])
        } else {
            None
        };
        (ctx, res)
    }

    /// Marks the step done (advances the shared seed).
    pub fn advance(&mut self) {
        self.step += 1;
    }

    /// Checkpoint bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CompressError> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| CompressError::Serde(e.to_string()))
    }

    /// Restores from checkpoint bytes, checking internal consistency.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CompressError> {
        let (m, used): (Memory, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| CompressError::Serde(e.to_string()))?;
        if used != bytes.len() {
            return Err(CompressError::Serde(format!(
                "{} trailing bytes after memory state",
                bytes.len() - used
            )));
        }
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), CompressError> {
        let want = |on: bool| if on { self.len } else { 0 };
        if self.residual.len() != want(self.options.error_feedback)
            || self.velocity.len() != want(self.options.momentum.is_some())
            || self.grad_sq.len() != want(self.options.normalized_selection.is_some())
        {
            return Err(CompressError::Serde(format!(
                "tensor {}: state buffers do not match length {} and options",
                self.id, self.len
            )));
        }
        if !self.layers.is_empty() && layers_len(&self.layers) != Some(self.len) {
            return Err(CompressError::Serde(format!(
                "tensor {}: layers do not add up to length {}",
                self.id, self.len
            )));
        }
        if let Some((r, c)) = self.shape {
            if r.checked_mul(c) != Some(self.len) {
                return Err(CompressError::Serde(format!(
                    "tensor {}: shape {r} x {c} does not match length {}",
                    self.id, self.len
                )));
            }
        }
        Ok(())
    }
}

/// Memories of all tensors of a model, keyed by tensor id; the unit a checkpoint saves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryBank {
    tensors: BTreeMap<u64, Memory>,
}

impl MemoryBank {
    pub fn new() -> Self {
        Self::default()
    }
    /// The memory of tensor `id`, created with `options` on first use; a later call
    /// with another length is an error (the model changed under the state).
    pub fn get_or_insert(
        &mut self,
        id: u64,
        len: usize,
        options: MemoryOptions,
    ) -> Result<&mut Memory, CompressError> {
        use std::collections::btree_map::Entry;
        match self.tensors.entry(id) {
            Entry::Occupied(e) => {
                let m = e.into_mut();
                m.check_len("tensor", len)?;
                Ok(m)
            }
            Entry::Vacant(e) => Ok(e.insert(Memory::new(id, len, options)?)),
        }
    }
    pub fn get(&self, id: u64) -> Option<&Memory> {
        self.tensors.get(&id)
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Checkpoint bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CompressError> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| CompressError::Serde(e.to_string()))
    }
    /// Restores from checkpoint bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CompressError> {
        let (b, used): (MemoryBank, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| CompressError::Serde(e.to_string()))?;
        if used != bytes.len() {
            return Err(CompressError::Serde(format!(
                "{} trailing bytes after memory bank",
                bytes.len() - used
            )));
        }
        for (id, m) in &b.tensors {
            if *id != m.id {
                return Err(CompressError::Serde(format!(
                    "memory bank key {id} holds tensor {}",
                    m.id
                )));
            }
            m.validate()?;
        }
        Ok(b)
    }
}
