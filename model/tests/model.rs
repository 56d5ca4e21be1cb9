//! Model behaviour: causality, padding, the fused loss against burn's own, determinism and
//! learning on synthetic data.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use meshrec_model::config::{MlpKind, Positions};
use meshrec_model::data::{Batch, EvalSet, EvalSplit, SyntheticConfig, TrainSet, WindowPolicy};
use meshrec_model::device::test_device;
use meshrec_model::metrics::RankingMetrics;
use meshrec_model::optim::{AdamW, AdamWConfig};
use meshrec_model::params::{init_normal, param_paths, read_values, write_values};
use meshrec_model::step::{evaluate_batch, forward_backward, id_tensor};
use meshrec_model::{ModelConfig, NormKind, Preset, Recommender, SideInputs};

fn model(config: &ModelConfig, device: &Device, seed: u64) -> Recommender {
    let m = Recommender::new(config, &SideInputs::default(), device);
    init_normal(m, seed, config.init_std, config.n_layers, device)
}

fn variants() -> Vec<ModelConfig> {
    let base = ModelConfig::preset(Preset::Tiny, 30);
    let mut rope = base.clone();
    rope.positions = Positions::Rope;
    rope.mlp = MlpKind::SwiGlu;
    rope.norm = NormKind::Layer;
    vec![base, rope]
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_later_item_never_changes_an_earlier_output() {
    let device = test_device();
    for config in variants() {
        let m = model(&config, &device, 1);
        let a = [3u32, 7, 1, 9, 4, 4, 2, 8];
        let mut b = a;
        b[5] = 29;
        b[7] = 11;
        let ha = host(m.hidden(id_tensor(&a, 1, 8, &device)));
        let hb = host(m.hidden(id_tensor(&b, 1, 8, &device)));
        let d = config.d_model;
        for p in 0..8 {
            let same = (0..d).all(|i| (ha[p * d + i] - hb[p * d + i]).abs() < 1e-6);
            assert_eq!(same, p < 5, "position {p} ({:?})", config.positions);
        }
    }
}

/// The fused host loss and its graph-cut gradients equal burn's plain log-softmax loss.
#[test]
fn fused_loss_and_gradients_match_burn_autodiff() {
    let device = test_device().autodiff();
    for config in variants() {
        let m = model(&config, &device, 2);
        let batch = Batch {
            batch_size: 2,
            seq_len: 8,
            inputs: vec![1, 2, 3, 4, 5, 6, 0, 0, 9, 8, 7, 6, 5, 4, 3, 2],
            targets: vec![2, 3, 4, 5, 6, 7, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
        };
        let n = batch.num_targets() as f32;
        let fused = forward_backward(&m, &batch, 1.0 / n, &device);
        assert_eq!(fused.targets, 14);

        // Reference: full logits through burn, pad column masked, mean over real targets.
        let logits = m.logits(id_tensor(&batch.inputs, 2, 8, &device));
        let v = config.vocab();
        let logits = logits.reshape([16, v]).narrow(1, 1, v - 1);
        let logp = log_softmax(logits, 1);
        let (rows, cols): (Vec<i64>, Vec<i64>) = batch
            .targets
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != 0)
            .map(|(i, &t)| (i as i64, i64::from(t) - 1))
            .unzip();
        let k = rows.len();
        let picked = logp
            .select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(rows, [k]), &device),
            )
            .gather(
                1,
                Tensor::<2, Int>::from_data(TensorData::new(cols, [k, 1]), &device),
            );
        let loss = picked.sum().neg() / n;
        let loss_value = loss.clone().into_scalar::<f32>();
        let grads = meshrec_model::params::read_grads(&m, &loss.backward());
        assert!(
            ((fused.loss_sum as f32 / n) - loss_value).abs() < 1e-4 * loss_value.abs().max(1.0)
        );
        for (info, (a, b)) in param_paths(&m).iter().zip(fused.grads.iter().zip(&grads)) {
            let scale = b.iter().fold(1e-3f32, |acc, x| acc.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * scale, "{}: {x} vs {y}", info.path);
            }
        }
    }
}

#[test]
fn padding_carries_no_loss_and_no_gradient() {
    let device = test_device().autodiff();
    let config = ModelConfig::preset(Preset::Tiny, 30);
    let m = model(&config, &device, 3);
    let base = Batch {
        batch_size: 1,
        seq_len: 8,
        inputs: vec![4, 5, 6, 0, 0, 0, 0, 0],
        targets: vec![5, 6, 7, 0, 0, 0, 0, 0],
    };
    // Different padding ids after the sequence (right padding) change nothing.
    let mut other = base.clone();
    other.inputs[5] = 17;
    other.inputs[7] = 3;
    let a = forward_backward(&m, &base, 1.0, &device);
    let b = forward_backward(&m, &other, 1.0, &device);
    assert_eq!(a.targets, 3);
    assert!((a.loss_sum - b.loss_sum).abs() < 1e-5);
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        for (x, y) in ga.iter().zip(gb) {
            assert!((x - y).abs() < 1e-5);
        }
    }
    // A batch with no targets contributes nothing.
    let empty = Batch {
        targets: vec![0; 8],
        ..base
    };
    let e = forward_backward(&m, &empty, 1.0, &device);
    assert_eq!((e.loss_sum, e.targets), (0.0, 0));
    assert!(e.grads.iter().flatten().all(|&g| g == 0.0));
}

fn train(
    config: &ModelConfig,
    set: &TrainSet,
    seed: u64,
    epochs: u64,
    device: &Device,
) -> (Vec<f64>, Recommender) {
    let mut m = model(config, device, seed);
    let infos = param_paths(&m);
    let mut opt = AdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        infos.iter().map(|p| p.numel()),
    );
    let decay: Vec<bool> = infos.iter().map(|p| p.shape.len() > 1).collect();
    let mut losses = Vec::new();
    for epoch in 0..epochs {
        let (mut sum, mut count) = (0.0, 0);
        for batch in set.epoch(seed, epoch, 32) {
            let out = forward_backward(&m, &batch, 1.0 / batch.num_targets().max(1) as f32, device);
            sum += out.loss_sum;
            count += out.targets;
            let mut values = read_values(&m);
            opt.update(&mut values, &out.grads, 3e-3, &decay);
            m = write_values(m, &values, device);
        }
        losses.push(sum / count as f64);
    }
    (losses, m)
}

#[test]
fn training_on_synthetic_data_lowers_loss_and_is_deterministic() {
    let device = test_device().autodiff();
    let ds = SyntheticConfig {
        users: 120,
        items: 40,
        mean_length: 12.0,
        transition_prob: 0.8,
        seed: 5,
        ..Default::default()
    }
    .dataset()
    .unwrap();
    let config = ModelConfig::preset(Preset::Tiny, ds.num_items);
    let set = TrainSet::new(&ds, config.max_len, WindowPolicy::All).unwrap();
    let (losses, m) = train(&config, &set, 11, 6, &device);
    assert!(
        losses[5] < losses[0] * 0.85,
        "loss did not fall: {losses:?}"
    );
    let (again, _) = train(&config, &set, 11, 2, &device);
    assert_eq!(&losses[..2], &again[..], "same seed, different losses");

    // The trained model ranks the held-out items better than chance (HR@10 of chance is 10/40).
    let eval = EvalSet::new(&ds, config.max_len, EvalSplit::Valid);
    let mut metrics = RankingMetrics::default();
    for b in eval.batches(64) {
        evaluate_batch(&m, &b, &device, &mut metrics);
    }
    assert_eq!(metrics.users, eval.len());
    assert!(
        metrics.get("hr@10").unwrap() > 0.4,
        "{:?}",
        metrics.report()
    );
}

#[test]
fn config_validation_names_the_key() {
    let mut c = ModelConfig::preset(Preset::Small, 100);
    c.n_heads = 3;
    assert_eq!(c.validate().unwrap_err().key, "model.n_heads");
    let mut c = ModelConfig::preset(Preset::Small, 100);
    c.max_len = 0;
    assert_eq!(c.validate().unwrap_err().key, "model.max_len");
    let mut c = ModelConfig::preset(Preset::Small, 100);
    c.dropout = 1.0;
    assert_eq!(c.validate().unwrap_err().key, "model.dropout");
    assert_eq!(Preset::parse("huge").unwrap_err().key, "model.preset");
    // The parameter formula agrees with the built model.
    let device = test_device();
    for preset in [Preset::Tiny, Preset::Small] {
        let c = ModelConfig::preset(preset, 100);
        let m = Recommender::new(&c, &SideInputs::default(), &device);
        let counted: usize = param_paths(&m).iter().map(|p| p.numel()).sum();
        assert_eq!(counted as u64, c.num_params(), "{preset:?}");
    }
}
