//! The PyTorch peer (`../shared/peer/sasrec_torch.py`): where its script and virtual
//! environment are, and running it so that its JSON lines come back.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::workspace::root;

/// The peer's script, beside the repository (`../shared/peer`).
pub fn script() -> Result<PathBuf> {
    let path = root().join("../shared/peer/sasrec_torch.py");
    if !path.is_file() {
        bail!("the peer script is not at {}", path.display());
    }
    Ok(path)
}

/// The peer's Python: `target/peer-venv` as `../shared/peer/README.md` sets it up.
pub fn python() -> Result<PathBuf> {
    let path = root().join("target/peer-venv/bin/python");
    if !path.is_file() {
        bail!(
            "no peer environment at {}: set it up with\n\n    python3 -m venv target/peer-venv && target/peer-venv/bin/pip install torch numpy\n",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the peer with `args` (after the script) and returns its JSON output lines.
pub fn run(args: &[String]) -> Result<Vec<Value>> {
    let mut cmd = Command::new(python()?);
    cmd.arg(script()?).args(args).current_dir(root());
    eprintln!("$ peer {}", args.join(" "));
    let out = cmd.output().context("cannot start the peer")?;
    if !out.status.success() {
        bail!(
            "the peer failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
