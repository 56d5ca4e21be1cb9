//! The fused Flex ops (GELU; the attention's scale, causal mask and softmax) against burn's
//! own: values and gradients through autodiff, GELU also on strided inputs and where erf
//! saturates. (On other backends the ops are burn's, and the tests compare burn with itself.)

use burn::tensor::activation::gelu as burn_gelu;
use burn::tensor::{Tensor, TensorData};
use meshrec_model::device::test_device;
use meshrec_model::gelu::gelu;
use meshrec_model::params::to_host;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs().max(1.0),
            "{what}[{i}]: {x} vs burn's {y}"
        );
    }
}

#[test]
fn fused_gelu_matches_burns_values_and_gradients() {
    let device = test_device().autodiff();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let dims = [3, 7, 41];
    let n: usize = dims.iter().product();
    // Mostly N(0, 2), plus the tails where Φ saturates and exact zeros.
    let mut xs: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
    xs[..6].copy_from_slice(&[0.0, -0.0, 9.5, -9.5, 30.0, -30.0]);
    let ws: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let x = || Tensor::<3>::from_data(TensorData::new(xs.clone(), dims), &device).require_grad();
    let w = Tensor::<3>::from_data(TensorData::new(ws.clone(), dims), &device);

    for strided in [false, true] {
        let view = |t: Tensor<3>| if strided { t.swap_dims(1, 2) } else { t };
        let (a, b) = (x(), x());
        let ours = gelu(view(a.clone()));
        let theirs = burn_gelu(view(b.clone()));
        close(
            &to_host(ours.clone()),
            &to_host(theirs.clone()),
            &format!("gelu (strided {strided})"),
        );
        let ga = (ours * view(w.clone())).sum().backward();
        let gb = (theirs * view(w.clone())).sum().backward();
        close(
            &to_host(a.grad(&ga).unwrap()),
            &to_host(b.grad(&gb).unwrap()),
            &format!("gradient (strided {strided})"),
        );
    }

    // Without autodiff (evaluation) the values are the same.
    let plain = Tensor::<3>::from_data(TensorData::new(xs.clone(), dims), &device.clone().inner());
    close(
        &to_host(gelu(plain.clone())),
        &to_host(burn_gelu(plain)),
        "gelu without autodiff",
    );
}

/// The fused scale + causal mask + softmax against burn's composition of them: values and
/// gradients (through a following product, as attention uses it).
#[test]
fn fused_causal_softmax_matches_burns_composition() {
    use burn::tensor::activation::softmax;
    use burn::tensor::Bool;
    use meshrec_model::causal_softmax::causal_softmax;
    let device = test_device().autodiff();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let dims = [2, 3, 9, 9];
    let n: usize = dims.iter().product();
    let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-6.0f32..6.0)).collect();
    let ws: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let x = || Tensor::<4>::from_data(TensorData::new(xs.clone(), dims), &device).require_grad();
    let w = Tensor::<4>::from_data(TensorData::new(ws.clone(), dims), &device);
    let scale = 0.35;
    let reference = |t: Tensor<4>| {
        let future: Tensor<2, Bool> = Tensor::tril_mask([9, 9], 0, &device);
        let masked = (t * scale).mask_fill(future.unsqueeze::<4>().expand(dims), f32::NEG_INFINITY);
        softmax(masked, 3)
    };
    let (a, b) = (x(), x());
    let ours = causal_softmax(a.clone(), scale);
    let theirs = reference(b.clone());
    let values = to_host(ours.clone());
    close(&values, &to_host(theirs.clone()), "probabilities");
    // Key j > i of row i is masked: probability exactly zero.
    for (r, row) in values.chunks(9).enumerate() {
        assert!(
            row[r % 9 + 1..].iter().all(|&p| p == 0.0),
            "row {r}: {row:?}"
        );
    }
    let ga = (ours * w.clone()).sum().backward();
    let gb = (theirs * w).sum().backward();
    close(
        &to_host(a.grad(&ga).unwrap()),
        &to_host(b.grad(&gb).unwrap()),
        "score gradients",
    );
}
