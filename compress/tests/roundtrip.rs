//! Round trips of every method through the wire format, exact byte counts, and the
//! top-k selection property.

mod common;

use common::{heavy, normal};
use meshrec_compress::{wire, Apply, MethodConfig, MethodId, Payload};
use proptest::prelude::*;

fn all_methods() -> Vec<MethodConfig> {
    vec![
        MethodConfig::Identity,
        MethodConfig::Fp16,
        MethodConfig::Bf16,
        MethodConfig::TopK { ratio: 0.1 },
        MethodConfig::DgcTopK {
            ratio: 0.1,
            sample_ratio: 0.05,
        },
        MethodConfig::RandK {
            ratio: 0.1,
            unbiased: true,
        },
        MethodConfig::Threshold { threshold: 0.5 },
        MethodConfig::Qsgd {
            levels: 7,
            bucket: 128,
        },
        MethodConfig::TernGrad { chunk: 100 },
        MethodConfig::Sign { chunk: 64 },
        MethodConfig::PowerSgd {
            rank: 2,
            min_compression_rate: 1.0,
        },
    ]
}

/// Expected wire size for `n` elements, computed independently of the encoder.
fn expected_wire(cfg: &MethodConfig, n: usize, payload: &Payload) -> usize {
    let h = payload.header().expect("valid header");
    let base = 16;
    match *cfg {
        MethodConfig::Identity => base + 4 * n,
        MethodConfig::Fp16 | MethodConfig::Bf16 => base + 2 * n,
        MethodConfig::TopK { .. }
        | MethodConfig::DgcTopK { .. }
        | MethodConfig::Threshold { .. } => {
            let wire::Params::Sparse { k, .. } = h.params else {
                panic!("sparse params")
            };
            // Indices as varint gaps: 7 bits of the gap per byte.
            let mut idx = Vec::new();
            wire::sparse_indices(payload.as_bytes(), &mut idx).unwrap();
            assert_eq!(idx.len(), k as usize);
            let mut next = 0u64;
            let gap_bytes: usize = idx
                .iter()
                .map(|&i| {
                    let gap = i as u64 - next;
                    next = i as u64 + 1;
                    (64 - gap.leading_zeros() as usize).max(1).div_ceil(7)
                })
                .sum();
            base + 16 + gap_bytes + 4 * k as usize
        }
        MethodConfig::RandK { ratio, .. } => base + 16 + 4 * (ratio * n as f64).ceil() as usize,
        MethodConfig::Qsgd { levels, bucket } => {
            let bits = 1 + (32 - levels.leading_zeros()) as usize;
            base + 8 + 4 * n.div_ceil(bucket) + (n * bits).div_ceil(8)
        }
        MethodConfig::TernGrad { chunk } => base + 4 + 4 * n.div_ceil(chunk) + n.div_ceil(4),
        MethodConfig::Sign { chunk } => base + 4 + 4 * n.div_ceil(chunk) + n.div_ceil(8),
        MethodConfig::PowerSgd { .. } => match h.params {
            wire::Params::PowerSgd { rows, cols, rank } => {
                base + 12 + 4 * (rows + cols) as usize * rank as usize
            }
            _ => base + 4 * n,
        },
    }
}

#[test]
fn every_method_round_trips_with_exact_byte_count() {
    for cfg in all_methods() {
        let mut c = cfg.build().unwrap();
        for n in [0usize, 1, 7, 100, 1000, 4099] {
            let x = normal(n, n as u64 + 1);
            let p = c.compress(&x, 42).unwrap();
            assert_eq!(p.wire_len(), expected_wire(&cfg, n, &p), "{cfg:?} n={n}");
            let h = p.header().unwrap();
            assert_eq!(h.len, n as u64);
            assert_eq!(h.total_len().unwrap(), p.wire_len());
            let mut y = vec![f32::NAN; n];
            c.decompress_into(p.as_bytes(), &mut y, Apply::Set).unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{cfg:?} n={n}");
            // Add and Sub agree with Set.
            let base = normal(n, 99);
            let mut a = base.clone();
            c.decompress_into(p.as_bytes(), &mut a, Apply::Add).unwrap();
            let mut s = base.clone();
            c.decompress_into(p.as_bytes(), &mut s, Apply::Sub).unwrap();
            for i in 0..n {
                assert!((a[i] - (base[i] + y[i])).abs() <= 1e-5 * (1.0 + y[i].abs()));
                assert!((s[i] - (base[i] - y[i])).abs() <= 1e-5 * (1.0 + y[i].abs()));
            }
            // Method-specific accuracy.
            match cfg {
                MethodConfig::Identity => assert_eq!(x, y),
                MethodConfig::Fp16 => {
                    for (a, b) in x.iter().zip(&y) {
                        assert!((a - b).abs() <= a.abs() * 1e-3 + 6e-8, "{a} vs {b}");
                    }
                }
                MethodConfig::Bf16 => {
                    for (a, b) in x.iter().zip(&y) {
                        assert!((a - b).abs() <= a.abs() * 4e-3, "{a} vs {b}");
                    }
                }
                MethodConfig::TopK { .. }
                | MethodConfig::DgcTopK { .. }
                | MethodConfig::Threshold { .. }
                | MethodConfig::RandK {
                    unbiased: false, ..
                } => {
                    // Kept values are exact, others zero.
                    for (a, b) in x.iter().zip(&y) {
                        assert!(*b == 0.0 || a == b);
                    }
                }
                MethodConfig::Sign { chunk } => {
                    for (c, (xs, ys)) in x.chunks(chunk).zip(y.chunks(chunk)).enumerate() {
                        let scale = xs.iter().map(|v| v.abs()).sum::<f32>() / xs.len() as f32;
                        for (a, b) in xs.iter().zip(ys) {
                            assert!((b.abs() - scale).abs() <= 1e-5 * scale, "chunk {c}");
                            assert_eq!(a.is_sign_negative(), b.is_sign_negative());
                        }
                    }
                }
                MethodConfig::RandK {
                    ratio,
                    unbiased: true,
                } => check_randk_unbiased(&x, &y, ratio),
                MethodConfig::Qsgd { levels, bucket } => check_qsgd(&x, &y, levels, bucket),
                MethodConfig::TernGrad { chunk } => check_terngrad(&x, &y, chunk),
                MethodConfig::PowerSgd {
                    rank,
                    min_compression_rate,
                } => check_powersgd(&x, &y, &p, rank, min_compression_rate),
            }
        }
    }
}

/// Unbiased random-k: exactly `k = ceil(ratio * n)` (clamped to 1..=n for n > 0)
/// elements survive, each scaled by n / k; the rest are zero.
fn check_randk_unbiased(x: &[f32], y: &[f32], ratio: f64) {
    let n = x.len();
    let k = if n == 0 {
        0
    } else {
        ((ratio * n as f64).ceil() as usize).clamp(1, n)
    };
    assert!(x.iter().all(|&v| v != 0.0), "test data must have no zeros");
    let kept = y.iter().filter(|&&v| v != 0.0).count();
    assert_eq!(kept, k, "randk unbiased n={n}: kept {kept}, want {k}");
    let scale = n as f64 / k.max(1) as f64;
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        if b != 0.0 {
            let want = a as f64 * scale;
            assert!(
                (b as f64 - want).abs() <= 1e-6 * want.abs(),
                "randk unbiased n={n} element {i}: {b} vs {a} * {n} / {k}"
            );
        }
    }
}

/// QSGD: in each bucket, with `norm` its L2 norm, every |y| is `norm * l / levels`
/// for an integer l in 0..=levels, the sign is x's, and stochastic rounding moves x
/// to one of its two adjacent levels, so |y - x| <= norm / levels.
fn check_qsgd(x: &[f32], y: &[f32], levels: u32, bucket: usize) {
    let s = levels as f64;
    for (b, (xs, ys)) in x.chunks(bucket).zip(y.chunks(bucket)).enumerate() {
        let norm = xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0);
        let unit = norm / s;
        for (j, (&a, &v)) in xs.iter().zip(ys).enumerate() {
            let t = v.abs() as f64 / unit;
            let l = t.round();
            assert!(
                (t - l).abs() <= 1e-4 && l <= s,
                "qsgd bucket {b} element {j}: |y| = {v} is {t} levels of {unit}"
            );
            if v != 0.0 {
                assert_eq!(a.is_sign_negative(), v.is_sign_negative(), "qsgd sign");
            }
            assert!(
                (v as f64 - a as f64).abs() <= unit * (1.0 + 1e-4),
                "qsgd bucket {b} element {j}: {a} -> {v}, more than one level ({unit})"
            );
        }
    }
}

/// TernGrad: in each chunk, with s = max |x|, every y is -s, 0 or +s, and a non-zero
/// y has x's sign.
fn check_terngrad(x: &[f32], y: &[f32], chunk: usize) {
    for (c, (xs, ys)) in x.chunks(chunk).zip(y.chunks(chunk)).enumerate() {
        let s = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(s > 0.0);
        for (j, (&a, &v)) in xs.iter().zip(ys).enumerate() {
            assert!(
                v == 0.0 || v.abs() == s,
                "terngrad chunk {c} element {j}: {v} not in {{-{s}, 0, {s}}}"
            );
            if v != 0.0 {
                assert_eq!(a.is_sign_negative(), v.is_sign_negative(), "terngrad sign");
            }
        }
    }
}

/// PowerSGD on `compress`'s default view (near-square: cols = ceil(sqrt(n)), rows =
/// ceil(n / cols), partial last row). It goes dense, y == x, for a vector or where the
/// factors `(rows + cols) * rank` are not `min_rate` times smaller than `rows * cols`.
/// Otherwise y = P P^T M with P's columns orthonormal (or zero): an orthogonal
/// projection of the zero-padded matrix, so ||x - y||^2 + ||y||^2 <= ||x||^2 (equal
/// up to the padding cells, which y does not include), hence ||x - y|| <= ||x||.
fn check_powersgd(x: &[f32], y: &[f32], p: &Payload, rank: usize, min_rate: f64) {
    let n = x.len();
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = if cols == 0 { 0 } else { n.div_ceil(cols) };
    let r = rank.min(rows).min(cols);
    let dense = rows < 2
        || cols < 2
        || (min_rate != 0.0 && (rows * cols) as f64 <= min_rate * ((rows + cols) * r) as f64);
    let method = p.header().unwrap().method;
    if dense {
        assert_eq!(method, MethodId::Identity, "powersgd n={n} should go dense");
        assert_eq!(x, y, "powersgd dense n={n}");
        return;
    }
    assert_eq!(method, MethodId::PowerSgd, "powersgd n={n} should compress");
    let x2: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let y2: f64 = y.iter().map(|&v| (v as f64).powi(2)).sum();
    let e2: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    assert!(
        e2.sqrt() <= x2.sqrt() * (1.0 + 1e-5),
        "powersgd n={n}: ||x - y|| = {} > ||x|| = {}",
        e2.sqrt(),
        x2.sqrt()
    );
    assert!(
        e2 + y2 <= x2 * (1.0 + 1e-5),
        "powersgd n={n}: not a projection: {e2} + {y2} > {x2}"
    );
    // One power step from a random start captures some energy.
    assert!(y2 > 0.0, "powersgd n={n}: decoded to zero");
}

#[test]
fn fp16_saturates_instead_of_overflowing() {
    let mut c = MethodConfig::Fp16.build().unwrap();
    let x = vec![1e6f32, -1e6, 1.0];
    let y = c.compress(&x, 0).unwrap().decode(3).unwrap();
    assert_eq!(y, vec![65504.0, -65504.0, 1.0]);
}

#[test]
fn threshold_zero_is_lossless() {
    let mut c = MethodConfig::Threshold { threshold: 0.0 }.build().unwrap();
    let mut x = normal(500, 3);
    x[10] = 0.0;
    let y = c.compress(&x, 0).unwrap().decode(500).unwrap();
    assert_eq!(x, y);
}

#[test]
fn powersgd_is_exact_on_low_rank_matrices_and_full_rank() {
    // A rank-2 60x40 matrix is reproduced by rank 2.
    let (rows, cols) = (60, 40);
    let a = normal(rows * 2, 1);
    let b = normal(cols * 2, 2);
    let m: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            a[2 * r] * b[2 * c] + a[2 * r + 1] * b[2 * c + 1]
        })
        .collect();
    let mut c = MethodConfig::PowerSgd {
        rank: 2,
        min_compression_rate: 1.0,
    }
    .build()
    .unwrap();
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((rows, cols)),
        ..meshrec_compress::Ctx::seeded(5)
    };
    let mut p = Payload::new();
    c.compress_into(&m, &mut ctx, &mut p).unwrap();
    assert_eq!(p.header().unwrap().method, MethodId::PowerSgd);
    let y = p.decode(m.len()).unwrap();
    let err = m
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt();
    let norm = m.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(err <= 1e-4 * norm, "rank-2 error {err} of {norm}");

    // A full-rank random 30x20 matrix is reproduced at rank 20 (forced by rate 0).
    let m = normal(600, 9);
    let mut c = MethodConfig::PowerSgd {
        rank: 20,
        min_compression_rate: 0.0,
    }
    .build()
    .unwrap();
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((30, 20)),
        ..meshrec_compress::Ctx::seeded(5)
    };
    c.compress_into(&m, &mut ctx, &mut p).unwrap();
    let y = p.decode(600).unwrap();
    for (a, b) in m.iter().zip(&y) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn powersgd_skips_where_it_would_not_save_bytes() {
    let mut c = MethodConfig::PowerSgd {
        rank: 4,
        min_compression_rate: 1.0,
    }
    .build()
    .unwrap();
    // 8 x 8 at rank 4: (8 + 8) * 4 = 64 >= 64 -> dense.
    let x = normal(64, 1);
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((8, 8)),
        ..Default::default()
    };
    let mut p = Payload::new();
    c.compress_into(&x, &mut ctx, &mut p).unwrap();
    assert_eq!(p.header().unwrap().method, MethodId::Identity);
    assert_eq!(p.decode(64).unwrap(), x);
    // A vector is never compressed.
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((1, 64)),
        ..Default::default()
    };
    c.compress_into(&x, &mut ctx, &mut p).unwrap();
    assert_eq!(p.header().unwrap().method, MethodId::Identity);
    // 9 x 9 at rank 4: 72 < 81 -> compressed.
    let x = normal(81, 1);
    let mut ctx = meshrec_compress::Ctx {
        shape: Some((9, 9)),
        ..Default::default()
    };
    c.compress_into(&x, &mut ctx, &mut p).unwrap();
    assert_eq!(p.header().unwrap().method, MethodId::PowerSgd);
}

/// Checks the payload holds exactly the k largest magnitudes of x (ties: any k of the
/// tied ones, all with the boundary magnitude).
fn assert_top_k(x: &[f32], p: &Payload, k: usize) {
    let y = p.decode(x.len()).unwrap();
    let wire::Params::Sparse { k: sent, .. } = p.header().unwrap().params else {
        panic!()
    };
    assert_eq!(sent as usize, k, "payload carries k entries");
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    mags.sort_by(|a, b| b.total_cmp(a));
    let kth = if k == 0 { f32::INFINITY } else { mags[k - 1] };
    let strictly_above = x.iter().filter(|v| v.abs() > kth).count();
    for i in 0..x.len() {
        if x[i].abs() > kth {
            assert_eq!(
                y[i],
                x[i],
                "element {i} (|x| = {}) above the k-th must be kept",
                x[i].abs()
            );
        } else if y[i] != 0.0 {
            assert_eq!(y[i], x[i]);
            assert_eq!(x[i].abs(), kth, "element {i} kept below the k-th magnitude");
        }
    }
    // Kept zeros decode to 0, so count non-zero kept values against the non-zero part.
    let nonzero_kept = y.iter().filter(|v| **v != 0.0).count();
    assert!(nonzero_kept <= k);
    assert!(strictly_above <= k);
}

#[test]
fn topk_keeps_exactly_the_k_largest_on_the_sampled_path() {
    // Large enough for the sampled pre-threshold (n >= 8 * 16384).
    let n = 200_000;
    for (seed, ratio) in [(1u64, 0.01), (2, 0.001), (3, 0.1)] {
        let x = heavy(n, seed);
        let mut c = MethodConfig::TopK { ratio }.build().unwrap();
        let p = c.compress(&x, seed).unwrap();
        assert_top_k(&x, &p, (ratio * n as f64).ceil() as usize);
        // Indices are sorted (cache-friendly scatter on decode).
        let mut idx = Vec::new();
        wire::sparse_indices(p.as_bytes(), &mut idx).unwrap();
        assert_eq!(idx.len(), (ratio * n as f64).ceil() as usize);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
    }
}

#[test]
fn topk_handles_ties_and_adversarial_samples() {
    // All equal magnitudes: any k of them.
    let x: Vec<f32> = (0..150_000)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut c = MethodConfig::TopK { ratio: 0.01 }.build().unwrap();
    let p = c.compress(&x, 1).unwrap();
    assert_top_k(&x, &p, 1500);
    // A few huge values the sample will miss, the rest tiny: the threshold must back off.
    let mut x = vec![1e-30f32; 150_000];
    for i in 0..1500 {
        x[i * 97] = 1.0 + i as f32;
    }
    let p = c.compress(&x, 1).unwrap();
    assert_top_k(&x, &p, 1500);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn topk_property(x in prop::collection::vec(-100f32..100f32, 1..600), ratio in 0.001f64..1.0) {
        let mut c = MethodConfig::TopK { ratio }.build().unwrap();
        let p = c.compress(&x, 0).unwrap();
        let k = ((ratio * x.len() as f64).ceil() as usize).clamp(1, x.len());
        assert_top_k(&x, &p, k);
    }

    #[test]
    fn lossless_configs_round_trip(x in prop::collection::vec(any::<f32>().prop_filter("finite", |v| v.is_finite()), 0..300)) {
        for cfg in [MethodConfig::Identity, MethodConfig::TopK { ratio: 1.0 }, MethodConfig::RandK { ratio: 1.0, unbiased: false }] {
            let mut c = cfg.build().unwrap();
            let y = c.compress(&x, 7).unwrap().decode(x.len()).unwrap();
            prop_assert_eq!(&x, &y);
        }
    }
}

#[test]
fn dgc_selects_about_k() {
    let n = 100_000;
    let x = heavy(n, 4);
    let mut c = MethodConfig::DgcTopK {
        ratio: 0.01,
        sample_ratio: 0.01,
    }
    .build()
    .unwrap();
    let p = c.compress(&x, 11).unwrap();
    let wire::Params::Sparse { k, .. } = p.header().unwrap().params else {
        panic!()
    };
    // Approximate: within a factor of two of k = 1000, and at most 2k by construction.
    assert!((500..=2000).contains(&k), "dgc kept {k}");
    // Whatever it kept are the largest: nothing dropped is larger than something kept.
    let y = p.decode(n).unwrap();
    let min_kept = (0..n)
        .filter(|&i| y[i] != 0.0)
        .map(|i| x[i].abs())
        .fold(f32::INFINITY, f32::min);
    let max_dropped = (0..n)
        .filter(|&i| y[i] == 0.0)
        .map(|i| x[i].abs())
        .fold(0.0, f32::max);
    assert!(max_dropped <= min_kept);
}

#[test]
fn randk_uses_the_shared_seed() {
    let x = normal(10_000, 1);
    let z = normal(10_000, 2);
    let mut c = MethodConfig::RandK {
        ratio: 0.05,
        unbiased: false,
    }
    .build()
    .unwrap();
    let kept = |p: &Payload| -> Vec<usize> {
        let y = p.decode(10_000).unwrap();
        (0..10_000).filter(|&i| y[i] != 0.0).collect()
    };
    // Same seed, different data: same indices (what makes it all-reduce compatible).
    let a = kept(&c.compress(&x, 5).unwrap());
    let b = kept(&c.compress(&z, 5).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.len(), 500);
    let d = kept(&c.compress(&x, 6).unwrap());
    assert_ne!(a, d);
}

#[test]
fn configs_parse_by_method_name() {
    for cfg in all_methods() {
        let text = serde_json::to_string(&cfg).unwrap();
        let tag = format!("\"method\":\"{}\"", cfg.method().name());
        assert!(text.contains(&tag), "{text} lacks {tag}");
        let back: MethodConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }
    let cfg: MethodConfig = serde_json::from_str(r#"{"method":"topk","ratio":0.01}"#).unwrap();
    assert_eq!(cfg, MethodConfig::TopK { ratio: 0.01 });
    // Unknown keys are rejected.
    assert!(
        serde_json::from_str::<MethodConfig>(r#"{"method":"topk","ratio":0.01,"k":3}"#).is_err()
    );
}

#[test]
fn omitted_keys_take_defaults() {
    let cfg: MethodConfig = serde_json::from_str(r#"{"method":"powersgd","rank":4}"#).unwrap();
    assert_eq!(
        cfg,
        MethodConfig::PowerSgd {
            rank: 4,
            min_compression_rate: 1.0
        }
    );
    let cfg: MethodConfig = serde_json::from_str(r#"{"method":"sign"}"#).unwrap();
    assert_eq!(cfg, MethodConfig::Sign { chunk: 512 });
}

#[test]
fn topk_of_a_bucket_of_layers_keeps_each_layers_share() {
    // Layer 0 (20 x 10) has gradients a thousand times larger than layer 1 (30 x 10) and
    // the bias (1 x 7): one threshold over the bucket would keep only layer 0's. Layer by
    // layer (DGC), each keeps ceil(5% of its own) largest: 10, 15 and 1.
    let layers = [(20usize, 10usize), (30, 10), (1, 7)];
    let mut x = normal(507, 9);
    x[..200].iter_mut().for_each(|v| *v *= 1000.0);
    let bounds = [(0usize, 200usize, 10usize), (200, 500, 15), (500, 507, 1)];
    for cfg in [
        MethodConfig::TopK { ratio: 0.05 },
        MethodConfig::DgcTopK {
            ratio: 0.05,
            sample_ratio: 1.0,
        },
    ] {
        let mut c = cfg.build().unwrap();
        let mut p = Payload::new();
        let mut ctx = meshrec_compress::Ctx {
            layers: Some(&layers),
            layerwise_selection: true,
            ..meshrec_compress::Ctx::seeded(3)
        };
        c.compress_into(&x, &mut ctx, &mut p).unwrap();
        let y = p.decode(x.len()).unwrap();
        for &(lo, hi, k) in &bounds {
            let layer = &y[lo..hi];
            if let MethodConfig::TopK { .. } = cfg {
                // Exactly this layer's top k, in the layer's own coordinates.
                let mut one = MethodConfig::TopK {
                    ratio: k as f64 / (hi - lo) as f64,
                }
                .build()
                .unwrap();
                let only = one.compress(&x[lo..hi], 3).unwrap();
                assert_eq!(
                    layer,
                    &only.decode(hi - lo).unwrap()[..],
                    "layer [{lo}, {hi})"
                );
            } else {
                // DGC's sampled threshold: about k (at most 2k), the largest of the layer.
                let kept = layer.iter().filter(|&&v| v != 0.0).count();
                assert!(
                    (1..=2 * k).contains(&kept),
                    "layer [{lo}, {hi}): kept {kept}"
                );
                let (min_kept, max_dropped) = (lo..hi).fold((f32::MAX, 0f32), |(a, b), i| {
                    if y[i] != 0.0 {
                        assert_eq!(y[i], x[i]);
                        (a.min(x[i].abs()), b)
                    } else {
                        (a, b.max(x[i].abs()))
                    }
                });
                assert!(max_dropped <= min_kept, "layer [{lo}, {hi})");
            }
        }
        // Over the whole bucket (the default, layers known or not): the one top-k of 26
        // lies entirely in layer 0.
        let mut bucket = meshrec_compress::Ctx {
            layers: Some(&layers),
            ..meshrec_compress::Ctx::seeded(3)
        };
        c.compress_into(&x, &mut bucket, &mut p).unwrap();
        let g = p.decode(x.len()).unwrap();
        assert!(g[200..].iter().all(|&v| v == 0.0), "{cfg:?}");
        if let MethodConfig::TopK { .. } = cfg {
            assert_eq!(g.iter().filter(|&&v| v != 0.0).count(), 26);
        }
    }
}
