//! `sync` over the local engine (one thread per rank): dense equivalence for identity
//! and lossless settings, PowerSGD at full rank, agreement across ranks, and a
//! least-squares problem trained with top-k 1% + error feedback over 4 ranks.

mod common;

use common::normal;
use meshrec_comm::{Communicator, LocalCluster, ReduceOp};
use meshrec_compress::{sync, Aggregation, Memory, MemoryOptions, MethodConfig, Stats, SyncError};

/// Runs `sync` once per rank on gradient `normal(n, rank)`; returns per-rank results.
fn sync_once(
    ranks: usize,
    n: usize,
    cfg: &MethodConfig,
    shape: Option<(usize, usize)>,
) -> Vec<Vec<f32>> {
    LocalCluster::run(ranks, |comm| {
        let mut c = cfg.build().unwrap();
        let mut mem = Memory::new(11, n, MemoryOptions::default()).unwrap();
        if let Some((r, k)) = shape {
            mem = mem.with_shape(r, k).unwrap();
        }
        let mut g = normal(n, comm.rank() as u64);
        let rep = sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
        assert_eq!(rep.dense_bytes, 4 * n);
        g
    })
    .unwrap()
}

/// The exact average of the per-rank gradients, in f64.
fn dense_average(ranks: usize, n: usize) -> Vec<f32> {
    let mut s = vec![0f64; n];
    for r in 0..ranks {
        for (a, b) in s.iter_mut().zip(normal(n, r as u64)) {
            *a += b as f64;
        }
    }
    s.iter().map(|v| (v / ranks as f64) as f32).collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn identity_equals_dense_all_reduce_bit_for_bit() {
    let n = 5000;
    let out = LocalCluster::run(4, |comm| {
        let mut c = MethodConfig::Identity.build().unwrap();
        let mut mem = Memory::new(0, n, MemoryOptions::default()).unwrap();
        let mut g = normal(n, comm.rank() as u64);
        let mut dense = g.clone();
        comm.all_reduce(&mut dense, ReduceOp::Avg).unwrap();
        sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
        assert!(mem.residual().iter().all(|&e| e == 0.0));
        (g, dense)
    })
    .unwrap();
    for (g, dense) in &out {
        assert_eq!(g, dense);
    }
}

#[test]
fn lossless_settings_equal_the_dense_average() {
    let (ranks, n) = (3, 3001);
    let avg = dense_average(ranks, n);
    for cfg in [
        MethodConfig::TopK { ratio: 1.0 },
        MethodConfig::Threshold { threshold: 0.0 },
        MethodConfig::RandK {
            ratio: 1.0,
            unbiased: false,
        },
        MethodConfig::DgcTopK {
            ratio: 1.0,
            sample_ratio: 0.1,
        },
    ] {
        let out = sync_once(ranks, n, &cfg, None);
        for g in &out {
            assert_close(g, &avg, 1e-6, &format!("{cfg:?}"));
            // Every rank decodes the same payloads in the same order: identical results.
            assert_eq!(g, &out[0]);
        }
    }
}

#[test]
fn powersgd_full_rank_reproduces_the_dense_average() {
    let (ranks, rows, cols) = (3, 24, 16);
    let avg = dense_average(ranks, rows * cols);
    let cfg = MethodConfig::PowerSgd {
        rank: 16,
        min_compression_rate: 0.0,
    };
    let out = sync_once(ranks, rows * cols, &cfg, Some((rows, cols)));
    for g in &out {
        assert_close(g, &avg, 2e-4, "powersgd full rank");
        assert_eq!(g, &out[0]);
    }
    // At low rank it is an approximation whose error is carried in the residual.
    let out = LocalCluster::run(ranks, |comm| {
        let mut c = MethodConfig::PowerSgd {
            rank: 2,
            min_compression_rate: 1.0,
        }
        .build()
        .unwrap();
        let mut mem = Memory::new(1, rows * cols, MemoryOptions::default())
            .unwrap()
            .with_shape(rows, cols)
            .unwrap();
        let g0 = normal(rows * cols, comm.rank() as u64);
        let mut g = g0.clone();
        let rep = sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
        assert!(!rep.skipped);
        assert_eq!(rep.payload_bytes, 4 * (rows + cols) * 2);
        // residual = local gradient - decompressed average.
        for i in 0..g.len() {
            assert!((mem.residual()[i] - (g0[i] - g[i])).abs() <= 1e-6 * (1.0 + g0[i].abs()));
        }
        g
    })
    .unwrap();
    assert_eq!(out[0], out[1]);
}

#[test]
fn every_method_agrees_across_ranks_and_reports_bytes() {
    let (ranks, n) = (3, 4096);
    // Each method with its bound on ||out - avg|| / ||avg|| after one step from a zero
    // residual (measured value in the comment). Sending zeros gives exactly 1, so
    // every bound but TernGrad's is below 1 (and sending noise of the gradient's
    // scale gives about sqrt(2)).
    let methods = [
        (MethodConfig::Fp16, 1e-3),                  // 2.04e-4
        (MethodConfig::Bf16, 5e-3),                  // 1.68e-3
        (MethodConfig::TopK { ratio: 0.01 }, 0.975), // 0.959
        (
            MethodConfig::DgcTopK {
                ratio: 0.01,
                sample_ratio: 0.1,
            },
            0.975,
        ), // 0.950
        (
            MethodConfig::RandK {
                ratio: 0.01,
                unbiased: false,
            },
            0.998,
        ), // 0.9952 (about sqrt(1 - 1%))
        (MethodConfig::Threshold { threshold: 2.0 }, 0.9), // 0.845
        (
            MethodConfig::Qsgd {
                levels: 15,
                bucket: 512,
            },
            0.75,
        ), // 0.606
        // Unbiased but noisier than the signal after one step: also checked for
        // unbiasedness below, which zeros fail.
        (MethodConfig::TernGrad { chunk: 512 }, 1.4), // 1.233
        (MethodConfig::Sign { chunk: 512 }, 0.7),     // 0.602
        (
            MethodConfig::PowerSgd {
                rank: 4,
                min_compression_rate: 1.0,
            },
            0.96,
        ), // 0.930
    ];
    let avg = dense_average(ranks, n);
    for (cfg, bound) in methods {
        let out = LocalCluster::run(ranks, |comm| {
            let mut c = cfg.build().unwrap();
            let mut mem = Memory::new(2, n, MemoryOptions::default()).unwrap();
            let mut stats = Stats::new();
            let g0 = normal(n, comm.rank() as u64);
            let mut g = g0.clone();
            let rep = sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
            assert!(rep.payload_bytes < rep.dense_bytes, "{cfg:?}: {rep:?}");
            assert!(rep.ratio() > 1.0);
            assert_eq!(mem.step(), 1);
            stats.record(&rep);
            let s = stats.by_method[cfg.method().name()];
            assert_eq!((s.calls, s.dense_bytes), (1, 4 * n as u64));
            assert_eq!(s.payload_bytes, rep.payload_bytes as u64);
            if rep.aggregation == Aggregation::GatherThenSum {
                // Gathered payloads: the others' bytes were received.
                assert!(rep.received_bytes > 0);
            }
            let e = mem.residual().to_vec();
            if !matches!(cfg, MethodConfig::Fp16 | MethodConfig::Bf16) {
                assert!(e.iter().any(|&v| v != 0.0), "{cfg:?}: nothing carried over");
            }
            (g, g0, e)
        })
        .unwrap();
        for (g, _, _) in &out {
            assert_eq!(g, &out[0].0, "{cfg:?}");
        }
        let got = &out[0].0;
        // Error feedback's invariant: the residual is what this rank did not get
        // across (compensated input, here g0 since the residual started at zero,
        // minus what it sent), so what the collective applied is the mean over ranks
        // of g0_r - e_r. The 16-bit casts reduce in their own type, so their sum rounds
        // once per hop (unit roundoff u, at most `ranks` hops and the division) on top.
        let rel_tol = match cfg {
            MethodConfig::Fp16 => (ranks + 1) as f64 * 2f64.powi(-11),
            MethodConfig::Bf16 => (ranks + 1) as f64 * 2f64.powi(-8),
            _ => 1e-6,
        };
        for i in 0..n {
            let sent: f64 = out
                .iter()
                .map(|(_, g0, e)| g0[i] as f64 - e[i] as f64)
                .sum::<f64>()
                / ranks as f64;
            let scale = 1.0 + out.iter().map(|(_, g0, _)| g0[i].abs()).fold(0.0, f32::max);
            assert!(
                (got[i] as f64 - sent).abs() <= rel_tol * scale as f64,
                "{cfg:?}: element {i}: applied {} vs mean sent {sent}",
                got[i]
            );
        }
        if let MethodConfig::PowerSgd { .. } = cfg {
            // PowerSGD's residual is local input minus the decompressed *average* (as
            // in the paper and PyTorch's hook), so the identity above holds on every
            // rank separately: g0_r - e_r == out for each r.
            for (r, (_, g0, e)) in out.iter().enumerate() {
                for i in 0..n {
                    assert!(
                        (g0[i] - e[i] - got[i]).abs() <= 1e-6 * (1.0 + g0[i].abs()),
                        "powersgd rank {r} element {i}: {} - {} vs {}",
                        g0[i],
                        e[i],
                        got[i]
                    );
                }
            }
        }
        // Accuracy against the dense average.
        let err = got
            .iter()
            .zip(&avg)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = avg.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        let rel = err / norm;
        assert!(rel < bound, "{cfg:?}: relative error {rel} >= {bound}");
        if matches!(
            cfg,
            MethodConfig::Qsgd { .. } | MethodConfig::TernGrad { .. }
        ) {
            // Unbiased quantizers: the component of out along avg is avg itself, up
            // to the rounding noise (measured: QSGD 1.009, TernGrad 0.976; the noise
            // is about 0.02 for TernGrad). Zeros or unrelated noise give about 0.
            let dot: f64 = got
                .iter()
                .zip(&avg)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let coef = dot / (norm * norm);
            assert!(
                (coef - 1.0).abs() < 0.1,
                "{cfg:?}: <out, avg> / ||avg||^2 = {coef}, want 1"
            );
        }
        if matches!(cfg, MethodConfig::Fp16 | MethodConfig::Bf16) {
            assert_close(got, &avg, 1e-2, &format!("{cfg:?}"));
        }
    }
}

/// A bucket of three layers: two matrices PowerSGD compresses and a bias it sends dense.
const LAYERS: [(usize, usize); 3] = [(32, 16), (1, 10), (16, 24)];

/// Rank `rank`'s gradient of the bucket: each matrix layer a rank-1 outer product
/// `(1 + rank) * u v^T` (the same u, v on every rank, so the average is rank 1 too), the
/// bias normal.
fn rank_one_layers(rank: usize) -> Vec<f32> {
    let mut g = Vec::new();
    for (i, &(rows, cols)) in LAYERS.iter().enumerate() {
        if rows == 1 {
            g.extend(normal(cols, 50 + rank as u64));
            continue;
        }
        let (u, v) = (normal(rows, 10 + i as u64), normal(cols, 20 + i as u64));
        for a in &u {
            g.extend(v.iter().map(|b| (1.0 + rank as f32) * a * b));
        }
    }
    g
}

#[test]
fn per_layer_powersgd_compresses_each_layer_as_its_own_matrix() {
    let ranks = 2;
    let n: usize = LAYERS.iter().map(|(r, c)| r * c).sum();
    let mut want = vec![0f32; n];
    for r in 0..ranks {
        for (w, v) in want.iter_mut().zip(rank_one_layers(r)) {
            *w += v / ranks as f32;
        }
    }
    let cfg = MethodConfig::PowerSgd {
        rank: 1,
        min_compression_rate: 1.0,
    };
    let run = |per_layer: bool| {
        LocalCluster::run(ranks, |comm| {
            let mut c = cfg.build().unwrap();
            let mut mem = Memory::new(4, n, MemoryOptions::default()).unwrap();
            if per_layer {
                mem.set_layers(&LAYERS).unwrap();
            }
            let g0 = rank_one_layers(comm.rank());
            let mut g = g0.clone();
            let rep = sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
            (
                g,
                g0,
                mem.residual().to_vec(),
                rep.payload_bytes,
                mem.clone(),
            )
        })
        .unwrap()
    };
    let layered = run(true);
    let (got, g0, residual, bytes, mem) = &layered[0];
    assert_eq!(got, &layered[1].0, "ranks disagree");
    // Rank-1 layers are recovered exactly by rank-1 factors of their own; the bias is
    // averaged dense.
    assert_close(got, &want, 1e-5, "per-layer powersgd");
    // P of each matrix (32 + 16 rows) and the dense bias in one all-reduce, Q of each
    // (16 + 24 columns) in the other.
    assert_eq!(*bytes, 4 * ((32 + 10 + 16) + (16 + 24)));
    // The residual is the local input minus the average on compressed layers, zero on
    // the bias it sent whole.
    for i in 0..n {
        let bias = (512..522).contains(&i);
        let expect = if bias { 0.0 } else { g0[i] - got[i] };
        assert!(
            (residual[i] - expect).abs() <= 1e-5 * (1.0 + g0[i].abs()),
            "element {i}"
        );
    }
    // The next step warm-starts from the Q of every layer.
    let mut again = mem.clone();
    again.set_layers(&LAYERS).unwrap();
    let mut fresh = mem.clone();
    fresh.set_layers(&[(1, n)]).unwrap();
    assert_eq!(again, *mem, "same layers keep the warm start");
    assert_ne!(fresh, *mem, "other layers drop it");
    assert!(Memory::new(0, n, MemoryOptions::default())
        .unwrap()
        .set_layers(&[(32, 16)])
        .is_err());
    // The fused bucket as one near-square matrix is not rank 1: the same rank loses most
    // of the gradient.
    let fused = run(false);
    let err = |g: &[f32]| -> f64 {
        g.iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert!(
        err(&fused[0].0) > 100.0 * err(got).max(1e-6),
        "fused {} vs per-layer {}",
        err(&fused[0].0),
        err(got)
    );
}

#[test]
fn half_precision_casts_move_half_the_bytes_of_f32() {
    // Measured by the engine's own counters, not by the compressor's report: fp16 and
    // bf16 all-reduce 16-bit values, identity f32 ones.
    let (ranks, n) = (2, 1 << 14);
    let sent = |cfg: MethodConfig| -> (u64, usize) {
        let out = LocalCluster::run(ranks, |comm| {
            let mut c = cfg.build().unwrap();
            let mut mem = Memory::new(0, n, MemoryOptions::default()).unwrap();
            let mut g = normal(n, comm.rank() as u64);
            let before = comm.stats().total().bytes_sent;
            let rep = sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
            (
                comm.stats().total().bytes_sent - before,
                rep.collective_bytes,
            )
        })
        .unwrap();
        out[0]
    };
    let (dense, dense_reported) = sent(MethodConfig::Identity);
    assert_eq!(dense_reported, 4 * n);
    assert!(dense > 0);
    for cfg in [MethodConfig::Fp16, MethodConfig::Bf16] {
        let (half, reported) = sent(cfg.clone());
        assert_eq!(reported, 2 * n, "{cfg:?}");
        assert_eq!(
            2 * half,
            dense,
            "{cfg:?}: {half} bytes sent against {dense} for f32"
        );
    }
}

#[test]
fn mismatched_lengths_fail_cleanly() {
    let res = LocalCluster::run(2, |comm| {
        let n = 100 + comm.rank();
        let mut c = MethodConfig::TopK { ratio: 0.1 }.build().unwrap();
        let mut mem = Memory::new(0, n, MemoryOptions::default()).unwrap();
        let mut g = normal(n, 0);
        sync(&comm, &mut g, c.as_mut(), &mut mem).map(|_| ())
    })
    .unwrap();
    // Each rank rejects the other's payload (its length is not this rank's tensor).
    for (rank, r) in res.iter().enumerate() {
        match r {
            Err(SyncError::Peer { from, .. }) => assert_eq!(*from, 1 - rank),
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // Memory of the wrong length is rejected before any communication.
    let res = LocalCluster::run(1, |comm| {
        let mut c = MethodConfig::Identity.build().unwrap();
        let mut mem = Memory::new(0, 10, MemoryOptions::default()).unwrap();
        sync(&comm, &mut [0.0; 11], c.as_mut(), &mut mem).map(|_| ())
    })
    .unwrap();
    assert!(res[0].is_err());
}

/// Least squares, rows split over ranks: loss = |A w - b|^2 / (2 m).
struct Problem {
    d: usize,
    rows_per_rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Problem {
    fn new(ranks: usize, rows_per_rank: usize, d: usize) -> Self {
        let m = ranks * rows_per_rank;
        let a: Vec<f32> = normal(m * d, 1)
            .iter()
            .map(|v| v / (d as f32).sqrt())
            .collect();
        let w_star = normal(d, 2);
        let noise = normal(m, 3);
        let b = (0..m)
            .map(|i| {
                let row = &a[i * d..(i + 1) * d];
                row.iter().zip(&w_star).map(|(x, w)| x * w).sum::<f32>() + 0.3 * noise[i]
            })
            .collect();
        Self {
            d,
            rows_per_rank,
            a,
            b,
        }
    }

    /// Gradient of this rank's share, scaled so the average over ranks is the full
    /// gradient.
    fn grad(&self, rank: usize, w: &[f32], g: &mut [f32]) {
        g.fill(0.0);
        let r0 = rank * self.rows_per_rank;
        for i in r0..r0 + self.rows_per_rank {
            let row = &self.a[i * self.d..(i + 1) * self.d];
            let resid = row.iter().zip(w).map(|(x, w)| x * w).sum::<f32>() - self.b[i];
            for (gj, x) in g.iter_mut().zip(row) {
                *gj += resid * x / self.rows_per_rank as f32;
            }
        }
    }

    fn loss(&self, w: &[f32]) -> f64 {
        let m = self.b.len();
        (0..m)
            .map(|i| {
                let row = &self.a[i * self.d..(i + 1) * self.d];
                let r = row.iter().zip(w).map(|(x, w)| x * w).sum::<f32>() - self.b[i];
                (r as f64).powi(2)
            })
            .sum::<f64>()
            / (2.0 * m as f64)
    }
}

fn train(p: &Problem, ranks: usize, cfg: &MethodConfig, steps: usize, lr: f32) -> Vec<f32> {
    let mut ws = LocalCluster::run(ranks, |comm| {
        let mut c = cfg.build().unwrap();
        let mut mem = Memory::new(0, p.d, MemoryOptions::default()).unwrap();
        let mut w = vec![0f32; p.d];
        let mut g = vec![0f32; p.d];
        for _ in 0..steps {
            p.grad(comm.rank(), &w, &mut g);
            sync(&comm, &mut g, c.as_mut(), &mut mem).unwrap();
            for (wj, gj) in w.iter_mut().zip(&g) {
                *wj -= lr * gj;
            }
        }
        w
    })
    .unwrap();
    // Replicas stay identical.
    for w in &ws {
        assert_eq!(w, &ws[0]);
    }
    ws.swap_remove(0)
}

#[test]
fn topk_one_percent_with_error_feedback_reaches_the_dense_loss() {
    let (ranks, rows, d) = (4, 150, 400);
    let p = Problem::new(ranks, rows, d);
    let steps = 1500;
    let lr = 0.5;
    let start = p.loss(&vec![0.0; d]);
    let dense = p.loss(&train(&p, ranks, &MethodConfig::Identity, steps, lr));
    let topk = p.loss(&train(
        &p,
        ranks,
        &MethodConfig::TopK { ratio: 0.01 },
        steps,
        lr,
    ));
    eprintln!("least squares: start {start:.5}, dense {dense:.5}, top-k 1% + EF {topk:.5}");
    assert!(
        dense < 0.2 * start,
        "dense did not train: {start} -> {dense}"
    );
    assert!(topk <= dense * 1.02, "top-k {topk} vs dense {dense}");
}
