//! Interaction data: readers, per-user sequences, the leave-one-out split, batches and a
//! synthetic generator.
//!
//! This file only declares and re-exports; the files depend on each other in one
//! direction: `read` <- `side` <- `split` <- {`batch`, `synthetic`, `graph`}.

mod batch;
mod graph;
mod read;
mod side;
mod split;
mod synthetic;

pub use batch::{Batch, BatchIter, EvalBatch, EvalSet, EvalSplit, TrainSet, WindowPolicy};
pub use graph::{Bipartite, InteractionGraph, Relation};
pub use read::{
    load_dir_or_file, read_interactions, read_item_features, InteractionFormat, RawInteraction,
};
pub use side::{
    load_side_info, read_items, read_users, side_files, Gender, ItemInfo, Side, SideFiles,
    SideInfo, SideRows, Unmatched, UserInfo, ML100K_GENRES,
};
pub use split::{Dataset, ItemFeatures, SplitUser, PAD};
pub use synthetic::SyntheticConfig;
