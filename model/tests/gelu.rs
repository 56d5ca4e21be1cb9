//! The fused GELU against burn's own: values and gradients through autodiff, on contiguous
//! and strided inputs, across the range where erf saturates. (On backends other than Flex
//! `meshrec_model::gelu::gelu` is burn's, and this test compares it with itself.)

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
