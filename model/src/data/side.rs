//! Side information of items (title, release year, genres) and users (age, gender,
//! occupation): read from RecBole atomic files (`.item`, `.user`) or GroupLens's `u.item`,
//! `u.user` (with `u.genre`), with file:line errors, and joined to a dataset's dense ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::read::{malformed, read_to_string, Header, InteractionFormat};
use crate::error::DataError;

/// The 19 genres of MovieLens-100K in the order of `u.item`'s flag columns; used when no
/// `u.genre` lies beside `u.item` (the dataset's README fixes this order).
pub const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// What is known of one item. The title carries no year: RecBole's `.item` stores it apart,
/// and the `(year)` GroupLens appends to titles is moved into `year`, so both sources give
/// the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemInfo {
    pub title: String,
    /// `None` where the source marks the year unknown (one item of ml-100k).
    pub year: Option<u16>,
    /// Genre names in the source's order.
    pub genres: Vec<String>,
}

impl ItemInfo {
    /// The text a sentence encoder reads for the item, e.g.
    /// `Toy Story (1995) | Animation, Children's, Comedy`.
    pub fn text(&self) -> String {
        let mut text = self.title.clone();
        if let Some(year) = self.year {
            text.push_str(&format!(" ({year})"));
        }
        if !self.genres.is_empty() {
            text.push_str(" | ");
            text.push_str(&self.genres.join(", "));
        }
        text
    }
}

/// A user's gender as MovieLens records it (`M` or `F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gender {
    Female,
    Male,
}

/// What is known of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub age: u8,
    pub gender: Gender,
    pub occupation: String,
}

/// The rows of one side file by external token, each with its 1-based line.
#[derive(Debug, Clone, PartialEq)]
pub struct SideRows<T> {
    pub file: PathBuf,
    pub rows: HashMap<String, (usize, T)>,
}

/// A row of a side file whose token the interactions never name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmatched {
    pub token: String,
    pub line: usize,
}

/// Side rows joined to dense ids: `info[id]` for every dense id of the dataset. Missing rows
/// (`None`) and rows of tokens outside the dataset (`unmatched`) are kept, not dropped, so a
/// caller that needs every row says so with [`Side::complete`].
#[derive(Debug, Clone, PartialEq)]
pub struct Side<T> {
    pub file: PathBuf,
    /// What the rows call the entity (`item`, `user`), for messages.
    pub kind: &'static str,
    pub info: Vec<Option<T>>,
    /// The external token of each dense id, as the dataset has them.
    tokens: Vec<String>,
    /// Dense ids that do not take part (the padding item 0).
    reserved: usize,
    pub unmatched: Vec<Unmatched>,
}

impl<T> Side<T> {
    /// Joins rows to dense ids given the dataset's tokens; the first `reserved` ids (item 0,
    /// padding) take no row.
    pub fn join(rows: SideRows<T>, kind: &'static str, tokens: &[String], reserved: usize) -> Self {
        let SideRows { file, mut rows } = rows;
        let info = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| {
                if id < reserved {
                    None
                } else {
                    rows.remove(token).map(|(_, row)| row)
                }
            })
            .collect();
        let mut unmatched: Vec<Unmatched> = rows
            .into_iter()
            .map(|(token, (line, _))| Unmatched { token, line })
            .collect();
        unmatched.sort_by_key(|u| u.line);
        Self {
            file,
            kind,
            info,
            tokens: tokens.to_vec(),
            reserved,
            unmatched,
        }
    }

    /// The row of a dense id, if the file has one.
    pub fn get(&self, id: usize) -> Option<&T> {
        self.info.get(id).and_then(Option::as_ref)
    }

    /// Dense ids (past the reserved ones) that have no row.
    pub fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        self.info
            .iter()
            .enumerate()
            .skip(self.reserved)
            .filter(|(_, row)| row.is_none())
            .map(|(id, _)| id)
    }

    /// Every row in dense-id order (past the reserved ids) when the file and the dataset
    /// match exactly; else the first missing row (by file and token) or the first row of a
    /// token outside the dataset (by file:line).
    pub fn complete(&self) -> Result<Vec<&T>, DataError> {
        if let Some(id) = self.missing().next() {
            return Err(DataError::MissingSideRow {
                file: self.file.clone(),
                kind: self.kind,
                token: self.tokens[id].clone(),
            });
        }
        if let Some(u) = self.unmatched.first() {
            return Err(malformed(
                &self.file,
                u.line,
                format!(
                    "{} `{}` does not occur in the interactions",
                    self.kind, u.token
                ),
            ));
        }
        Ok(self.info.iter().skip(self.reserved).flatten().collect())
    }
}

/// Side information of a dataset; each part is there when its file was.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SideInfo {
    pub items: Option<Side<ItemInfo>>,
    pub users: Option<Side<UserInfo>>,
}

/// The side files that belong to an interaction file, those that exist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SideFiles {
    pub items: Option<PathBuf>,
    pub users: Option<PathBuf>,
}

/// Finds the side files beside an interaction file: `<stem>.item`/`<stem>.user` for RecBole,
/// `u.item`/`u.user` for MovieLens-100K. A RecBole `.item` without a title column is a
/// genre-only feature file and gives no item information.
pub fn side_files(inter: &Path, format: InteractionFormat) -> Result<SideFiles, DataError> {
    let (items, users) = match format {
        InteractionFormat::RecBoleInter => {
            (inter.with_extension("item"), inter.with_extension("user"))
        }
        InteractionFormat::MovieLens100k => (
            inter.with_file_name("u.item"),
            inter.with_file_name("u.user"),
        ),
        // MovieLens-1M's movies.dat/users.dat are not read.
        InteractionFormat::MovieLens1m => return Ok(SideFiles::default()),
    };
    let items = match items.is_file() {
        true if format == InteractionFormat::RecBoleInter => {
            let text = read_to_string(&items)?;
            let header = Header::parse(text.lines().next().unwrap_or_default());
            title_column(&header).map(|_| items)
        }
        true => Some(items),
        false => None,
    };
    Ok(SideFiles {
        items,
        users: users.is_file().then_some(users),
    })
}

fn title_column(header: &Header) -> Option<usize> {
    ["movie_title", "title"]
        .iter()
        .find_map(|c| header.columns.get(*c).copied())
}

/// Reads a file as UTF-8, or as Latin-1 when it is not UTF-8: GroupLens ships `u.item` in
/// ISO-8859-1 ("Misérables" is one byte 0xE9 there), RecBole's copy in UTF-8.
fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
    })
}

/// Non-empty lines with their 1-based numbers.
fn numbered(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn fields<'a>(
    path: &Path,
    line: usize,
    text: &'a str,
    sep: char,
    width: usize,
    what: &str,
) -> Result<Vec<&'a str>, DataError> {
    let fields: Vec<&str> = text.split(sep).map(str::trim).collect();
    if fields.len() != width {
        return Err(malformed(
            path,
            line,
            format!("expected {width} fields {what}, found {}", fields.len()),
        ));
    }
    Ok(fields)
}

fn insert<T>(
    rows: &mut HashMap<String, (usize, T)>,
    path: &Path,
    line: usize,
    kind: &str,
    token: &str,
    row: T,
) -> Result<(), DataError> {
    if token.is_empty() {
        return Err(malformed(path, line, format!("empty {kind} id")));
    }
    if let Some((first, _)) = rows.get(token) {
        return Err(malformed(
            path,
            line,
            format!("{kind} `{token}` listed twice (first at line {first})"),
        ));
    }
    rows.insert(token.to_string(), (line, row));
    Ok(())
}

/// The markers of an unknown value: RecBole's ml-100k misspells it `unkonwn`.
fn is_unknown(value: &str) -> bool {
    value.is_empty()
        || value.eq_ignore_ascii_case("unknown")
        || value.eq_ignore_ascii_case("unkonwn")
}

fn parse_year(path: &Path, line: usize, value: &str) -> Result<Option<u16>, DataError> {
    if is_unknown(value) {
        return Ok(None);
    }
    match value.parse::<u16>() {
        Ok(year) if value.len() == 4 => Ok(Some(year)),
        _ => Err(malformed(
            path,
            line,
            format!("release year `{value}` is not a four-digit year"),
        )),
    }
}

fn parse_title(path: &Path, line: usize, value: &str) -> Result<String, DataError> {
    if value.is_empty() {
        return Err(malformed(path, line, "empty title"));
    }
    // One spelling for the unknown movie, whichever source it came from.
    Ok(if is_unknown(value) {
        "unknown".to_string()
    } else {
        value.to_string()
    })
}

/// Splits GroupLens's `Title (1995)` into the title and the year in parentheses. A trailing
/// ` (V)` (a video release, as in `Land Before Time III: ... (1995) (V)`) is dropped first,
/// as RecBole's copy has it.
fn split_title_year(title: &str) -> (&str, Option<u16>) {
    let title = title.strip_suffix(" (V)").unwrap_or(title);
    let Some(head) = title.strip_suffix(')') else {
        return (title, None);
    };
    match head.rsplit_once(" (") {
        Some((name, year)) if year.len() == 4 && year.bytes().all(|b| b.is_ascii_digit()) => {
            (name, year.parse().ok())
        }
        _ => (title, None),
    }
}

/// The title and year of a RecBole row. RecBole cut GroupLens's `Title (1995) (V)` at the
/// last parenthesis, leaving `V` as the year and `(1995)` on the title (one item of
/// ml-100k): where the year column is no year but the title ends with one, the title's is
/// taken. Any other year that is not a year is an error.
fn recbole_title_year<'a>(
    path: &Path,
    line: usize,
    title: &'a str,
    year: Option<&str>,
) -> Result<(&'a str, Option<u16>), DataError> {
    let Some(year) = year else {
        return Ok((title, None));
    };
    match parse_year(path, line, year) {
        Ok(year) => Ok((title, year)),
        Err(e) => match split_title_year(title) {
            (name, Some(from_title)) => Ok((name, Some(from_title))),
            (_, None) => Err(e),
        },
    }
}

/// Reads item rows from a RecBole `.item` (columns `item_id`, `movie_title` or `title`, and
/// optionally `release_year` and `class` or `genre`) or a GroupLens `u.item`, by file name.
pub fn read_items(path: &Path) -> Result<SideRows<ItemInfo>, DataError> {
    let is_grouplens = path.file_name().is_some_and(|n| n == "u.item");
    let rows = if is_grouplens {
        let genre_file = path.with_file_name("u.genre");
        let genres = if genre_file.is_file() {
            read_genre_names(&genre_file)?
        } else {
            ML100K_GENRES.iter().map(|g| g.to_string()).collect()
        };
        read_grouplens_items(path, &genres)?
    } else {
        read_recbole_items(path)?
    };
    Ok(SideRows {
        file: path.to_path_buf(),
        rows,
    })
}

fn read_recbole_items(path: &Path) -> Result<HashMap<String, (usize, ItemInfo)>, DataError> {
    let text = read_text(path)?;
    let mut lines = numbered(&text);
    let Some((_, header_line)) = lines.next() else {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    };
    let header = Header::parse(header_line);
    let id_col = header.require(path, "item_id")?;
    let title_col = match title_column(&header) {
        Some(c) => c,
        None => header.require(path, "movie_title")?,
    };
    let year_col = header.columns.get("release_year").copied();
    let genre_col = header
        .columns
        .get("class")
        .or(header.columns.get("genre"))
        .copied();
    let mut rows = HashMap::new();
    for (line, text) in lines {
        let f = fields(path, line, text, '\t', header.width, "as in the header")?;
        let (title, year) = recbole_title_year(path, line, f[title_col], year_col.map(|c| f[c]))?;
        let info = ItemInfo {
            title: parse_title(path, line, title)?,
            year,
            genres: genre_col
                .map(|c| f[c].split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        };
        insert(&mut rows, path, line, "item", f[id_col], info)?;
    }
    if rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

/// `u.genre`: `name|index` lines, indices `0..n` in order.
fn read_genre_names(path: &Path) -> Result<Vec<String>, DataError> {
    let text = read_text(path)?;
    let mut names = Vec::new();
    for (line, text) in numbered(&text) {
        let f = fields(path, line, text, '|', 2, "`name|index`")?;
        if f[1].parse::<usize>().ok() != Some(names.len()) {
            return Err(malformed(
                path,
                line,
                format!("genre index `{}` should be {}", f[1], names.len()),
            ));
        }
        names.push(f[0].to_string());
    }
    if names.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(names)
}

/// `u.item`: `id|title|release date|video release date|IMDb URL|` then one 0/1 flag per genre.
fn read_grouplens_items(
    path: &Path,
    genre_names: &[String],
) -> Result<HashMap<String, (usize, ItemInfo)>, DataError> {
    let text = read_text(path)?;
    let width = 5 + genre_names.len();
    let mut rows = HashMap::new();
    for (line, text) in numbered(&text) {
        let f = fields(
            path,
            line,
            text,
            '|',
            width,
            &format!(
                "(id, title, dates, URL and {} genre flags)",
                genre_names.len()
            ),
        )?;
        let (title, title_year) = split_title_year(f[1]);
        // The title's `(1995)` is the year, as in RecBole's copy (which took it from there);
        // the release date (`01-Jan-1995`) stands in for a title without one.
        let year = match (title_year, f[2].rsplit('-').next().unwrap_or_default()) {
            (Some(year), _) => Some(year),
            (None, "") => None,
            (None, year) => parse_year(path, line, year)?,
        };
        let mut genres = Vec::new();
        for (flag, name) in f[5..].iter().zip(genre_names) {
            match *flag {
                "1" => genres.push(name.clone()),
                "0" => {}
                other => {
                    return Err(malformed(
                        path,
                        line,
                        format!("genre flag `{other}` for {name} is neither 0 nor 1"),
                    ))
                }
            }
        }
        let info = ItemInfo {
            title: parse_title(path, line, title)?,
            year,
            genres,
        };
        insert(&mut rows, path, line, "item", f[0], info)?;
    }
    if rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

fn parse_user(
    path: &Path,
    line: usize,
    age: &str,
    gender: &str,
    occupation: &str,
) -> Result<UserInfo, DataError> {
    let age = age
        .parse::<u8>()
        .map_err(|_| malformed(path, line, format!("age `{age}` is not a number of years")))?;
    let gender = match gender {
        "F" => Gender::Female,
        "M" => Gender::Male,
        other => {
            return Err(malformed(
                path,
                line,
                format!("gender `{other}` is neither M nor F"),
            ))
        }
    };
    if occupation.is_empty() {
        return Err(malformed(path, line, "empty occupation"));
    }
    Ok(UserInfo {
        age,
        gender,
        occupation: occupation.to_string(),
    })
}

/// Reads user rows from a RecBole `.user` (columns `user_id`, `age`, `gender`,
/// `occupation`; others such as `zip_code` are ignored) or a GroupLens `u.user`
/// (`id|age|gender|occupation|zip code`), by file name.
pub fn read_users(path: &Path) -> Result<SideRows<UserInfo>, DataError> {
    let text = read_text(path)?;
    let mut rows = HashMap::new();
    if path.file_name().is_some_and(|n| n == "u.user") {
        for (line, text) in numbered(&text) {
            let f = fields(path, line, text, '|', 5, "`id|age|gender|occupation|zip`")?;
            let info = parse_user(path, line, f[1], f[2], f[3])?;
            insert(&mut rows, path, line, "user", f[0], info)?;
        }
    } else {
        let mut lines = numbered(&text);
        let Some((_, header_line)) = lines.next() else {
            return Err(DataError::NoRows {
                path: path.to_path_buf(),
            });
        };
        let header = Header::parse(header_line);
        let id = header.require(path, "user_id")?;
        let age = header.require(path, "age")?;
        let gender = header.require(path, "gender")?;
        let occupation = header.require(path, "occupation")?;
        for (line, text) in lines {
            let f = fields(path, line, text, '\t', header.width, "as in the header")?;
            let info = parse_user(path, line, f[age], f[gender], f[occupation])?;
            insert(&mut rows, path, line, "user", f[id], info)?;
        }
    }
    if rows.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(SideRows {
        file: path.to_path_buf(),
        rows,
    })
}

/// Reads the side files that exist and joins them to a dataset's tokens (items: index 0 is
/// padding).
pub fn load_side_info(
    files: &SideFiles,
    item_tokens: &[String],
    user_tokens: &[String],
) -> Result<SideInfo, DataError> {
    let items = match &files.items {
        Some(path) => Some(Side::join(read_items(path)?, "item", item_tokens, 1)),
        None => None,
    };
    let users = match &files.users {
        Some(path) => Some(Side::join(read_users(path)?, "user", user_tokens, 0)),
        None => None,
    };
    Ok(SideInfo { items, users })
}
