//! The fused item table: its gradients (through the text projection and the graph
//! propagation) against finite differences of the loss, and the baked serving checkpoint
//! ranking exactly as the fused model does.

use std::sync::Arc;

use burn::tensor::Device;
use meshrec_model::checkpoint::{self, CheckpointMeta};
use meshrec_model::data::{
    Batch, Bipartite, Dataset, EvalSet, EvalSplit, InteractionGraph, RawInteraction,
};
use meshrec_model::device::test_device;
use meshrec_model::metrics::RankingMetrics;
use meshrec_model::params::{init_normal, param_paths, read_values, write_values};
use meshrec_model::step::{evaluate_batch, forward_backward};
use meshrec_model::{ModelConfig, Preset, Recommender, SideInputs, TextFeatures};

const ITEMS: usize = 20;
const USERS: usize = 6;

fn dataset() -> Dataset {
    let raw: Vec<RawInteraction> = (0..USERS)
        .flat_map(|u| {
            (0..7).map(move |t| RawInteraction {
                user: format!("u{u}"),
                item: format!("{}", 1 + (u * 3 + t * 5) % ITEMS),
                timestamp: t as f64,
                line: u * 7 + t + 1,
            })
        })
        .collect();
    Dataset::from_interactions("tiny", &raw)
}

fn side(ds: &Dataset) -> SideInputs {
    let vocab = ds.num_items + 1;
    let dim = 5;
    let mut values = vec![0.0f32; dim];
    values.extend((dim..vocab * dim).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0));
    let mut graph = InteractionGraph::build(ds, &[]).unwrap();
    graph.item_genre = Some(Bipartite {
        left: vocab,
        right: 3,
        edges: (1..vocab as u32).map(|i| (i, i % 3)).collect(),
    });
    graph.genre_names = vec!["a".into(), "b".into(), "c".into()];
    SideInputs {
        item_genres: None,
        text: Some(Arc::new(TextFeatures { dim, values })),
        graph: Some(Arc::new(graph)),
    }
}

fn setup(device: &Device) -> (ModelConfig, SideInputs, Recommender, Dataset) {
    let ds = dataset();
    let side = side(&ds);
    let mut config = ModelConfig::preset(Preset::Tiny, ds.num_items);
    config.fusion = side.fusion_shape(2);
    config.validate().unwrap();
    let model = Recommender::new(&config, &side, device);
    // A larger scale than training's so the fusion's share of the loss is well above
    // rounding.
    let model = init_normal(model, 5, 0.3, config.n_layers, device);
    (config, side, model, ds)
}

fn batch() -> Batch {
    Batch {
        batch_size: 2,
        seq_len: 8,
        inputs: vec![3, 5, 7, 1, 9, 2, 0, 0, 4, 4, 8, 6, 10, 12, 14, 16],
        targets: vec![5, 7, 1, 9, 2, 11, 0, 0, 4, 8, 6, 10, 12, 14, 16, 18],
    }
}

#[test]
fn fusion_gradients_match_finite_differences() {
    let device = test_device().autodiff();
    let (_, _, model, _) = setup(&device);
    let infos = param_paths(&model);
    let values = read_values(&model);
    let batch = batch();
    let out = forward_backward(&model, &batch, 1.0, &device);
    let loss_at = |values: &[Vec<f32>]| {
        let m = write_values(model.clone(), values, &device);
        forward_backward(&m, &batch, 1.0, &device).loss_sum
    };
    let mut checked = 0;
    for (p, info) in infos.iter().enumerate() {
        if !(info.path.starts_with("embed.fusion") || info.path == "embed.items.weight") {
            continue;
        }
        // A few coordinates of each: the text projection, the user and genre nodes, and
        // the ID rows (whose gradient now also flows through the propagation).
        for &k in &[0usize, info.numel() / 2, info.numel() - 1] {
            let h = 1e-2f32;
            let mut plus = values.clone();
            plus[p][k] += h;
            let mut minus = values.clone();
            minus[p][k] -= h;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * f64::from(h));
            let analytic = f64::from(out.grads[p][k]);
            let scale = numeric.abs().max(analytic.abs()).max(1e-2);
            assert!(
                (numeric - analytic).abs() / scale < 2e-2,
                "{}[{k}]: analytic {analytic}, numeric {numeric}",
                info.path
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "checked {checked} coordinates");
    let users = infos
        .iter()
        .position(|i| i.path == "embed.fusion.graph.users.weight")
        .unwrap();
    assert!(
        out.grads[users].iter().any(|&g| g != 0.0),
        "the user nodes learn"
    );
}

#[test]
fn the_baked_checkpoint_ranks_as_the_fused_model() {
    let device = test_device();
    let (config, _, model, ds) = setup(&device);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fused.safetensors");
    let meta = CheckpointMeta::new("fused", &config, &ds);
    checkpoint::save(&model, &meta, None, &path).unwrap();
    let raw = checkpoint::read_raw_metadata(&path).unwrap();
    assert!(raw.contains_key(checkpoint::keys::FUSED_FROM));
    let (served, served_meta) = checkpoint::load(&path, &device).unwrap();
    assert!(served.embed.fusion.is_none() && !served_meta.config.fusion.is_active());
    let set = EvalSet::new(&ds, config.max_len, EvalSplit::Test);
    let rank = |m: &Recommender| {
        let mut metrics = RankingMetrics::default();
        for b in set.batches(4) {
            evaluate_batch(m, &b, &device, &mut metrics);
        }
        metrics.report()
    };
    assert_eq!(rank(&served), rank(&model));
    // Loading it into a fused model (training's best model back) bakes that model too.
    let mut again = model.clone();
    checkpoint::load_weights(&mut again, &path).unwrap();
    assert!(again.embed.fusion.is_none());
    assert_eq!(rank(&again), rank(&model));
}
