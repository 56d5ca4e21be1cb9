//! Unbiasedness of the stochastic methods (QSGD, random-k, TernGrad): the mean of many
//! seeded draws is within a few standard errors of the input, element by element.

mod common;

use common::normal;
use meshrec_compress::MethodConfig;

/// Draws `draws` compressions with seeds 0.., returns per-element (mean, standard error).
fn moments(cfg: &MethodConfig, x: &[f32], draws: usize) -> Vec<(f64, f64)> {
    let mut c = cfg.build().unwrap();
    let n = x.len();
    let mut s = vec![0f64; n];
    let mut s2 = vec![0f64; n];
    for seed in 0..draws as u64 {
        let y = c.compress(x, seed).unwrap().decode(n).unwrap();
        for i in 0..n {
            s[i] += y[i] as f64;
            s2[i] += (y[i] as f64).powi(2);
        }
    }
    let d = draws as f64;
    (0..n)
        .map(|i| {
            let mean = s[i] / d;
            let var = (s2[i] / d - mean * mean).max(0.0);
            (mean, (var / d).sqrt())
        })
        .collect()
}

fn assert_unbiased(cfg: MethodConfig) {
    let x = normal(48, 17);
    let m = moments(&cfg, &x, 4000);
    let mut worst = 0f64;
    for (i, (&xi, &(mean, se))) in x.iter().zip(&m).enumerate() {
        let z = (mean - xi as f64).abs() / se.max(1e-9);
        worst = worst.max(z);
        assert!(
            (mean - xi as f64).abs() <= 5.0 * se + 1e-6,
            "{cfg:?}: element {i}: mean {mean} vs {xi} (se {se})"
        );
    }
    // The draws really are random (otherwise the test above proves nothing).
    assert!(m.iter().any(|&(_, se)| se > 1e-4), "{cfg:?}: no variance");
    eprintln!("{cfg:?}: worst |z| = {worst:.2}");
}

#[test]
fn qsgd_is_unbiased() {
    assert_unbiased(MethodConfig::Qsgd {
        levels: 4,
        bucket: 16,
    });
    assert_unbiased(MethodConfig::Qsgd {
        levels: 1,
        bucket: 48,
    });
}

#[test]
fn randk_is_unbiased() {
    assert_unbiased(MethodConfig::RandK {
        ratio: 0.25,
        unbiased: true,
    });
}

#[test]
fn terngrad_is_unbiased() {
    assert_unbiased(MethodConfig::TernGrad { chunk: 8 });
}

#[test]
fn randk_without_scaling_is_biased_by_k_over_n() {
    // Control: the unscaled variant's mean is (k / n) x, so the test above can fail.
    let cfg = MethodConfig::RandK {
        ratio: 0.25,
        unbiased: false,
    };
    let x = normal(48, 17);
    let m = moments(&cfg, &x, 4000);
    for (&xi, &(mean, se)) in x.iter().zip(&m) {
        assert!((mean - 0.25 * xi as f64).abs() <= 5.0 * se + 1e-6);
    }
}
