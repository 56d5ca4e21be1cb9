//! Interaction data: readers, per-user sequences, the leave-one-out split, batches and a
//! synthetic generator.

mod batch;
mod read;
mod split;
mod synthetic;

pub use batch::{Batch, BatchIter, EvalBatch, EvalSet, EvalSplit, TrainSet, WindowPolicy};
pub use read::{load_dir_or_file, read_interactions, read_item_features, InteractionFormat};
pub use split::{Dataset, ItemFeatures, SplitUser};
pub use synthetic::SyntheticConfig;

/// Item id 0 is padding everywhere; real items are `1..=num_items`.
pub const PAD: u32 = 0;

/// One raw interaction as read from a file: external tokens, mapped to dense ids later.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub item: String,
    pub timestamp: f64,
    /// 1-based line of the file it came from; breaks timestamp ties in file order.
    pub line: usize,
}
