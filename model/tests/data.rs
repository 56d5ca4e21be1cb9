//! Data readers, the leave-one-out split and batching against hand-written fixtures.

use std::path::Path;

use meshrec_model::data::{
    read_interactions, Dataset, EvalSet, EvalSplit, InteractionFormat, SyntheticConfig, TrainSet,
    WindowPolicy, PAD,
};
use meshrec_model::DataError;

/// Read at run time (cargo sets it for tests too): a test binary in a target directory
/// shared by several clones may have been built from another clone's path.
fn fixture(name: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
            Into::into,
        )
        .join("tests/fixtures")
        .join(name)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn split_is_chronological_leave_one_out() {
    let ds = Dataset::load(&fixture("tiny.inter")).unwrap();
    assert_eq!(ds.num_items, 5);
    assert_eq!(ds.num_interactions, 8);
    // items 10..14 -> ids 1..5; user 1 by time: 11(50) 10(100) 12(200) 13(300)
    let u1 = &ds.users[0];
    assert_eq!(u1.train, vec![2, 1]);
    assert_eq!(u1.valid, Some(3));
    assert_eq!(u1.test, Some(4));
    // user 2: 11(10) 10(20) 14(30)
    assert_eq!(ds.users[1].train, vec![2]);
    assert_eq!((ds.users[1].valid, ds.users[1].test), (Some(1), Some(5)));
    // user 3 has one interaction: train only, not evaluated
    assert_eq!(ds.users[2].train, vec![3]);
    assert_eq!(ds.users[2].test, None);
    assert_eq!(ds.num_eval_users(), 2);
    // genres from the .item file beside it; item 99 is not in the catalogue
    let f = ds.features.as_ref().unwrap();
    assert_eq!(f.genre_names, vec!["Action", "Comedy", "Drama", "Horror"]);
    assert_eq!(f.item_genres[1], vec![2, 1]);
    assert!(f.item_genres[4].is_empty());
}

#[test]
fn eval_sets_use_the_right_context_and_mask_history() {
    let ds = Dataset::load(&fixture("tiny.inter")).unwrap();
    let valid = EvalSet::new(&ds, 2, EvalSplit::Valid);
    assert_eq!(valid.targets, vec![3, 1]);
    assert_eq!(valid.contexts, vec![2, 1, 2, PAD]);
    assert_eq!(valid.lengths, vec![2, 1]);
    let test = EvalSet::new(&ds, 2, EvalSplit::Test);
    assert_eq!(test.targets, vec![4, 5]);
    assert_eq!(test.contexts, vec![1, 3, 2, 1]);
    assert_eq!(test.histories[0], vec![2, 1, 3]);
}

#[test]
fn training_windows_cover_every_target_once() {
    let ds = SyntheticConfig {
        users: 20,
        items: 50,
        mean_length: 30.0,
        ..Default::default()
    }
    .dataset()
    .unwrap();
    let all = TrainSet::new(&ds, 8, WindowPolicy::All).unwrap();
    let expected: usize = ds
        .users
        .iter()
        .map(|u| u.train.len().saturating_sub(1))
        .sum();
    assert_eq!(all.num_targets(), expected);
    let last = TrainSet::new(&ds, 8, WindowPolicy::Last).unwrap();
    assert_eq!(
        last.len(),
        ds.users.iter().filter(|u| u.train.len() > 1).count()
    );
    // targets are the inputs shifted by one, padding at the end
    for row in 0..all.len() {
        let (i, t) = (
            &all.inputs[row * 8..row * 8 + 8],
            &all.targets[row * 8..row * 8 + 8],
        );
        for p in 0..7 {
            if t[p + 1] != PAD {
                assert_eq!(i[p + 1], t[p]);
            }
        }
    }
    assert!(matches!(
        TrainSet::new(&ds, 0, WindowPolicy::All),
        Err(DataError::InvalidParameter { key: "max_len", .. })
    ));
}

#[test]
fn batches_are_deterministic_per_seed_and_epoch() {
    let ds = SyntheticConfig {
        users: 30,
        ..Default::default()
    }
    .dataset()
    .unwrap();
    let set = TrainSet::new(&ds, 10, WindowPolicy::All).unwrap();
    let a: Vec<_> = set.epoch(7, 1, 16).collect();
    let b: Vec<_> = set.epoch(7, 1, 16).collect();
    let c: Vec<_> = set.epoch(7, 2, 16).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.iter().map(|b| b.batch_size).sum::<usize>(), set.len());
    let mut it = set.epoch(7, 1, 16);
    it.skip_batches(2);
    assert_eq!(it.next().as_ref(), a.get(2));
}

#[test]
fn movielens_formats_parse() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "u.data", "1\t5\t3\t881250949\n2\t7\t4\t881250950\n");
    let raw = read_interactions(&p, InteractionFormat::MovieLens100k).unwrap();
    assert_eq!(
        (raw[1].user.as_str(), raw[1].item.as_str(), raw[1].timestamp),
        ("2", "7", 881250950.0)
    );
    let p = write(&dir, "ratings.dat", "1::1193::5::978300760\n");
    let raw = read_interactions(&p, InteractionFormat::MovieLens1m).unwrap();
    assert_eq!(raw[0].item, "1193");
}

fn err_text(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = write(dir, name, text);
    Dataset::load(&p).unwrap_err().to_string()
}

#[test]
fn malformed_inputs_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_text(&dir, "u.data", "1\t2\t3\t4\n1\t2\t3\n");
    assert!(
        e.contains("u.data:2") && e.contains("expected 4 fields"),
        "{e}"
    );
    let e = err_text(&dir, "u.data", "1\t2\t3\tyesterday\n");
    assert!(
        e.contains("u.data:1") && e.contains("timestamp `yesterday`"),
        "{e}"
    );
    let e = err_text(&dir, "u.data", "\t2\t3\t4\n");
    assert!(e.contains("empty user id"), "{e}");
    let e = err_text(&dir, "a.inter", "user_id:token\titem_id:token\n1\t2\n");
    assert!(e.contains("a.inter") && e.contains("`timestamp`"), "{e}");
    let e = err_text(
        &dir,
        "b.inter",
        "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n",
    );
    assert!(e.contains("b.inter:3") && e.contains("expected 3"), "{e}");
    let e = err_text(&dir, "c.inter", "");
    assert!(
        e.contains("c.inter") && e.contains("no interactions"),
        "{e}"
    );
    let e = err_text(&dir, "ratings.dat", "1::2::3\n");
    assert!(e.contains("ratings.dat:1"), "{e}");
    write(
        &dir,
        "d.inter",
        "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n",
    );
    let e = err_text(
        &dir,
        "d.item",
        "item_id:token\tclass:token_seq\n2\tA\n2\tB\n",
    );
    // the .item is read beside d.inter
    let e2 = Dataset::load(&dir.path().join("d.inter"))
        .unwrap_err()
        .to_string();
    assert!(
        e2.contains("d.item:3") && e2.contains("listed twice"),
        "{e} / {e2}"
    );
    let missing = Dataset::load(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope"), "{missing}");
    let empty = tempfile::tempdir().unwrap();
    let e = Dataset::load(empty.path()).unwrap_err().to_string();
    assert!(e.contains("no interaction file"), "{e}");
}

#[test]
fn synthetic_rejects_bad_parameters() {
    let e = SyntheticConfig {
        items: 1,
        ..Default::default()
    }
    .dataset()
    .unwrap_err();
    assert!(matches!(
        e,
        DataError::InvalidParameter {
            key: "synthetic.items",
            ..
        }
    ));
    let e = SyntheticConfig {
        zipf_exponent: -1.0,
        ..Default::default()
    }
    .dataset()
    .unwrap_err();
    assert!(matches!(
        e,
        DataError::InvalidParameter {
            key: "synthetic.zipf_exponent",
            ..
        }
    ));
}

/// Cold items are the bottom popularity quintile of the training split (ties included), and
/// the cold test subset keeps exactly the cases whose target is one.
#[test]
fn cold_items_and_the_cold_test_subset() {
    let raw: Vec<meshrec_model::data::RawInteraction> = (0..8)
        .flat_map(|u| {
            // Item `i` is trained on by users `0..i`, so popularity rises with the id;
            // every user's last two items (valid, test) are 9 and `1 + u % 3`.
            let mut items: Vec<usize> = (1..=8).filter(|&i| u < i).collect();
            items.extend([9, 1 + u % 3]);
            items
                .into_iter()
                .enumerate()
                .map(move |(t, i)| meshrec_model::data::RawInteraction {
                    user: format!("u{u}"),
                    item: format!("{i}"),
                    timestamp: t as f64,
                    line: u * 20 + t + 1,
                })
        })
        .collect();
    let ds = Dataset::from_interactions("pop", &raw);
    let counts = ds.training_counts();
    let cold = ds.cold_items();
    let id = |token: &str| ds.item_tokens.iter().position(|t| t == token).unwrap();
    // Nine items: the quintile threshold is the lowest count (item 9 is only ever held out).
    assert_eq!(counts[id("9")], 0);
    assert!(cold[id("9")]);
    assert!(!cold[0], "padding is never cold");
    assert_eq!(cold.iter().filter(|&&c| c).count(), 1);
    let test = EvalSet::new(&ds, 4, EvalSplit::Test);
    let only = test.filtered(|t| t as usize == id("2"));
    assert!(!only.is_empty() && only.targets.iter().all(|&t| t as usize == id("2")));
    assert_eq!(only.contexts.len(), only.len() * 4);
    let all = test.filtered(|_| true);
    assert_eq!(all, test);
}
