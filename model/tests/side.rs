//! Side information (items' titles, years, genres; users' ages, genders, occupations) from
//! RecBole atomic files and GroupLens's files, against hand-written fixtures.

use std::path::{Path, PathBuf};

use meshrec_model::data::{read_items, read_users, Dataset, Gender, ItemInfo, UserInfo};
use meshrec_model::DataError;

/// Read at run time: a test binary in a target directory shared by several clones may have
/// been built from another clone's path.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        Into::into,
    )
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

fn item(title: &str, year: Option<u16>, genres: &[&str]) -> ItemInfo {
    ItemInfo {
        title: title.to_string(),
        year,
        genres: genres.iter().map(|g| g.to_string()).collect(),
    }
}

#[test]
fn recbole_and_grouplens_files_give_the_same_side_information() {
    let recbole = Dataset::load(&fixture("side_recbole")).unwrap();
    let grouplens = Dataset::load(&fixture("side_grouplens")).unwrap();
    assert_eq!(recbole.item_tokens, vec!["", "1", "267", "543", "1412"]);
    assert_eq!(grouplens.item_tokens, recbole.item_tokens);
    for ds in [&recbole, &grouplens] {
        let items = ds.side.items.as_ref().expect("item side information");
        let all = items.complete().unwrap();
        let expected = [
            item(
                "Toy Story",
                Some(1995),
                &["Animation", "Children's", "Comedy"],
            ),
            // RecBole misspells the unknown movie `unkonwn`; GroupLens leaves its date empty.
            item("unknown", None, &["unknown"]),
            // GroupLens's copy is Latin-1, RecBole's UTF-8: both read as the same text.
            item("Misérables, Les", Some(1995), &["Drama", "Musical"]),
            // RecBole cut `(1995) (V)` at the last parenthesis: year `V`, `(1995)` left on
            // the title; both sources give the title without it and the year 1995.
            item(
                "Land Before Time III: The Time of the Great Giving",
                Some(1995),
                &["Animation", "Children's"],
            ),
        ];
        assert_eq!(all, expected.iter().collect::<Vec<_>>(), "{}", ds.name);
        assert!(items.get(0).is_none(), "the padding item has no row");
        assert_eq!(
            items.get(1).unwrap().text(),
            "Toy Story (1995) | Animation, Children's, Comedy"
        );
        assert_eq!(items.get(2).unwrap().text(), "unknown | unknown");
        let users = ds.side.users.as_ref().expect("user side information");
        assert_eq!(
            users.complete().unwrap(),
            vec![
                &UserInfo {
                    age: 24,
                    gender: Gender::Male,
                    occupation: "technician".into()
                },
                &UserInfo {
                    age: 53,
                    gender: Gender::Female,
                    occupation: "other".into()
                },
                &UserInfo {
                    age: 23,
                    gender: Gender::Male,
                    occupation: "writer".into()
                },
            ]
        );
    }
    // u.item's genre flags become the same genre features as RecBole's `class` column.
    assert_eq!(grouplens.features, recbole.features);
    assert_eq!(
        recbole.features.as_ref().unwrap().genre_names,
        vec![
            "Animation",
            "Children's",
            "Comedy",
            "Drama",
            "Musical",
            "unknown"
        ]
    );
}

#[test]
fn without_side_files_the_dataset_loads_with_empty_side_information() {
    let dir = tempfile::tempdir().unwrap();
    let inter = dir.path().join("x.inter");
    std::fs::copy(fixture("side_recbole/mini.inter"), &inter).unwrap();
    let ds = Dataset::load(&inter).unwrap();
    assert!(ds.side.items.is_none() && ds.side.users.is_none());
    assert!(ds.features.is_none());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("side_grouplens/u.data"), dir.path().join("u.data")).unwrap();
    let ds = Dataset::load(dir.path()).unwrap();
    assert!(ds.side.items.is_none() && ds.side.users.is_none());
}

#[test]
fn missing_and_unmatched_rows_are_kept_and_reported_by_complete() {
    // tiny.item lists items 10..12 and 99; the interactions name 10..14.
    let ds = Dataset::load(&fixture("tiny.inter")).unwrap();
    let items = ds.side.items.as_ref().unwrap();
    assert_eq!(
        items.get(1).unwrap(),
        &item("A", None, &["Drama", "Comedy"])
    );
    assert_eq!(items.missing().collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(items.unmatched.len(), 1);
    assert_eq!(
        (items.unmatched[0].token.as_str(), items.unmatched[0].line),
        ("99", 5)
    );
    let e = items.complete().unwrap_err();
    assert!(matches!(e, DataError::MissingSideRow { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("tiny.item") && e.contains("item `13`"),
        "the first missing row by file and token: {e}"
    );
    // With every catalogue row present, the row outside the catalogue is named by line.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.inter"),
        "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t1\n1\t11\t2\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t.item"),
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\tA\tX\n99\tZ\tX\n11\tB\tX\n",
    )
    .unwrap();
    let ds = Dataset::load(&dir.path().join("t.inter")).unwrap();
    let e = ds.side.items.unwrap().complete().unwrap_err().to_string();
    assert!(
        e.contains("t.item:3") && e.contains("item `99` does not occur"),
        "{e}"
    );
}

#[test]
fn a_genre_only_item_file_gives_features_but_no_item_information() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("g.inter"),
        "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("g.item"),
        "item_id:token\tclass:token_seq\n10\tA\n",
    )
    .unwrap();
    let ds = Dataset::load(&dir.path().join("g.inter")).unwrap();
    assert!(ds.features.is_some());
    assert!(ds.side.items.is_none());
}

/// Writes `text` as `name` in a fresh folder and returns the reader's error message.
fn item_error(name: &str, text: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    read_items(&path).unwrap_err().to_string()
}

fn user_error(name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    read_users(&path).unwrap_err().to_string()
}

#[test]
fn malformed_item_rows_are_named_by_file_and_line() {
    let head = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n";
    let cases: [(&str, String, &str); 6] = [
        (
            "a.item",
            format!("{head}1\tA\t95\tDrama\n"),
            "a.item:2: release year `95`",
        ),
        (
            "b.item",
            format!("{head}1\tA\t1995\n"),
            "b.item:2: expected 4 fields",
        ),
        (
            "c.item",
            format!("{head}1\t\t1995\tDrama\n"),
            "c.item:2: empty title",
        ),
        (
            "d.item",
            format!("{head}1\tA\t1995\tDrama\n\n1\tB\t1996\tDrama\n"),
            "d.item:4: item `1` listed twice (first at line 2)",
        ),
        (
            "e.item",
            "item_id:token\tclass:token_seq\n1\tA\n".into(),
            "`movie_title`",
        ),
        ("f.item", head.to_string(), "holds no rows"),
    ];
    for (name, text, expected) in cases {
        let e = item_error(name, text.as_bytes());
        assert!(e.contains(expected), "{name}: `{e}` lacks `{expected}`");
    }
    let flags =
        |f: &str| format!("1|A (1995)|01-Jan-1995|||{f}|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n");
    let e = item_error("u.item", flags("2").as_bytes());
    assert!(e.contains("u.item:1: genre flag `2` for unknown"), "{e}");
    let e = item_error("u.item", b"1|A (1995)|01-Jan-1995||\n");
    assert!(e.contains("u.item:1: expected 24 fields"), "{e}");
    let zeros = ["0"; 19].join("|");
    let e = item_error(
        "u.item",
        format!("{}2|B|01-Jan-95|||{zeros}\n", flags("0")).as_bytes(),
    );
    assert!(e.contains("u.item:2: release year `95`"), "{e}");
    // A year column that is no year is an error unless the title ends with one.
    let e2 = item_error(
        "g.item",
        format!("{head}1\tA (1990)\tV\tDrama\n2\tB\tV\tDrama\n").as_bytes(),
    );
    assert!(e2.contains("g.item:3: release year `V`"), "{e2}");
    // u.genre beside u.item decides the genres and their number.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("u.genre"), "none|0\nOne|2\n").unwrap();
    std::fs::write(dir.path().join("u.item"), "1|A (1990)|||url|0|1\n").unwrap();
    let e = read_items(&dir.path().join("u.item"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("u.genre:2: genre index `2` should be 1"), "{e}");
    std::fs::write(dir.path().join("u.genre"), "none|0\nOne|1\n").unwrap();
    let rows = read_items(&dir.path().join("u.item")).unwrap();
    // The title's `(1990)` is the year, the release date empty.
    assert_eq!(rows.rows["1"], (1, item("A", Some(1990), &["One"])));
}

#[test]
fn malformed_user_rows_are_named_by_file_and_line() {
    let head = "user_id:token\tage:token\tgender:token\toccupation:token\n";
    let cases = [
        (
            "a.user",
            format!("{head}1\told\tM\tx\n"),
            "a.user:2: age `old`",
        ),
        (
            "b.user",
            format!("{head}1\t20\tX\tx\n"),
            "b.user:2: gender `X` is neither M nor F",
        ),
        (
            "c.user",
            format!("{head}1\t20\tF\t\n"),
            "c.user:2: empty occupation",
        ),
        (
            "d.user",
            format!("{head}1\t20\tF\tx\n1\t21\tM\ty\n"),
            "d.user:3: user `1` listed twice",
        ),
        (
            "e.user",
            "user_id:token\tage:token\n1\t3\n".into(),
            "`gender`",
        ),
        (
            "u.user",
            "1|24|M|technician\n".into(),
            "u.user:1: expected 5 fields",
        ),
        (
            "u.user",
            "1|24|M|technician|1\n|3|F|x|2\n".into(),
            "u.user:2: empty user id",
        ),
    ];
    for (name, text, expected) in cases {
        let e = user_error(name, &text);
        assert!(e.contains(expected), "{name}: `{e}` lacks `{expected}`");
    }
}

/// The real files, where `cargo xtask data ml-100k` has put them: every item and user has a
/// row. Skipped, with a printed reason, elsewhere.
#[test]
fn ml100k_side_information_is_complete_where_the_data_is_present() {
    let dir = manifest_dir().join("../data/ml-100k");
    if !dir.is_dir() {
        println!(
            "skipped: {} absent (cargo xtask data ml-100k)",
            dir.display()
        );
        return;
    }
    let ds = Dataset::load(&dir).unwrap();
    let items = ds.side.items.as_ref().expect("ml-100k item file");
    let users = ds.side.users.as_ref().expect("ml-100k user file");
    assert_eq!(items.complete().unwrap().len(), 1682);
    assert_eq!(users.complete().unwrap().len(), 943);
    assert_eq!(
        items.get(1).unwrap().text(),
        "Toy Story (1995) | Animation, Children's, Comedy"
    );
}
