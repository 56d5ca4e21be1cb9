//! Where the workspace is, for every xtask module. Its own file, so the command modules
//! and `main.rs` depend on it rather than on each other.

use std::path::{Path, PathBuf};

/// The workspace root. `cargo run` sets `CARGO_MANIFEST_DIR` at run time; it is read
/// then, not baked in at compile time, because clones that share one target directory
/// (CI's and the developer's) overwrite each other's `xtask` binary.
pub fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
