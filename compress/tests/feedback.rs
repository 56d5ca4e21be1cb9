//! Error feedback: sent + residual equals input + previous residual (bit for bit where
//! f32 arithmetic allows it, to within rounding otherwise), DGC momentum
//! correction, and checkpointing of the state.

mod common;

use common::normal;
use meshrec_compress::{
    warmed_ratio, Compressor, Memory, MemoryBank, MemoryOptions, MethodConfig, Payload,
};

/// One error-feedback step by hand; returns (compensated c, sent).
fn step(
    c: &mut dyn Compressor,
    mem: &mut Memory,
    g: &[f32],
    p: &mut Payload,
) -> (Vec<f32>, Vec<f32>) {
    let mut buf = g.to_vec();
    mem.compensate(&mut buf).unwrap();
    c.compress_into(&buf, &mut mem.ctx(0), p).unwrap();
    mem.absorb(p, c).unwrap();
    mem.advance();
    let sent = p.decode(g.len()).unwrap();
    (buf, sent)
}

#[test]
fn residual_is_exact_for_sparsifiers_and_casts() {
    let exact = [
        MethodConfig::Identity,
        MethodConfig::Fp16,
        MethodConfig::Bf16,
        MethodConfig::TopK { ratio: 0.05 },
        MethodConfig::DgcTopK {
            ratio: 0.05,
            sample_ratio: 0.1,
        },
        MethodConfig::Threshold { threshold: 1.0 },
        MethodConfig::RandK {
            ratio: 0.1,
            unbiased: false,
        },
    ];
    for cfg in exact {
        let mut c = cfg.build().unwrap();
        let n = 3000;
        let mut mem = Memory::new(7, n, MemoryOptions::default()).unwrap();
        let mut p = Payload::new();
        for t in 0..6 {
            let g = normal(n, 100 + t);
            let prev = mem.residual().to_vec();
            let (cvec, sent) = step(c.as_mut(), &mut mem, &g, &mut p);
            for i in 0..n {
                // Input + previous residual, in f32 as the memory computes it.
                assert_eq!(cvec[i].to_bits(), (g[i] + prev[i]).to_bits());
                assert_eq!(
                    (sent[i] + mem.residual()[i]).to_bits(),
                    cvec[i].to_bits(),
                    "{cfg:?} step {t} element {i}"
                );
            }
        }
        // Residual is really carried: something was dropped.
        if !matches!(cfg, MethodConfig::Identity) {
            assert!(mem.residual().iter().any(|&e| e != 0.0), "{cfg:?}");
        }
    }
}

#[test]
fn residual_is_within_one_rounding_for_quantizers() {
    let cfgs = [
        MethodConfig::Qsgd {
            levels: 3,
            bucket: 64,
        },
        MethodConfig::TernGrad { chunk: 64 },
        MethodConfig::Sign { chunk: 32 },
        MethodConfig::RandK {
            ratio: 0.1,
            unbiased: true,
        },
        MethodConfig::PowerSgd {
            rank: 2,
            min_compression_rate: 1.0,
        },
    ];
    for cfg in cfgs {
        let mut c = cfg.build().unwrap();
        let n = 2500;
        let mut mem = Memory::new(3, n, MemoryOptions::default()).unwrap();
        let mut p = Payload::new();
        for t in 0..6 {
            let g = normal(n, 200 + t);
            let (cvec, sent) = step(c.as_mut(), &mut mem, &g, &mut p);
            for i in 0..n {
                let (s, e, cv) = (sent[i] as f64, mem.residual()[i] as f64, cvec[i] as f64);
                // residual = fl(c - sent) is off from the exact difference by half an
                // ulp; PowerSGD's decode subtracts inside the GEMM (fused, its own
                // summation order), so allow a few roundings of the operands.
                let bound = if matches!(cfg, MethodConfig::PowerSgd { .. }) {
                    4.0 * (cv.abs() + s.abs()) * 2f64.powi(-24)
                } else {
                    (cv - s).abs() * 2f64.powi(-24)
                };
                assert!((s + e - cv).abs() <= bound, "{cfg:?} step {t} element {i}");
            }
        }
    }
}

#[test]
fn no_feedback_keeps_no_state() {
    let opts = MemoryOptions {
        error_feedback: false,
        ..Default::default()
    };
    let mut mem = Memory::new(1, 100, opts).unwrap();
    assert!(mem.residual().is_empty());
    let mut c = MethodConfig::TopK { ratio: 0.1 }.build().unwrap();
    let g = normal(100, 1);
    let (cvec, _) = step(c.as_mut(), &mut mem, &g, &mut Payload::new());
    assert_eq!(cvec, g);
}

#[test]
fn dgc_momentum_correction() {
    let n = 1000;
    let m = 0.9f32;
    let opts = MemoryOptions {
        momentum: Some(m),
        ..Default::default()
    };
    let mut mem = Memory::new(5, n, opts).unwrap();
    let mut c = MethodConfig::TopK { ratio: 0.02 }.build().unwrap();
    let mut p = Payload::new();
    let mut u = vec![0f32; n];
    let mut v = vec![0f32; n];
    for t in 0..5 {
        let g = normal(n, 300 + t);
        let (_, sent) = step(c.as_mut(), &mut mem, &g, &mut p);
        // Reference: u = m u + g; v += u; send top-k of v; clear v and u where sent.
        for i in 0..n {
            u[i] = m * u[i] + g[i];
            v[i] += u[i];
        }
        for i in 0..n {
            if sent[i] != 0.0 {
                assert_eq!(sent[i], v[i]);
                v[i] = 0.0;
                u[i] = 0.0;
            }
        }
        assert_eq!(mem.residual(), &v[..], "step {t}");
        assert_eq!(mem.velocity(), &u[..], "step {t}");
    }
}

#[test]
fn normalized_selection_ranks_by_the_gradients_own_scale() {
    // Top-1 of 4 with the squared-gradient mean s = 0.5 s + 0.5 g^2, by hand.
    let opts = MemoryOptions {
        normalized_selection: Some(0.5),
        ..Default::default()
    };
    let mut mem = Memory::new(8, 4, opts).unwrap();
    let mut c = MethodConfig::TopK { ratio: 0.25 }.build().unwrap();
    let mut p = Payload::new();
    // Step 1: s = [50, .5, .5, .5]; every c / sqrt(s) is sqrt(2): the tie goes to index 0.
    let (_, sent) = step(c.as_mut(), &mut mem, &[10.0, 1.0, 1.0, 1.0], &mut p);
    assert_eq!(sent, [10.0, 0.0, 0.0, 0.0]);
    assert_eq!(mem.residual(), &[0.0, 1.0, 1.0, 1.0]);
    // Step 2: s = [75, .375, 2.25, .375], c = [10, 1.5, 3, 1.5]; c / sqrt(s) =
    // [1.15, 2.45, 2, 2.45]: index 1 (the tie with 3 goes low), though index 0 is the
    // largest by magnitude. Its true value is sent, not the scaled one.
    let (cvec, sent) = step(c.as_mut(), &mut mem, &[10.0, 0.5, 2.0, 0.5], &mut p);
    assert_eq!(cvec, [10.0, 1.5, 3.0, 1.5]);
    assert_eq!(sent, [0.0, 1.5, 0.0, 0.0]);
    assert_eq!(mem.residual(), &[10.0, 0.0, 3.0, 1.5]);
    // Plain top-1 of the same c would send index 0.
    let by_magnitude = c.compress(&cvec, 0).unwrap().decode(4).unwrap();
    assert_eq!(by_magnitude, [10.0, 0.0, 0.0, 0.0]);
    // The state checkpoints with its scale; a decay outside (0, 1) is refused.
    let back = Memory::from_bytes(&mem.to_bytes().unwrap()).unwrap();
    assert_eq!(back, mem);
    for bad in [0.0, 1.0, f32::NAN] {
        let opts = MemoryOptions {
            normalized_selection: Some(bad),
            ..Default::default()
        };
        assert!(Memory::new(0, 4, opts).is_err(), "decay {bad}");
    }
}

#[test]
fn bf16_values_halve_the_value_bytes_and_leave_their_rounding_in_the_residual() {
    let n = 1000;
    let g = normal(n, 77);
    let mut sizes = Vec::new();
    for bf16_values in [false, true] {
        let opts = MemoryOptions {
            bf16_values,
            ..Default::default()
        };
        let mut mem = Memory::new(9, n, opts).unwrap();
        let mut c = MethodConfig::TopK { ratio: 0.05 }.build().unwrap();
        let mut p = Payload::new();
        let (cvec, sent) = step(c.as_mut(), &mut mem, &g, &mut p);
        let h = p.header().unwrap();
        let meshrec_compress::Params::Sparse {
            k,
            index_bytes,
            values,
        } = h.params
        else {
            panic!("sparse payload")
        };
        assert_eq!(k, 50);
        assert_eq!(values.bytes(), if bf16_values { 2 } else { 4 });
        assert_eq!(
            p.wire_len(),
            32 + index_bytes as usize + values.bytes() * 50
        );
        sizes.push(p.wire_len() - 32 - index_bytes as usize);
        for i in 0..n {
            if sent[i] != 0.0 {
                // The value sent is c rounded to bf16 (or c itself), and what it missed
                // by is the residual, exactly.
                let want = if bf16_values {
                    half::bf16::from_f32(cvec[i]).to_f32()
                } else {
                    cvec[i]
                };
                assert_eq!(sent[i], want, "bf16 {bf16_values} i {i} c {}", cvec[i]);
                assert_eq!(mem.residual()[i], cvec[i] - sent[i]);
            } else {
                assert_eq!(mem.residual()[i], cvec[i]);
            }
        }
    }
    assert_eq!(sizes, [200, 100], "value bytes halved");
}

#[test]
fn sparsity_warm_up_follows_dgc_schedule() {
    // DGC's four-epoch schedule for 99.9% sparsity: 25%, 6.25%, 1.5625%, 0.39%, 0.1% kept.
    let dgc = [0.25, 0.0625, 0.015625, 0.00390625, 0.001];
    for (e, want) in dgc.into_iter().enumerate() {
        let got = warmed_ratio(0.001, (e < 4).then_some(e as f64 / 4.0));
        assert!(
            (got / want - 1.0).abs() < 0.02,
            "epoch {e}: {got} vs {want}"
        );
    }
    // Ratios at or above the starting fraction are not warmed.
    assert_eq!(warmed_ratio(0.5, Some(0.0)), 0.5);

    // Through a memory with a 4-step warm-up, top-k 1% of 1000 keeps
    // ceil(1000 * 0.25^(1-t/4) * 0.01^(t/4)) of 250, 111.8, 50, 22.36, then 10 (a product
    // that lands a rounding above an integer may keep one more).
    let n = 1000;
    let opts = MemoryOptions {
        sparsity_warmup_steps: 4,
        ..Default::default()
    };
    let mut mem = Memory::new(3, n, opts).unwrap();
    let mut c = MethodConfig::TopK { ratio: 0.01 }.build().unwrap();
    let mut p = Payload::new();
    let kept: Vec<usize> = (0..6)
        .map(|t| {
            let (_, sent) = step(c.as_mut(), &mut mem, &normal(n, 40 + t), &mut p);
            sent.iter().filter(|&&v| v != 0.0).count()
        })
        .collect();
    let fractions = [250.0, 111.8034, 50.0, 22.36068, 10.0, 10.0];
    for (t, (&k, want)) in kept.iter().zip(fractions).enumerate() {
        assert!(
            k as f64 >= want - 1e-3 && (k as f64) < want + 1.0 + 1e-3,
            "step {t}: kept {k}, want ceil({want})"
        );
    }
}

#[test]
fn local_clipping_scales_the_gradient_before_it_accumulates() {
    let opts = MemoryOptions {
        local_clip: Some(1.0),
        ..Default::default()
    };
    let mut mem = Memory::new(0, 2, opts).unwrap();
    let mut c = MethodConfig::TopK { ratio: 0.5 }.build().unwrap();
    let mut p = Payload::new();
    // |(3, 4)| = 5 > 1: clipped to (0.6, 0.8); top-1 sends 0.8, keeps 0.6.
    let (compensated, sent) = step(c.as_mut(), &mut mem, &[3.0, 4.0], &mut p);
    assert_eq!(compensated, [0.6, 0.8]);
    assert_eq!(sent, [0.0, 0.8]);
    assert_eq!(mem.residual(), &[0.6, 0.0]);
    // |(0.3, 0)| < 1: unclipped, added to the residual: (0.9, 0) sends 0.9.
    let (compensated, sent) = step(c.as_mut(), &mut mem, &[0.3, 0.0], &mut p);
    assert!((compensated[0] - 0.9).abs() < 1e-6 && compensated[1] == 0.0);
    assert_eq!(sent[1], 0.0);
    assert!(Memory::new(
        0,
        2,
        MemoryOptions {
            local_clip: Some(0.0),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn momentum_needs_a_sparsifier_and_feedback() {
    let bad = MemoryOptions {
        error_feedback: false,
        momentum: Some(0.9),
        ..Default::default()
    };
    assert!(Memory::new(0, 10, bad).is_err());
    assert!(Memory::new(
        0,
        10,
        MemoryOptions {
            momentum: Some(1.5),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn memory_checkpoints_round_trip() {
    let mut bank = MemoryBank::new();
    let opts = MemoryOptions {
        momentum: Some(0.5),
        seed: 9,
        ..Default::default()
    };
    let mut c = MethodConfig::TopK { ratio: 0.1 }.build().unwrap();
    let mut p = Payload::new();
    for id in 0..3u64 {
        let mem = bank.get_or_insert(id, 200, opts).unwrap();
        step(c.as_mut(), mem, &normal(200, id), &mut p);
    }
    let bytes = bank.to_bytes().unwrap();
    let back = MemoryBank::from_bytes(&bytes).unwrap();
    assert_eq!(back, bank);
    assert_eq!(back.get(1).unwrap().step(), 1);
    // Truncated or padded checkpoints are errors.
    assert!(MemoryBank::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(MemoryBank::from_bytes(&longer).is_err());
    // A length change under existing state is an error.
    assert!(bank.get_or_insert(1, 201, opts).is_err());
    // A single memory too, with its PowerSGD warm start.
    let mut mem = Memory::new(4, 64, MemoryOptions::default())
        .unwrap()
        .with_shape(8, 8)
        .unwrap();
    let mut ps = MethodConfig::PowerSgd {
        rank: 2,
        min_compression_rate: 1.0,
    }
    .build()
    .unwrap();
    step(ps.as_mut(), &mut mem, &normal(64, 1), &mut p);
    let back = Memory::from_bytes(&mem.to_bytes().unwrap()).unwrap();
    assert_eq!(back, mem);
}
