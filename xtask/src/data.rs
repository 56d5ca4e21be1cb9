//! `cargo xtask data ml-100k`: MovieLens-100K into `data/ml-100k/`, from a folder, the
//! GroupLens archive, or the `recbole==1.2.1` wheel on PyPI, then verified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace::root;

const GROUPLENS: &str = "https://files.grouplens.org/datasets/movielens/ml-100k.zip";
/// RecBole's atomic files (the PyPI route) and GroupLens's originals (the archive route):
/// interactions plus the item and user side information (issue 15).
const FILES: [&str; 3] = ["ml-100k.inter", "ml-100k.item", "ml-100k.user"];
const GROUPLENS_FILES: [&str; 4] = ["u.data", "u.item", "u.user", "u.genre"];

fn dest() -> PathBuf {
    root().join("data/ml-100k")
}

/// Counts interactions, users and items of `ml-100k.inter` (RecBole) or `u.data`.
pub fn verify_ml100k(dir: &Path) -> Result<(usize, usize, usize)> {
    let (path, skip_header) = if dir.join("ml-100k.inter").is_file() {
        (dir.join("ml-100k.inter"), true)
    } else {
        (dir.join("u.data"), false)
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (mut users, mut items, mut n) = (HashSet::new(), HashSet::new(), 0);
    for (i, line) in text.lines().enumerate().skip(usize::from(skip_header)) {
        let mut f = line.split('\t');
        let (Some(u), Some(it)) = (f.next(), f.next()) else {
            bail!(
                "{}:{}: expected tab-separated user and item",
                path.display(),
                i + 1
            );
        };
        users.insert(u.to_string());
        items.insert(it.to_string());
        n += 1;
    }
    let side = [["ml-100k.item", "ml-100k.user"], ["u.item", "u.user"]];
    if !side
        .iter()
        .any(|pair| pair.iter().all(|f| dir.join(f).is_file()))
    {
        bail!(
            "{}: the side information is missing (ml-100k.item + ml-100k.user, or u.item + u.user)",
            dir.display()
        );
    }
    if (n, users.len(), items.len()) != (100_000, 943, 1_682) {
        bail!(
            "{}: found {n} interactions, {} users, {} items; MovieLens-100K has 100000, 943, 1682",
            path.display(),
            users.len(),
            items.len()
        );
    }
    Ok((n, users.len(), items.len()))
}

fn copy_from(dir: &Path) -> Result<()> {
    let out = dest();
    std::fs::create_dir_all(&out)?;
    let mut copied = 0;
    for name in FILES.iter().chain(GROUPLENS_FILES.iter()) {
        let src = dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("{}: holds neither ml-100k.inter nor u.data", dir.display());
    }
    Ok(())
}

fn try_grouplens() -> Result<()> {
    let tmp = std::env::temp_dir().join("meshrec-ml-100k.zip");
    let status = Command::new("curl")
        .args(["-fsSL", "--max-time", "60", "--connect-timeout", "10", "-o"])
        .arg(&tmp)
        .arg(GROUPLENS)
        .status()
        .context("curl is not installed")?;
    if !status.success() {
        bail!("download of {GROUPLENS} failed ({status})");
    }
    let members: Vec<String> = GROUPLENS_FILES
        .iter()
        .map(|f| format!("ml-100k/{f}"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    unzip(&tmp, &refs)
}

fn try_recbole_wheel() -> Result<()> {
    let dir = std::env::temp_dir().join("meshrec-recbole-wheel");
    std::fs::create_dir_all(&dir)?;
    let has_wheel = |d: &Path| {
        std::fs::read_dir(d)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".whl"))
    };
    if !has_wheel(&dir) {
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(&dir)
            .arg("recbole==1.2.1")
            .status()
            .context("python3 with pip is needed for the PyPI route")?;
        if !status.success() {
            bail!("pip download recbole==1.2.1 failed ({status})");
        }
    }
    let wheel = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip left no wheel")?;
    let members: Vec<String> = FILES
        .iter()
        .map(|f| format!("recbole/dataset_example/ml-100k/{f}"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    unzip(&wheel, &refs)
}

/// Extracts the named members of a zip archive flat into `data/ml-100k/` (Python's zipfile,
/// present wherever pip is).
fn unzip(archive: &Path, members: &[&str]) -> Result<()> {
    let out = dest();
    std::fs::create_dir_all(&out)?;
    let script = "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[1])\nfor m in sys.argv[3:]:\n    open(os.path.join(sys.argv[2], os.path.basename(m)), 'wb').write(z.read(m))\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(archive)
        .arg(&out)
        .args(members)
        .status()
        .context("python3 is needed to unpack the archive")?;
    if !status.success() {
        bail!("unpacking {} failed", archive.display());
    }
    Ok(())
}

/// One way of getting the files into `data/ml-100k/`.
type Route<'a> = Box<dyn Fn() -> Result<()> + 'a>;

/// Gets MovieLens-100K by the first route that works and verifies it.
pub fn fetch_ml100k(from: Option<&Path>) -> Result<()> {
    let mut failures = Vec::new();
    let routes: Vec<(&str, Route<'_>)> = match from {
        Some(dir) => vec![("--from", Box::new(move || copy_from(dir)))],
        None => vec![
            ("GroupLens archive", Box::new(try_grouplens)),
            ("PyPI wheel recbole==1.2.1", Box::new(try_recbole_wheel)),
        ],
    };
    for (name, route) in routes {
        match route().and_then(|()| verify_ml100k(&dest())) {
            Ok((n, u, i)) => {
                println!(
                    "ml-100k ready in {} via {name}: {n} interactions, {u} users, {i} items",
                    dest().display()
                );
                return Ok(());
            }
            Err(e) => {
                eprintln!("ml-100k via {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    bail!(
        "could not get MovieLens-100K ({}).\nDownload ml-100k.zip from GroupLens (or the RecBole atomic files ml-100k.inter/.item) \
         on a machine with internet access, unpack it, and run `cargo xtask data ml-100k --from <folder>`.",
        failures.join("; ")
    )
}
