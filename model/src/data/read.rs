//! Readers for RecBole atomic files (`.inter`, `.item`) and MovieLens `u.data` / `ratings.dat`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Location};

/// One raw interaction as read from a file: external tokens, mapped to dense ids later.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub item: String,
    pub timestamp: f64,
    /// 1-based line of the file it came from; breaks timestamp ties in file order.
    pub line: usize,
}

/// The on-disk formats meshrec reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InteractionFormat {
    /// RecBole atomic `.inter`: tab-separated with a typed header (`user_id:token ...`).
    RecBoleInter,
    /// MovieLens-100K `u.data`: `user \t item \t rating \t timestamp`, no header.
    MovieLens100k,
    /// MovieLens-1M `ratings.dat`: `user::item::rating::timestamp`, no header.
    MovieLens1m,
}

impl InteractionFormat {
    /// Guesses the format from the file name.
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".inter") {
            Some(Self::RecBoleInter)
        } else if name == "u.data" {
            Some(Self::MovieLens100k)
        } else if name.ends_with(".dat") {
            Some(Self::MovieLens1m)
        } else {
            None
        }
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn malformed(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Malformed {
        at: Location {
            file: path.to_path_buf(),
            line,
        },
        message: message.into(),
    }
}

/// A parsed RecBole header: column name -> index, with the raw text for messages.
pub(crate) struct Header {
    pub(crate) columns: HashMap<String, usize>,
    raw: String,
    pub(crate) width: usize,
}

impl Header {
    pub(crate) fn parse(line: &str) -> Self {
        let mut columns = HashMap::new();
        let mut width = 0;
        for (i, field) in line.split('\t').enumerate() {
            let name = field.split(':').next().unwrap_or(field).trim().to_string();
            columns.insert(name, i);
            width = i + 1;
        }
        Self {
            columns,
            raw: line.trim().to_string(),
            width,
        }
    }

    pub(crate) fn require(&self, path: &Path, column: &str) -> Result<usize, DataError> {
        self.columns
            .get(column)
            .copied()
            .ok_or_else(|| DataError::MissingColumn {
                file: path.to_path_buf(),
                column: column.to_string(),
                found: self.raw.clone(),
            })
    }
}

/// Reads every interaction of one file in the given format.
pub fn read_interactions(
    path: &Path,
    format: InteractionFormat,
) -> Result<Vec<RawInteraction>, DataError> {
    let text = read_to_string(path)?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let mut out = Vec::new();
    match format {
        InteractionFormat::RecBoleInter => {
            let Some((_, header_line)) = lines.next() else {
                return Err(DataError::Empty {
                    path: path.to_path_buf(),
                });
            };
            let header = Header::parse(header_line);
            let user_col = header.require(path, "user_id")?;
            let item_col = header.require(path, "item_id")?;
            let time_col = header.require(path, "timestamp")?;
            for (line_no, line) in lines {
                if line.trim().is_empty() {
                    continue;
                }
                let fields: Vec<&str> = line.split('\t').collect();
                if fields.len() != header.width {
                    return Err(malformed(
                        path,
                        line_no,
                        format!(
                            "expected {} tab-separated fields as in the header, found {}",
                            header.width,
                            fields.len()
                        ),
                    ));
                }
                out.push(parse_fields(
                    path,
                    line_no,
                    fields[user_col],
                    fields[item_col],
                    fields[time_col],
                )?);
            }
        }
        InteractionFormat::MovieLens100k | InteractionFormat::MovieLens1m => {
            let sep = if format == InteractionFormat::MovieLens100k {
                "\t"
            } else {
                "::"
            };
            for (line_no, line) in lines {
                if line.trim().is_empty() {
                    continue;
                }
                let fields: Vec<&str> = line.split(sep).collect();
                if fields.len() != 4 {
                    return Err(malformed(
                        path,
                        line_no,
                        format!(
                            "expected 4 fields `user{sep}item{sep}rating{sep}timestamp`, found {}",
                            fields.len()
                        ),
                    ));
                }
                out.push(parse_fields(
                    path, line_no, fields[0], fields[1], fields[3],
                )?);
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

fn parse_fields(
    path: &Path,
    line: usize,
    user: &str,
    item: &str,
    timestamp: &str,
) -> Result<RawInteraction, DataError> {
    let user = user.trim();
    let item = item.trim();
    if user.is_empty() {
        return Err(malformed(path, line, "empty user id"));
    }
    if item.is_empty() {
        return Err(malformed(path, line, "empty item id"));
    }
    let timestamp: f64 = timestamp.trim().parse().map_err(|_| {
        malformed(
            path,
            line,
            format!("timestamp `{}` is not a number", timestamp.trim()),
        )
    })?;
    if !timestamp.is_finite() {
        return Err(malformed(path, line, "timestamp is not finite"));
    }
    Ok(RawInteraction {
        user: user.to_string(),
        item: item.to_string(),
        timestamp,
        line,
    })
}

/// Reads categorical side features of items from a RecBole `.item` file: for each item token,
/// the tokens of its `class` (MovieLens genres) or `genre` column.
pub fn read_item_features(path: &Path) -> Result<HashMap<String, Vec<String>>, DataError> {
    let text = read_to_string(path)?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let Some((_, header_line)) = lines.next() else {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    };
    let header = Header::parse(header_line);
    let item_col = header.require(path, "item_id")?;
    let feature_col = match header.columns.get("class").or(header.columns.get("genre")) {
        Some(&c) => c,
        None => header.require(path, "class")?,
    };
    let mut out = HashMap::new();
    for (line_no, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != header.width {
            return Err(malformed(
                path,
                line_no,
                format!(
                    "expected {} tab-separated fields as in the header, found {}",
                    header.width,
                    fields.len()
                ),
            ));
        }
        let item = fields[item_col].trim();
        if item.is_empty() {
            return Err(malformed(path, line_no, "empty item id"));
        }
        let tokens = fields[feature_col]
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if out.insert(item.to_string(), tokens).is_some() {
            return Err(malformed(
                path,
                line_no,
                format!("item `{item}` listed twice"),
            ));
        }
    }
    Ok(out)
}

/// Finds the interaction file (and the `.item` file beside it, if any) for a path that is
/// either a data file or a folder holding one.
pub fn load_dir_or_file(
    path: &Path,
) -> Result<(PathBuf, InteractionFormat, Option<PathBuf>), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let inter = if meta.is_dir() {
        let mut candidates: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| InteractionFormat::from_path(p).is_some())
            .collect();
        // A folder may hold several formats of one dataset: prefer RecBole, then u.data.
        candidates.sort_by_key(|p| match InteractionFormat::from_path(p) {
            Some(InteractionFormat::RecBoleInter) => 0,
            Some(InteractionFormat::MovieLens100k) => 1,
            _ => 2,
        });
        candidates
            .into_iter()
            .next()
            .ok_or_else(|| DataError::NoInteractions {
                path: path.to_path_buf(),
            })?
    } else {
        path.to_path_buf()
    };
    let format = InteractionFormat::from_path(&inter).ok_or_else(|| DataError::NoInteractions {
        path: inter.clone(),
    })?;
    let item_file = (format == InteractionFormat::RecBoleInter)
        .then(|| inter.with_extension("item"))
        .filter(|p| p.is_file());
    Ok((inter, format, item_file))
}
