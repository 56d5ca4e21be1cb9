//! Training windows, seeded shuffled batches and evaluation batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::split::{Dataset, PAD};
use crate::error::DataError;

/// Which windows of a user's training history become training sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowPolicy {
    /// Only the most recent `max_len` positions (SASRec's choice).
    Last,
    /// The whole history cut into consecutive windows of `max_len` from the end, so every
    /// training interaction is a target once per epoch.
    All,
}

/// All training sequences, right-padded to `seq_len` in flat row-major arrays.
/// `targets[i] == PAD` marks a position that carries no loss.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSet {
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl TrainSet {
    pub fn new(dataset: &Dataset, seq_len: usize, policy: WindowPolicy) -> Result<Self, DataError> {
        if seq_len == 0 {
            return Err(DataError::InvalidParameter {
                key: "max_len",
                message: "must be at least 1".into(),
            });
        }
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        for user in &dataset.users {
            let items = &user.train;
            let pairs = items.len().saturating_sub(1);
            let mut end = pairs;
            while end > 0 {
                let start = end.saturating_sub(seq_len);
                let len = end - start;
                inputs.extend_from_slice(&items[start..end]);
                inputs.extend(std::iter::repeat_n(PAD, seq_len - len));
                targets.extend_from_slice(&items[start + 1..end + 1]);
                targets.extend(std::iter::repeat_n(PAD, seq_len - len));
                end = start;
                if policy == WindowPolicy::Last {
                    break;
                }
            }
        }
        Ok(Self {
            seq_len,
            inputs,
            targets,
        })
    }

    pub fn len(&self) -> usize {
        self.inputs.len() / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Number of positions that carry a loss.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != PAD).count()
    }

    /// The seeded batch order of one epoch: the same `(seed, epoch)` always gives the same
    /// batches, whatever the layout that consumes them.
    pub fn epoch(&self, seed: u64, epoch: u64, batch_size: usize) -> BatchIter<'_> {
        let mut order: Vec<u32> = (0..self.len() as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        BatchIter {
            set: self,
            order,
            batch_size: batch_size.max(1),
            next: 0,
        }
    }

    /// Gathers the given rows into a batch.
    pub fn gather(&self, rows: &[u32]) -> Batch {
        let l = self.seq_len;
        let mut batch = Batch {
            batch_size: rows.len(),
            seq_len: l,
            inputs: Vec::with_capacity(rows.len() * l),
            targets: Vec::with_capacity(rows.len() * l),
        };
        for &r in rows {
            let r = r as usize * l;
            batch.inputs.extend_from_slice(&self.inputs[r..r + l]);
            batch.targets.extend_from_slice(&self.targets[r..r + l]);
        }
        batch
    }
}

/// One training batch: `inputs` and `targets` are `[batch_size, seq_len]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batch {
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != PAD).count()
    }

    /// Rows `start..end` of this batch (a micro-batch or a data-parallel shard).
    pub fn rows(&self, start: usize, end: usize) -> Batch {
        let l = self.seq_len;
        Batch {
            batch_size: end - start,
            seq_len: l,
            inputs: self.inputs[start * l..end * l].to_vec(),
            targets: self.targets[start * l..end * l].to_vec(),
        }
    }
}

/// Iterator over the batches of one epoch.
pub struct BatchIter<'a> {
    set: &'a TrainSet,
    order: Vec<u32>,
    batch_size: usize,
    next: usize,
}

impl BatchIter<'_> {
    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// Skips the first `n` batches (resuming mid-epoch).
    pub fn skip_batches(&mut self, n: usize) {
        self.next = (self.next + n * self.batch_size).min(self.order.len());
    }
}

impl Iterator for BatchIter<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.order.len() {
            return None;
        }
        let end = (self.next + self.batch_size).min(self.order.len());
        let batch = self.set.gather(&self.order[self.next..end]);
        self.next = end;
        Some(batch)
    }
}

/// Which held-out item an evaluation predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    Valid,
    Test,
}

/// Evaluation cases: for each evaluated user the most recent `seq_len` items before the
/// target (right-padded), the target, and every earlier item (masked out of the ranking,
/// as RecBole does for full ranking).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSet {
    pub seq_len: usize,
    pub contexts: Vec<u32>,
    pub lengths: Vec<usize>,
    pub targets: Vec<u32>,
    pub histories: Vec<Vec<u32>>,
}

/// A slice of an [`EvalSet`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalBatch<'a> {
    pub seq_len: usize,
    pub contexts: &'a [u32],
    pub lengths: &'a [usize],
    pub targets: &'a [u32],
    pub histories: &'a [Vec<u32>],
}

impl EvalBatch<'_> {
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

impl EvalSet {
    pub fn new(dataset: &Dataset, seq_len: usize, split: EvalSplit) -> Self {
        let mut set = Self {
            seq_len,
            contexts: Vec::new(),
            lengths: Vec::new(),
            targets: Vec::new(),
            histories: Vec::new(),
        };
        for user in &dataset.users {
            let (Some(valid), Some(test)) = (user.valid, user.test) else {
                continue;
            };
            let mut history = user.train.clone();
            let target = match split {
                EvalSplit::Valid => valid,
                EvalSplit::Test => {
                    history.push(valid);
                    test
                }
            };
            let start = history.len().saturating_sub(seq_len);
            let context = &history[start..];
            set.contexts.extend_from_slice(context);
            set.contexts
                .extend(std::iter::repeat_n(PAD, seq_len - context.len()));
            set.lengths.push(context.len());
            set.targets.push(target);
            set.histories.push(history);
        }
        set
    }

    /// The cases whose target `keep` accepts (the cold-item subset, say).
    pub fn filtered(&self, keep: impl Fn(u32) -> bool) -> Self {
        let mut out = Self {
            seq_len: self.seq_len,
            contexts: Vec::new(),
            lengths: Vec::new(),
            targets: Vec::new(),
            histories: Vec::new(),
        };
        for (i, &target) in self.targets.iter().enumerate() {
            if keep(target) {
                out.contexts
                    .extend_from_slice(&self.contexts[i * self.seq_len..(i + 1) * self.seq_len]);
                out.lengths.push(self.lengths[i]);
                out.targets.push(target);
                out.histories.push(self.histories[i].clone());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = EvalBatch<'_>> {
        let b = batch_size.max(1);
        (0..self.len()).step_by(b).map(move |start| {
            let end = (start + b).min(self.len());
            EvalBatch {
                seq_len: self.seq_len,
                contexts: &self.contexts[start * self.seq_len..end * self.seq_len],
                lengths: &self.lengths[start..end],
                targets: &self.targets[start..end],
                histories: &self.histories[start..end],
            }
        })
    }
}
