//! `cargo xtask file-cycles`: no two source files of a crate may reach each other through
//! `use` declarations or paths in code. A cycle between files means neither can be read,
//! tested or moved without the other, so the layering rule of ARCHITECTURE.md holds inside
//! crates too.
//!
//! A light lexer (no macro expansion, no `#[path]`) is enough: the rule is about what the
//! source text names, and the workspace writes macro-free module paths.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace::root;

/// Checks every workspace package; prints each cycle and fails if there is one.
pub fn check_workspace() -> Result<()> {
    let metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .context("cannot run cargo metadata")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed:\n{}",
            String::from_utf8_lossy(&metadata.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("parsing cargo metadata")?;
    let members: HashSet<&str> = metadata["workspace_members"]
        .as_array()
        .map(|m| m.iter().filter_map(|id| id.as_str()).collect())
        .unwrap_or_default();
    let mut report = String::new();
    let (mut cycles, mut crates_with_cycles) = (0, 0);
    for package in metadata["packages"].as_array().into_iter().flatten() {
        if !members.contains(package["id"].as_str().unwrap_or_default()) {
            continue;
        }
        let name = package["name"].as_str().unwrap_or("?");
        let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let mut reached = HashSet::new();
        for target in package["targets"].as_array().into_iter().flatten() {
            let kinds: Vec<&str> = target["kind"]
                .as_array()
                .map(|k| k.iter().filter_map(|k| k.as_str()).collect())
                .unwrap_or_default();
            // Examples, tests and benches are one-file crates or outside src/.
            if !kinds
                .iter()
                .any(|k| matches!(*k, "lib" | "rlib" | "dylib" | "proc-macro" | "bin"))
            {
                continue;
            }
            let root_file = PathBuf::from(target["src_path"].as_str().unwrap_or_default());
            let graph = CrateGraph::build(&root_file, &read);
            reached.extend(graph.files.iter().cloned());
            for file in &graph.missing {
                eprintln!(
                    "file-cycles: note: {name}: {} (or its mod.rs form) is declared but missing",
                    relative(file, &dir)
                );
            }
            let label = if kinds.contains(&"bin") {
                format!("{name} (bin {})", target["name"].as_str().unwrap_or("?"))
            } else {
                name.to_string()
            };
            let found = graph.cycles();
            if !found.is_empty() {
                crates_with_cycles += 1;
                cycles += found.len();
                report.push_str(&graph.render(&label, &dir, &found));
            }
        }
        // A file no target reaches is not compiled, so it cannot take part in a cycle; say
        // so, as it is usually left over from a move.
        for file in rust_files(&dir.join("src")) {
            if !reached.contains(&file) {
                eprintln!(
                    "file-cycles: note: {name}: {} is in no module tree",
                    relative(&file, &dir)
                );
            }
        }
    }
    if cycles > 0 {
        print!("{report}");
        bail!("{cycles} file cycle(s) in {crates_with_cycles} crate(s)");
    }
    println!("file-cycles: no file cycles");
    Ok(())
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Lexing

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers, `::` and punctuation with their lines. Comments (doc comments and the doc
/// links in them included), string, byte and char literals and numbers vanish, so nothing
/// they contain reads as a path.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    // Skips `c[from..to]`, counting its newlines.
    let skip = |from: usize, to: usize, line: &mut usize| {
        *line += c[from..to.min(c.len())]
            .iter()
            .filter(|&&ch| ch == '\n')
            .count();
        to
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let (mut j, mut depth) = (i + 2, 1);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && at(j + 1) == '*' {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && at(j + 1) == '/' {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            i = skip(i, j, &mut line);
        } else if ch == '"' {
            i = skip(i, end_of_string(&c, i + 1), &mut line);
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                // Past the backslash and the escaped character, which may be a quote.
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' && c[j] != '\n' {
                    j += 1;
                }
                i = j + 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime: its name lexes as an identifier, which is harmless.
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let mut j = i;
            while j < c.len() && (c[j].is_alphanumeric() || c[j] == '_') {
                j += 1;
            }
            let word: String = c[i..j].iter().collect();
            match (word.as_str(), at(j)) {
                ("r" | "br" | "cr", '"' | '#')
                    if at(j) == '"' || matches!(at(j + 1), '"' | '#') =>
                {
                    i = skip(i, end_of_raw_string(&c, j), &mut line);
                }
                ("r", '#') => {
                    let mut k = j + 1;
                    while k < c.len() && (c[k].is_alphanumeric() || c[k] == '_') {
                        k += 1;
                    }
                    out.push(Token {
                        tok: Tok::Ident(c[j + 1..k].iter().collect()),
                        line,
                    });
                    i = k;
                }
                ("b" | "c", '"') => i = skip(i, end_of_string(&c, j + 1), &mut line),
                ("b", '\'') => {
                    let mut k = j + 1 + usize::from(at(j + 1) == '\\');
                    k += 1;
                    while k < c.len() && c[k] != '\'' && c[k] != '\n' {
                        k += 1;
                    }
                    i = k + 1;
                }
                _ => {
                    out.push(Token {
                        tok: Tok::Ident(word),
                        line,
                    });
                    i = j;
                }
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Punct('0'),
                line,
            });
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// The index after the closing quote of a string whose body starts at `i`.
fn end_of_string(c: &[char], mut i: usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after a raw string whose hashes (or opening quote) start at `i`.
fn end_of_raw_string(c: &[char], mut i: usize) -> usize {
    let mut hashes = 0;
    while i < c.len() && c[i] == '#' {
        hashes += 1;
        i += 1;
    }
    i += 1;
    while i < c.len() {
        if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

// ---------------------------------------------------------------------------------------
// One file: its modules, items, imports and references

/// A path as written, in the inline module (`rel`, relative to the file's module) where it
/// appears.
#[derive(Clone, Debug)]
struct RawRef {
    rel: Vec<String>,
    path: Vec<String>,
    line: usize,
}

#[derive(Debug)]
enum Import {
    /// `use path as name;` (or `use path;`, named by its last segment).
    Named(String, Vec<String>),
    /// `use path::*;`
    Glob(Vec<String>),
}

#[derive(Debug, Default)]
struct FileScan {
    /// `mod name;` declarations, by the inline module they sit in.
    declared: Vec<(Vec<String>, String)>,
    inline_modules: Vec<Vec<String>>,
    /// Names of items defined at module level, by inline module.
    items: Vec<(Vec<String>, String)>,
    /// Module-level `use` declarations, by inline module: what a name resolves through.
    imports: Vec<(Vec<String>, Import)>,
    /// Every path that may name a module of this crate, `use` leaves included.
    refs: Vec<RawRef>,
}

const ITEM_KEYWORDS: [&str; 9] = [
    "fn",
    "struct",
    "enum",
    "trait",
    "type",
    "const",
    "static",
    "union",
    "macro_rules",
];

fn ident(tokens: &[Token], i: usize) -> Option<&str> {
    match tokens.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn is(tokens: &[Token], i: usize, tok: &Tok) -> bool {
    tokens.get(i).is_some_and(|t| &t.tok == tok)
}

fn scan(tokens: &[Token]) -> FileScan {
    let mut out = FileScan::default();
    // Inline modules open at the time, each with the brace depth inside it.
    let mut scopes: Vec<(Vec<String>, usize)> = vec![(Vec::new(), 0)];
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let (rel, scope_depth) = scopes.last().cloned().unwrap_or_default();
        let at_module_level = depth == scope_depth;
        match &tokens[i].tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if scopes.len() > 1 && depth < scope_depth {
                    scopes.pop();
                }
            }
            Tok::Ident(word) if word == "mod" => {
                if let Some(name) = ident(tokens, i + 1) {
                    if is(tokens, i + 2, &Tok::Punct(';')) {
                        out.declared.push((rel, name.to_string()));
                        i += 3;
                        continue;
                    }
                    if is(tokens, i + 2, &Tok::Punct('{')) {
                        let mut inner = rel;
                        inner.push(name.to_string());
                        out.inline_modules.push(inner.clone());
                        depth += 1;
                        scopes.push((inner, depth));
                        i += 3;
                        continue;
                    }
                }
            }
            // Not `impl Trait + use<'a>`, the precise-capturing bound.
            Tok::Ident(word) if word == "use" && !is(tokens, i + 1, &Tok::Punct('<')) => {
                let mut leaves = Vec::new();
                let mut j = parse_use_tree(tokens, i + 1, Vec::new(), &mut leaves);
                if is(tokens, j, &Tok::Punct(';')) {
                    j += 1;
                }
                for (path, leaf, line) in leaves {
                    if path.first().is_some_and(|s| s == "::") {
                        continue;
                    }
                    out.refs.push(RawRef {
                        rel: rel.clone(),
                        path: path.clone(),
                        line,
                    });
                    if at_module_level {
                        let import = match leaf {
                            Leaf::Glob => Import::Glob(path),
                            Leaf::Name(name) if name == "_" => continue,
                            Leaf::Name(name) => Import::Named(name, path),
                        };
                        out.imports.push((rel.clone(), import));
                    }
                }
                i = j;
                continue;
            }
            Tok::Ident(word) if at_module_level && ITEM_KEYWORDS.contains(&word.as_str()) => {
                let mut j = i + 1;
                while is(tokens, j, &Tok::Punct('!')) || ident(tokens, j) == Some("mut") {
                    j += 1;
                }
                if let Some(name) = ident(tokens, j) {
                    if !matches!(name, "fn" | "unsafe" | "async" | "extern" | "_") {
                        out.items.push((rel, name.to_string()));
                    }
                }
            }
            Tok::Ident(first) if is(tokens, i + 1, &Tok::PathSep) && first != "Self" => {
                let prev = i.checked_sub(1).map(|p| &tokens[p].tok);
                // Mid-path segments, `$crate` in macro bodies, and `pub(in crate::x)`
                // (a visibility, not a use) are not references.
                let skip = matches!(prev, Some(Tok::PathSep | Tok::Punct('.') | Tok::Punct('$')))
                    || (i >= 3
                        && ident(tokens, i - 1) == Some("in")
                        && is(tokens, i - 2, &Tok::Punct('('))
                        && ident(tokens, i - 3) == Some("pub"));
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while is(tokens, j, &Tok::PathSep) {
                    match ident(tokens, j + 1) {
                        Some(seg) => {
                            path.push(seg.to_string());
                            j += 2;
                        }
                        None => break,
                    }
                }
                if !skip {
                    out.refs.push(RawRef {
                        rel,
                        path,
                        line: tokens[i].line,
                    });
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

#[derive(Debug)]
enum Leaf {
    Name(String),
    Glob,
}

/// Parses one use tree at `i`, appending its leaves (full path, what it imports, line) to
/// `out`; returns the index after it. A leading `::` is kept as a `"::"` segment.
fn parse_use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Leaf, usize)>,
) -> usize {
    let mut path = prefix;
    if is(tokens, i, &Tok::PathSep) {
        path.push("::".into());
        i += 1;
    }
    loop {
        let Some(token) = tokens.get(i) else {
            return i;
        };
        match &token.tok {
            Tok::Ident(seg) => {
                path.push(seg.clone());
                i += 1;
                if is(tokens, i, &Tok::PathSep) {
                    i += 1;
                    continue;
                }
                if path.last().is_some_and(|s| s == "self") {
                    path.pop();
                }
                let mut name = path.last().cloned().unwrap_or_default();
                if ident(tokens, i) == Some("as") {
                    if let Some(alias) = ident(tokens, i + 1) {
                        name = alias.to_string();
                    }
                    i += 2;
                }
                out.push((path, Leaf::Name(name), token.line));
                return i;
            }
            Tok::Punct('*') => {
                out.push((path, Leaf::Glob, token.line));
                return i + 1;
            }
            Tok::Punct('{') => {
                i += 1;
                loop {
                    match tokens.get(i).map(|t| &t.tok) {
                        None => return i,
                        Some(Tok::Punct('}')) => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        Some(_) => {
                            let next = parse_use_tree(tokens, i, path.clone(), out);
                            if next == i {
                                return i;
                            }
                            i = next;
                        }
                    }
                }
            }
            _ => return i,
        }
    }
}

// ---------------------------------------------------------------------------------------
// One crate: modules, resolution and the file graph

#[derive(Debug, Default)]
struct Module {
    file: usize,
    items: HashSet<String>,
    /// `None`: imported from outside the crate.
    imports: HashMap<String, Option<Vec<String>>>,
    globs: Vec<Vec<String>>,
}

/// One reference from a file to another, after resolution.
#[derive(Clone, Debug)]
struct Reference {
    line: usize,
    text: String,
}

/// The file of a module declared with `mod x;` whose `x.rs` and `x/mod.rs` are both absent.
const MISSING: usize = usize::MAX;

#[derive(Debug, Default)]
pub struct CrateGraph {
    pub files: Vec<PathBuf>,
    /// Declared module files that do not exist (as `x.rs`; `x/mod.rs` is absent too).
    pub missing: Vec<PathBuf>,
    modules: BTreeMap<Vec<String>, Module>,
    /// `from -> to -> references`, self-references left out.
    edges: BTreeMap<usize, BTreeMap<usize, Vec<Reference>>>,
}

/// A cycle as file indices, first file repeated at the end.
pub type Cycle = Vec<usize>;

impl CrateGraph {
    /// Walks the module tree from `root_file` through `mod x;` declarations (`x.rs` or
    /// `x/mod.rs`), reading files with `read`, and resolves every file's references.
    pub fn build(root_file: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Self {
        let mut graph = CrateGraph::default();
        let mut scans = Vec::new();
        // Breadth first, so files are numbered (and cycles listed) from the root down.
        let mut queue = VecDeque::from([(root_file.to_path_buf(), Vec::<String>::new())]);
        let mut seen = HashSet::new();
        while let Some((file, module)) = queue.pop_front() {
            if !seen.insert(file.clone()) {
                continue;
            }
            let Some(src) = read(&file) else {
                // A path into it names no file here, so it must not fall back to the parent's.
                let flat = match file.parent() {
                    Some(dir) if file.ends_with("mod.rs") => dir.with_extension("rs"),
                    _ => file,
                };
                graph.missing.push(flat);
                graph.modules.insert(
                    module,
                    Module {
                        file: MISSING,
                        ..Module::default()
                    },
                );
                continue;
            };
            let scan = scan(&lex(&src));
            let index = graph.files.len();
            let is_mod_rs = file == root_file || file.file_name().is_some_and(|n| n == "mod.rs");
            let parent = file.parent().unwrap_or(Path::new("")).to_path_buf();
            let dir = if is_mod_rs {
                parent
            } else {
                parent.join(file.file_stem().unwrap_or_default())
            };
            for (rel, name) in &scan.declared {
                let mut child_dir = dir.clone();
                child_dir.extend(rel);
                let mut child_module = module.clone();
                child_module.extend(rel.iter().cloned());
                child_module.push(name.clone());
                let flat = child_dir.join(format!("{name}.rs"));
                let nested = child_dir.join(name).join("mod.rs");
                let child = if read(&flat).is_some() { flat } else { nested };
                queue.push_back((child, child_module));
            }
            graph.modules.insert(
                module.clone(),
                Module {
                    file: index,
                    ..Module::default()
                },
            );
            for rel in &scan.inline_modules {
                let mut inner = module.clone();
                inner.extend(rel.iter().cloned());
                graph.modules.insert(
                    inner,
                    Module {
                        file: index,
                        ..Module::default()
                    },
                );
            }
            graph.files.push(file);
            scans.push((module, scan));
        }
        // Imports are made absolute only now: a relative `use x::..` needs every module known.
        let mut filled: Vec<(Vec<String>, Import, Option<Vec<String>>)> = Vec::new();
        for (module, scan) in &mut scans {
            for (rel, item) in &scan.items {
                let scope = join(module, rel);
                if let Some(m) = graph.modules.get_mut(&scope) {
                    m.items.insert(item.clone());
                }
            }
            for (rel, import) in scan.imports.drain(..) {
                let scope = join(module, &rel);
                let target = match &import {
                    Import::Named(_, path) | Import::Glob(path) => graph.absolute(&scope, path),
                };
                filled.push((scope, import, target));
            }
        }
        for (scope, import, target) in filled {
            let Some(m) = graph.modules.get_mut(&scope) else {
                continue;
            };
            match import {
                Import::Named(name, _) => {
                    m.imports.insert(name, target);
                }
                Import::Glob(_) => m.globs.extend(target),
            }
        }
        for (from, (module, scan)) in scans.iter().enumerate() {
            for r in &scan.refs {
                let scope = join(module, &r.rel);
                let Some(path) = graph.absolute(&scope, &r.path) else {
                    continue;
                };
                let Some(to) = graph.resolve(&path, 0) else {
                    continue;
                };
                if to != from {
                    graph
                        .edges
                        .entry(from)
                        .or_default()
                        .entry(to)
                        .or_default()
                        .push(Reference {
                            line: r.line,
                            text: r.path.join("::"),
                        });
                }
            }
        }
        graph
    }

    /// The crate-absolute form of `path` written in module `scope`, or `None` when it
    /// leaves the crate.
    fn absolute(&self, scope: &[String], path: &[String]) -> Option<Vec<String>> {
        let first = path.first()?;
        match first.as_str() {
            "crate" => Some(path[1..].to_vec()),
            "self" => Some(join(scope, &path[1..])),
            "super" => {
                let mut base = scope.to_vec();
                let mut k = 0;
                while path.get(k).is_some_and(|s| s == "super") {
                    base.pop()?;
                    k += 1;
                }
                Some(join(&base, &path[k..]))
            }
            _ => {
                let candidate = join(scope, path);
                self.modules
                    .contains_key(&candidate[..=scope.len()])
                    .then_some(candidate)
            }
        }
    }

    /// The file that defines what `path` names: the longest module prefix that exists, then,
    /// if the next segment is a name that module imports rather than defines, wherever the
    /// import leads.
    fn resolve(&self, path: &[String], depth: usize) -> Option<usize> {
        let mut len = path.len();
        while !self.modules.contains_key(&path[..len]) {
            len = len.checked_sub(1)?;
        }
        let module = &self.modules[&path[..len]];
        if module.file == MISSING {
            return None;
        }
        let Some(name) = path.get(len) else {
            return Some(module.file);
        };
        // A re-export loop is a compile error; stop rather than recurse forever.
        if depth > 32 || module.items.contains(name) {
            return Some(module.file);
        }
        if let Some(target) = module.imports.get(name) {
            let target = target.as_ref()?;
            return self.resolve(&join(target, &path[len + 1..]), depth + 1);
        }
        for glob in &module.globs {
            if let Some(source) = self.modules.get(glob) {
                if source.items.contains(name) || source.imports.contains_key(name) {
                    return self.resolve(&join(glob, &path[len..]), depth + 1);
                }
            }
        }
        Some(module.file)
    }

    /// Every elementary cycle of two or more files, found inside the strongly connected
    /// components, each starting at its smallest file index. Capped per component: a
    /// tangle of many cycles reads no better for listing all of them.
    pub fn cycles(&self) -> Vec<Cycle> {
        const CAP: usize = 200;
        let mut out = Vec::new();
        for component in self.components() {
            if component.len() < 2 {
                continue;
            }
            let members: BTreeSet<usize> = component.iter().copied().collect();
            let mut found = 0;
            for &start in &members {
                let mut path = vec![start];
                self.cycles_from(start, &members, &mut path, &mut out, &mut found, CAP);
            }
        }
        out
    }

    fn cycles_from(
        &self,
        start: usize,
        members: &BTreeSet<usize>,
        path: &mut Vec<usize>,
        out: &mut Vec<Cycle>,
        found: &mut usize,
        cap: usize,
    ) {
        let Some(next) = self.edges.get(path.last().unwrap_or(&start)) else {
            return;
        };
        for &to in next.keys() {
            if *found >= cap {
                return;
            }
            if to == start {
                let mut cycle = path.clone();
                cycle.push(start);
                out.push(cycle);
                *found += 1;
            } else if to > start && members.contains(&to) && !path.contains(&to) {
                path.push(to);
                self.cycles_from(start, members, path, out, found, cap);
                path.pop();
            }
        }
    }

    /// Tarjan's strongly connected components.
    fn components(&self) -> Vec<Vec<usize>> {
        struct State {
            index: Vec<Option<usize>>,
            low: Vec<usize>,
            on_stack: Vec<bool>,
            stack: Vec<usize>,
            next: usize,
            out: Vec<Vec<usize>>,
        }
        fn visit(graph: &CrateGraph, v: usize, s: &mut State) {
            s.index[v] = Some(s.next);
            s.low[v] = s.next;
            s.next += 1;
            s.stack.push(v);
            s.on_stack[v] = true;
            for &w in graph.edges.get(&v).into_iter().flat_map(|e| e.keys()) {
                match s.index[w] {
                    None => {
                        visit(graph, w, s);
                        s.low[v] = s.low[v].min(s.low[w]);
                    }
                    Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(s.low[v]) == s.index[v] {
                let mut component = Vec::new();
                while let Some(w) = s.stack.pop() {
                    s.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                component.sort_unstable();
                s.out.push(component);
            }
        }
        let n = self.files.len();
        let mut s = State {
            index: vec![None; n],
            low: vec![0; n],
            on_stack: vec![false; n],
            stack: Vec::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in 0..n {
            if s.index[v].is_none() {
                visit(self, v, &mut s);
            }
        }
        s.out
    }

    /// `label: a.rs -> b.rs -> a.rs`, then each step's lines and first path.
    pub fn render(&self, label: &str, base: &Path, cycles: &[Cycle]) -> String {
        let name = |f: usize| relative(&self.files[f], base);
        let mut out = String::new();
        for cycle in cycles {
            let files: Vec<String> = cycle.iter().map(|&f| name(f)).collect();
            let _ = writeln!(out, "{label}: {}", files.join(" -> "));
            for step in cycle.windows(2) {
                let refs = &self.edges[&step[0]][&step[1]];
                let mut lines: Vec<usize> = refs.iter().map(|r| r.line).collect();
                lines.sort_unstable();
                lines.dedup();
                let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
                let _ = writeln!(
                    out,
                    "    {}:{} -> {} ({})",
                    name(step[0]),
                    lines.join(","),
                    name(step[1]),
                    refs[0].text
                );
            }
        }
        out
    }
}

fn join(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().chain(b).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the crate rooted at `src/lib.rs` from `(path, source)` pairs and returns its
    /// cycles as file names.
    fn cycles_of(files: &[(&str, &str)]) -> Vec<Vec<String>> {
        let graph = graph_of(files);
        graph
            .cycles()
            .iter()
            .map(|c| {
                c.iter()
                    .map(|&f| relative(&graph.files[f], Path::new("src")))
                    .collect()
            })
            .collect()
    }

    fn graph_of(files: &[(&str, &str)]) -> CrateGraph {
        let sources: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, s)| (PathBuf::from(p), s.to_string()))
            .collect();
        CrateGraph::build(Path::new("src/lib.rs"), &|p| sources.get(p).cloned())
    }

    fn edge(graph: &CrateGraph, from: &str, to: &str) -> Option<Vec<usize>> {
        let index = |name: &str| graph.files.iter().position(|f| f == Path::new(name));
        let refs = graph.edges.get(&index(from)?)?.get(&index(to)?)?;
        Some(refs.iter().map(|r| r.line).collect())
    }

    #[test]
    fn a_clean_dag_passes() {
        let files = [
            ("src/lib.rs", "mod a;\nmod b;\nmod c;\npub use a::run;\n"),
            (
                "src/a.rs",
                "use crate::b::{Thing, other::{self, Deep}};\npub fn run() { crate::c::go(); }\n",
            ),
            (
                "src/b/mod.rs",
                "pub mod other;\npub struct Thing;\nuse super::c::go;\n",
            ),
            ("src/b/other.rs", "pub struct Deep;\n"),
            ("src/c.rs", "pub fn go() {}\n"),
        ];
        assert!(cycles_of(&files).is_empty());
        let graph = graph_of(&files);
        assert_eq!(edge(&graph, "src/a.rs", "src/b/mod.rs"), Some(vec![1]));
        assert_eq!(edge(&graph, "src/a.rs", "src/b/other.rs"), Some(vec![1, 1]));
        assert_eq!(edge(&graph, "src/a.rs", "src/c.rs"), Some(vec![2]));
        assert_eq!(edge(&graph, "src/b/mod.rs", "src/c.rs"), Some(vec![3]));
        // `mod x;` declarations are not references.
        assert_eq!(edge(&graph, "src/lib.rs", "src/c.rs"), None);
        assert_eq!(edge(&graph, "src/lib.rs", "src/a.rs"), Some(vec![4]));
    }

    #[test]
    fn a_two_file_cycle_is_found() {
        let files = [
            ("src/lib.rs", "mod a;\nmod b;\n"),
            ("src/a.rs", "use crate::b::Y;\npub struct X;\n"),
            (
                "src/b.rs",
                "pub struct Y;\n\nfn f() -> crate::a::X { crate::a::X }\n",
            ),
        ];
        assert_eq!(cycles_of(&files), vec![vec!["a.rs", "b.rs", "a.rs"]]);
        let graph = graph_of(&files);
        assert_eq!(edge(&graph, "src/b.rs", "src/a.rs"), Some(vec![3, 3]));
        let text = graph.render("demo", Path::new(""), &graph.cycles());
        assert!(
            text.starts_with("demo: src/a.rs -> src/b.rs -> src/a.rs\n"),
            "{text}"
        );
        assert!(
            text.contains("src/b.rs:3 -> src/a.rs (crate::a::X)"),
            "{text}"
        );
    }

    #[test]
    fn a_three_file_cycle_through_folders_and_groups_is_found() {
        let files = [
            ("src/lib.rs", "pub(crate) mod x;\nmod y;\n"),
            // `x/mod.rs` and `y.rs` beside `y/`, reached through `super`, `self` and groups.
            (
                "src/x/mod.rs",
                "pub(crate) use crate::{y::z::{Z}, self as _};\n",
            ),
            ("src/y.rs", "pub mod z;\npub fn g() { super::x::f(); }\n"),
            ("src/y/z.rs", "pub struct Z;\nfn h() { super::g() }\n"),
        ];
        assert_eq!(
            cycles_of(&files),
            vec![vec!["x/mod.rs", "y/z.rs", "y.rs", "x/mod.rs"]]
        );
    }

    #[test]
    fn a_reexport_through_lib_is_followed_without_a_false_cycle() {
        let files = [
            (
                "src/lib.rs",
                "mod error;\nmod a;\nmod m;\npub use error::BalanceError;\npub use m::Thing;\n\
                 pub use a::*;\n",
            ),
            ("src/error.rs", "pub struct BalanceError;\n"),
            (
                "src/a.rs",
                "use crate::BalanceError;\npub fn f() -> crate::Thing { todo!() }\n",
            ),
            ("src/m/mod.rs", "mod inner;\npub use self::inner::Thing;\n"),
            (
                "src/m/inner.rs",
                "pub struct Thing;\nfn g() -> Result<(), crate::BalanceError> { Ok(()) }\n\
                 fn h() { crate::f(); }\n",
            ),
        ];
        let graph = graph_of(&files);
        assert_eq!(edge(&graph, "src/a.rs", "src/error.rs"), Some(vec![1]));
        assert_eq!(edge(&graph, "src/a.rs", "src/lib.rs"), None);
        // Recursively: lib.rs re-exports m's re-export of inner's item.
        assert_eq!(edge(&graph, "src/a.rs", "src/m/inner.rs"), Some(vec![2]));
        // Through lib.rs's glob re-export of `a`: a real cycle, found as such.
        assert_eq!(edge(&graph, "src/m/inner.rs", "src/a.rs"), Some(vec![3]));
        assert_eq!(cycles_of(&files), vec![vec!["a.rs", "m/inner.rs", "a.rs"]]);
    }

    #[test]
    fn comments_doc_links_and_strings_are_ignored() {
        let files = [
            ("src/lib.rs", "mod a;\nmod b;\n"),
            (
                "src/a.rs",
                "//! Uses [`crate::b::Y`] in prose.\n/// See [`crate::b::Y`].\n\
                 // crate::b::Y\n/* crate::b::Y /* nested */ crate::b */\n\
                 pub fn f() -> &'static str { let _c = ('\"', '\\'', b'\\''); r#\"crate::b::Y\"# }\n\
                 pub fn g() -> &'static str { \"crate::b::Y \\\" crate::b\" }\n\
                 pub(in crate::b) fn h() {}\n",
            ),
            ("src/b.rs", "use crate::a::f;\npub struct Y;\n"),
        ];
        // A path after `in` that is not a visibility still counts.
        let mut looping = files;
        looping[2].1 = "pub fn y() { for _ in crate::a::f().chars() {} }\n";
        assert_eq!(
            edge(&graph_of(&looping), "src/b.rs", "src/a.rs"),
            Some(vec![1])
        );
        assert!(cycles_of(&files).is_empty());
        assert_eq!(edge(&graph_of(&files), "src/a.rs", "src/b.rs"), None);
    }

    #[test]
    fn super_in_an_inline_test_module_is_the_file_itself() {
        let files = [
            ("src/lib.rs", "mod a;\npub use a::X;\n"),
            (
                "src/a.rs",
                "pub struct X;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    \
                 fn t() { let _ = super::X; }\n}\n",
            ),
        ];
        let graph = graph_of(&files);
        assert_eq!(edge(&graph, "src/a.rs", "src/lib.rs"), None);
        assert!(graph.cycles().is_empty());
    }

    #[test]
    fn a_missing_module_file_is_no_edge_to_its_parent() {
        let files = [
            ("src/lib.rs", "mod a;\nmod gone;\npub use a::X;\n"),
            ("src/a.rs", "pub struct X(crate::gone::Y);\n"),
        ];
        let graph = graph_of(&files);
        assert_eq!(graph.missing, [PathBuf::from("src/gone.rs")]);
        assert_eq!(edge(&graph, "src/a.rs", "src/lib.rs"), None);
        assert!(graph.cycles().is_empty());
    }

    #[test]
    fn lexing_balances_the_braces_of_tricky_sources() {
        // This file and its neighbours: raw strings holding quotes and `#`, char literals of
        // quotes and braces, lifetimes, doc comments.
        for src in [
            include_str!("cycles.rs"),
            include_str!("main.rs"),
            include_str!("data.rs"),
        ] {
            let tokens = lex(src);
            let open = tokens.iter().filter(|t| t.tok == Tok::Punct('{')).count();
            let close = tokens.iter().filter(|t| t.tok == Tok::Punct('}')).count();
            assert_eq!(open, close);
            assert_eq!(tokens.last().map(|t| t.line), Some(src.lines().count()));
        }
        let tokens = lex("let c = '{'; let d = b'}'; let q = '\\''; fn f<'a>(x: &'a str) {}");
        let braces: Vec<&Tok> = tokens
            .iter()
            .map(|t| &t.tok)
            .filter(|t| matches!(t, Tok::Punct('{' | '}')))
            .collect();
        assert_eq!(braces, [&Tok::Punct('{'), &Tok::Punct('}')]);
    }

    #[test]
    fn use_trees_flatten() {
        let tokens = lex("::std::x; crate::{a, b::{self, c as d}, e::*}, f;");
        let mut leaves = Vec::new();
        let i = parse_use_tree(&tokens, 0, Vec::new(), &mut leaves);
        assert!(is(&tokens, i, &Tok::Punct(';')));
        let next = parse_use_tree(&tokens, i + 1, Vec::new(), &mut leaves);
        assert!(is(&tokens, next, &Tok::Punct(',')));
        let flat: Vec<String> = leaves
            .iter()
            .map(|(p, leaf, _)| match leaf {
                Leaf::Name(n) => format!("{} as {n}", p.join("::")),
                Leaf::Glob => format!("{}::*", p.join("::")),
            })
            .collect();
        assert_eq!(
            flat,
            [
                "::::std::x as x".to_string(),
                "crate::a as a".into(),
                "crate::b as b".into(),
                "crate::b::c as d".into(),
                "crate::e::*".into(),
            ]
        );
    }
}
