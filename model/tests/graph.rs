//! The fusion graph: built from the training split only (no valid or test interaction leaks
//! in), typed relations from the side files, LightGCN's normalisation, clear errors.

use std::path::Path;

use meshrec_model::data::{Dataset, InteractionGraph, Relation};

/// Three users; user 1's valid and test items (`v1`, `t1`) and user 2's test item (`t2`)
/// occur nowhere in any training history, so no edge may touch them.
const INTER: &str = "user_id:token\titem_id:token\ttimestamp:float\n\
    1\ta\t1\n1\tb\t2\n1\tc\t3\n1\tv1\t4\n1\tt1\t5\n\
    2\tb\t1\n2\tc\t2\n2\ta\t3\n2\td\t4\n2\tt2\t5\n\
    3\ta\t1\n3\td\t2\n3\tb\t3\n";
const ITEMS: &str = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
    a\tAlpha\t1990\tDrama\nb\tBeta\t1991\tComedy Drama\nc\tGamma\t1992\tHorror\n\
    d\tDelta\t1993\tDrama\nv1\tValid One\t1994\tComedy\nt1\tTest One\t1995\tWar\n\
    t2\tTest Two\t1996\tDrama\n";
const USERS: &str = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n\
    1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t23\tM\ttechnician\t32067\n";

fn dataset(dir: &Path, with_users: bool) -> Dataset {
    std::fs::write(dir.join("g.inter"), INTER).unwrap();
    std::fs::write(dir.join("g.item"), ITEMS).unwrap();
    if with_users {
        std::fs::write(dir.join("g.user"), USERS).unwrap();
    }
    Dataset::load(&dir.join("g.inter")).unwrap()
}

fn item_id(ds: &Dataset, token: &str) -> u32 {
    ds.item_tokens.iter().position(|t| t == token).unwrap() as u32
}

#[test]
fn no_held_out_interaction_enters_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), true);
    let graph = InteractionGraph::build(&ds, &Relation::ALL).unwrap();
    // Every edge is a (user, item) of that user's training history …
    for &(u, i) in &graph.user_item.edges {
        assert!(
            ds.users[u as usize].train.contains(&i),
            "edge ({u}, {i}) is not a training interaction"
        );
    }
    // … every training interaction is an edge …
    let train_pairs: usize = ds
        .users
        .iter()
        .map(|u| {
            u.train
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        })
        .sum();
    assert_eq!(graph.user_item.edges.len(), train_pairs);
    // … and no user is linked to their own valid or test item.
    for (u, split) in ds.users.iter().enumerate() {
        for held in split.valid.iter().chain(&split.test) {
            if !split.train.contains(held) {
                assert!(
                    !graph.user_item.edges.contains(&(u as u32, *held)),
                    "user {u} linked to held-out item {held}"
                );
            }
        }
    }
    // Items only ever held out have no interaction edge at all.
    let (_, item_degree) = graph.user_item.degrees();
    for token in ["v1", "t1", "t2"] {
        assert_eq!(item_degree[item_id(&ds, token) as usize], 0, "{token}");
    }
    assert_eq!(item_degree[0], 0, "the padding row has no edge");
}

#[test]
fn relations_come_from_the_side_files() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), true);
    let graph = InteractionGraph::build(&ds, &Relation::ALL).unwrap();
    let genres = graph.item_genre.as_ref().unwrap();
    let drama = graph.genre_names.iter().position(|g| g == "Drama").unwrap() as u32;
    let comedy = graph
        .genre_names
        .iter()
        .position(|g| g == "Comedy")
        .unwrap() as u32;
    let b = item_id(&ds, "b");
    assert!(genres.edges.contains(&(b, drama)) && genres.edges.contains(&(b, comedy)));
    // Side information of held-out items is not an interaction: their genres stay.
    assert!(genres.edges.contains(&(item_id(&ds, "v1"), comedy)));
    let attrs = graph.user_attribute.as_ref().unwrap();
    let name = |i: u32| graph.attribute_names[i as usize].as_str();
    let user = |u: u32| -> Vec<&str> {
        attrs
            .edges
            .iter()
            .filter(|e| e.0 == u)
            .map(|e| name(e.1))
            .collect()
    };
    let token_id = |t: &str| ds.user_tokens.iter().position(|x| x == t).unwrap() as u32;
    assert_eq!(
        user(token_id("1")),
        vec!["age:18-24", "gender:M", "occupation:technician"]
    );
    assert_eq!(
        user(token_id("2")),
        vec!["age:50-55", "gender:F", "occupation:other"]
    );
    // Users 1 and 3 share all three attribute nodes: two ages, two genders, two jobs.
    assert_eq!(user(token_id("3")), user(token_id("1")));
    assert_eq!(graph.attribute_names.len(), 6);
    assert_eq!(graph.num_attribute_nodes(), graph.genre_names.len() + 6);
}

#[test]
fn the_propagation_matrix_is_symmetrically_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), true);
    let graph = InteractionGraph::build(&ds, &[Relation::UserItem]).unwrap();
    assert!(graph.item_genre.is_none() && graph.user_attribute.is_none());
    let b = &graph.user_item;
    let (du, di) = b.degrees();
    let m = b.normalised_dense();
    for u in 0..b.left {
        for i in 0..b.right {
            let want = if b.edges.contains(&(u as u32, i as u32)) {
                1.0 / ((du[u] * di[i]) as f32).sqrt()
            } else {
                0.0
            };
            assert!((m[u * b.right + i] - want).abs() < 1e-7);
        }
    }
}

#[test]
fn a_missing_user_file_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), false);
    let err = InteractionGraph::build(&ds, &Relation::ALL)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("features.graph_relations") && err.contains("users"),
        "{err}"
    );
    // Without that relation it builds.
    assert!(InteractionGraph::build(&ds, &[Relation::UserItem, Relation::ItemGenre]).is_ok());
}
