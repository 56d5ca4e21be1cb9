//! Typed reductions (`DType`, `all_reduce_as`, `reduce_scatter_as`, the byte methods) on the
//! local engine, for every algorithm, and on the sim engine: exact integer results, halves
//! within their rounding, the errors every engine shares, and bytes counted by element size.

use half::{bf16, f16};
use meshrec_comm::cost::{self, LinkClass, Topology};
use meshrec_comm::local::AllReduceChoice;
use meshrec_comm::{
    all_reduce_as, chunk_range, reduce_scatter_as, CommError, Communicator, DType, Element,
    LocalCluster, LocalConfig, OpKind, ReduceOp, SimCommunicator,
};
use proptest::prelude::*;

fn config(algo: u8, seg: usize) -> LocalConfig {
    LocalConfig {
        all_reduce: match algo {
            0 => AllReduceChoice::Auto,
            1 => AllReduceChoice::Ring,
            2 => AllReduceChoice::RecursiveDoubling,
            _ => AllReduceChoice::InPlace,
        },
        segment_bytes: seg,
        ..LocalConfig::default()
    }
}

fn mix(seed: u64, rank: usize, i: usize) -> u64 {
    seed.wrapping_mul(6364136223846793005)
        .wrapping_add((rank as u64).wrapping_mul(1442695040888963407))
        .wrapping_add((i as u64).wrapping_mul(2862933555777620107))
        .rotate_left(17)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Magnitudes from 1 to 2^62 (most above 2^24, where f32 stops being exact), both signs.
fn int_value(seed: u64, rank: usize, i: usize) -> i64 {
    let h = mix(seed, rank, i);
    (h as i64) >> (h % 62)
}

fn int_reference(seed: u64, n: usize, len: usize, op: ReduceOp) -> Vec<i64> {
    (0..len)
        .map(|i| {
            let xs = (0..n).map(|r| int_value(seed, r, i));
            match op {
                // Integer sums wrap, like the engines; wrapping addition is associative, so
                // any summation order gives exactly this.
                ReduceOp::Sum => xs.fold(0i64, i64::wrapping_add),
                ReduceOp::Max => xs.max().unwrap_or(0),
                ReduceOp::Min => xs.min().unwrap_or(0),
                ReduceOp::Avg => unreachable!("refused for integers"),
            }
        })
        .collect()
}

/// Values in [-100, 100) in steps of 1/256. Each half type rounds them on the way in (bf16
/// keeps 8 significant bits), so the reference starts from the rounded inputs.
fn float_value(seed: u64, rank: usize, i: usize) -> f32 {
    (mix(seed, rank, i) % 51_200) as f32 / 256.0 - 100.0
}

fn int_op() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Max),
        Just(ReduceOp::Min)
    ]
}

/// (ranks 2..=5, length): empty, shorter than the group, ragged, and ring-sized.
fn shape() -> impl Strategy<Value = (usize, usize)> {
    (2usize..=5).prop_flat_map(|n| {
        let len = prop_oneof![
            Just(0usize),
            0..n,
            1usize..300,
            (1usize..40).prop_map(move |k| k * n + 1),
            20_000usize..40_000,
        ];
        (Just(n), len)
    })
}

fn seg() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(8usize),
        Just(40usize),
        Just(4096usize),
        Just(256 * 1024usize)
    ]
}

/// The unit roundoff of a half type: the largest relative error of one rounding.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

/// Checks an all-reduce of a half type `T` against the f64 reduction of its (rounded)
/// inputs: an element passes at most `n - 1` combining steps, each rounding once, so the error
/// is at most `(n - 1) u sum|x|` (to first order; the 5% slack covers the rest, which is
/// `(n - 1) u` relative, 1.6% for bf16 over 5 ranks), plus one rounding for `Avg`'s
/// division. Every rank must hold the same bits.
fn check_halves<T: Element + Into<f32>>(
    from: fn(f32) -> T,
    n: usize,
    len: usize,
    seed: u64,
    op: ReduceOp,
    algo: u8,
    seg: usize,
) -> Result<(), TestCaseError> {
    let inputs = |r: usize| -> Vec<T> { (0..len).map(|i| from(float_value(seed, r, i))).collect() };
    let got = LocalCluster::run_with_config(n, config(algo, seg), |c| {
        let mut b = inputs(c.rank());
        all_reduce_as(&c, &mut b, op).map(|()| b)
    })
    .expect("no rank panics");
    let got: Vec<Vec<T>> = got
        .into_iter()
        .map(|g| g.expect("all_reduce_as succeeds"))
        .collect();
    let ins: Vec<Vec<f64>> = (0..n)
        .map(|r| inputs(r).into_iter().map(|x| f64::from(x.into())).collect())
        .collect();
    let u = unit_roundoff(T::DTYPE);
    for i in 0..len {
        let xs: Vec<f64> = ins.iter().map(|v| v[i]).collect();
        let abs: f64 = xs.iter().map(|x| x.abs()).sum();
        let (want, tol) = match op {
            ReduceOp::Sum => (xs.iter().sum::<f64>(), (n - 1) as f64 * u * abs),
            ReduceOp::Avg => (
                xs.iter().sum::<f64>() / n as f64,
                ((n - 1) as f64 * u * abs + u * abs) / n as f64,
            ),
            ReduceOp::Max => (xs.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0),
            ReduceOp::Min => (xs.iter().copied().fold(f64::INFINITY, f64::min), 0.0),
        };
        let g = f64::from(got[0][i].into());
        prop_assert!(
            (g - want).abs() <= tol * 1.05,
            "{} {:?} n {} i {}: got {} want {} tol {}",
            T::DTYPE,
            op,
            n,
            i,
            g,
            want,
            tol
        );
    }
    for g in &got[1..] {
        prop_assert!(
            bytemuck::cast_slice::<T, u8>(g) == bytemuck::cast_slice::<T, u8>(&got[0]),
            "ranks agree bit for bit"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn i64_all_reduce_is_exact(
        (n, len) in shape(), seed in any::<u64>(), op in int_op(), algo in 0u8..4, seg in seg()
    ) {
        let want = int_reference(seed, n, len, op);
        let got = LocalCluster::run_with_config(n, config(algo, seg), |c| {
            let mut b: Vec<i64> = (0..len).map(|i| int_value(seed, c.rank(), i)).collect();
            all_reduce_as(&c, &mut b, op).map(|()| b)
        }).expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            prop_assert_eq!(g.expect("all_reduce_as succeeds"), want.clone(), "rank {} of {}", r, n);
        }
    }

    #[test]
    fn i64_reduce_scatter_is_exact(
        (n, len) in shape(), seed in any::<u64>(), op in int_op(), algo in 0u8..4, seg in seg()
    ) {
        let want = int_reference(seed, n, len, op);
        let got = LocalCluster::run_with_config(n, config(algo, seg), |c| {
            let inp: Vec<i64> = (0..len).map(|i| int_value(seed, c.rank(), i)).collect();
            let mut out = vec![0i64; chunk_range(len, n, c.rank()).len()];
            reduce_scatter_as(&c, &inp, &mut out, op).map(|()| out)
        }).expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            prop_assert_eq!(g.expect("reduce_scatter_as succeeds"), want[chunk_range(len, n, r)].to_vec());
        }
    }

    #[test]
    fn f16_all_reduce_is_within_rounding(
        (n, len) in shape(), seed in any::<u64>(), op in prop_oneof![Just(ReduceOp::Sum), Just(ReduceOp::Avg), Just(ReduceOp::Max), Just(ReduceOp::Min)],
        algo in 0u8..4, seg in seg()
    ) {
        check_halves(f16::from_f32, n, len, seed, op, algo, seg)?;
    }

    #[test]
    fn bf16_all_reduce_is_within_rounding(
        (n, len) in shape(), seed in any::<u64>(), op in prop_oneof![Just(ReduceOp::Sum), Just(ReduceOp::Avg), Just(ReduceOp::Max), Just(ReduceOp::Min)],
        algo in 0u8..4, seg in seg()
    ) {
        check_halves(bf16::from_f32, n, len, seed, op, algo, seg)?;
    }
}

#[test]
fn integer_counts_above_2_pow_24_stay_exact_where_f32_rounds() {
    let base = (1i64 << 24) + 1;
    let got = LocalCluster::run(3, |c| {
        let mut ints = vec![base * (c.rank() as i64 + 1), 1];
        all_reduce_as(&c, &mut ints, ReduceOp::Sum)?;
        let mut floats = vec![(base * (c.rank() as i64 + 1)) as f32, 1.0];
        c.all_reduce(&mut floats, ReduceOp::Sum)?;
        Ok::<_, CommError>((ints, floats))
    })
    .expect("no rank panics");
    for g in got {
        let (ints, floats) = g.expect("reductions succeed");
        assert_eq!(ints, vec![6 * base, 3]);
        assert_ne!(floats[0] as i64, 6 * base, "f32 cannot hold the count");
    }
}

#[test]
fn f32_bytes_path_matches_the_f32_methods_bit_for_bit() {
    for algo in [1u8, 2, 3] {
        let got = LocalCluster::run_with_config(3, config(algo, 1000), |c| {
            let v: Vec<f32> = (0..5001)
                .map(|i| ((i * 7 + c.rank() * 13) % 101) as f32 * 0.013 + 0.1)
                .collect();
            let mut a = v.clone();
            c.all_reduce(&mut a, ReduceOp::Avg)?;
            let mut b = v.clone();
            all_reduce_as(&c, &mut b, ReduceOp::Avg)?;
            let mut sa = vec![0.0f32; chunk_range(v.len(), 3, c.rank()).len()];
            c.reduce_scatter(&v, &mut sa, ReduceOp::Sum)?;
            let mut sb = sa.clone();
            reduce_scatter_as(&c, &v, &mut sb, ReduceOp::Sum)?;
            Ok::<_, CommError>((a, b, sa, sb))
        })
        .expect("no rank panics");
        for g in got {
            let (a, b, sa, sb) = g.expect("reductions succeed");
            assert_eq!(
                bytemuck::cast_slice::<f32, u8>(&a),
                bytemuck::cast_slice::<f32, u8>(&b)
            );
            assert_eq!(
                bytemuck::cast_slice::<f32, u8>(&sa),
                bytemuck::cast_slice::<f32, u8>(&sb)
            );
        }
    }
}

#[test]
fn unaligned_byte_buffers_are_reduced() {
    let got = LocalCluster::run(3, |c| {
        let vals: [i64; 2] = [c.rank() as i64 - 1, 1 << 40];
        // One byte into 8-aligned storage: certainly not aligned for i64.
        let mut words = [0u64; 3];
        let raw = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[1..17];
        raw.copy_from_slice(bytemuck::cast_slice(&vals));
        c.all_reduce_bytes(raw, DType::I64, ReduceOp::Sum)
            .map(|()| bytemuck::pod_read_unaligned::<[i64; 2]>(raw))
    })
    .expect("no rank panics");
    for g in got {
        assert_eq!(g.expect("all_reduce_bytes succeeds"), [0, 3 << 40]);
    }
}

fn topo() -> Topology {
    Topology {
        devices_per_node: 2,
        intra: LinkClass::new_us_gbps(1.0, 100.0),
        inter: LinkClass::new_us_gbps(10.0, 10.0),
    }
}

/// Runs `f` on every rank of a 3-rank local cluster, directly and wrapped by the sim engine.
fn on_both_engines<T: Send>(f: impl Fn(&dyn Communicator) -> T + Sync) -> Vec<T> {
    let mut out = LocalCluster::run(3, |c| f(&c)).expect("no rank panics");
    out.extend(
        LocalCluster::run(3, |c| {
            let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
            f(&s)
        })
        .expect("no rank panics"),
    );
    out
}

#[test]
fn ragged_byte_lengths_are_rejected_naming_both_sizes() {
    let got = on_both_engines(|c| {
        let mut seven = [0u8; 7];
        let a = c.all_reduce_bytes(&mut seven, DType::I64, ReduceOp::Sum);
        let mut out = [0u8; 3];
        let b = c.reduce_scatter_bytes(&[0u8; 12], &mut out, DType::F16, ReduceOp::Sum);
        let mut ok = [0u8; 4];
        let c2 = c.reduce_scatter_bytes(&[0u8; 5], &mut ok, DType::F32, ReduceOp::Max);
        // The group still works after the refusals.
        let mut x = [1i64];
        all_reduce_as(c, &mut x, ReduceOp::Sum).map(|()| (a, b, c2, x[0]))
    });
    for g in got {
        let (a, b, c, x) = g.expect("a valid reduction after the refusals succeeds");
        let msg = |e: Result<(), CommError>| match e {
            Err(CommError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let a = msg(a);
        assert!(a.contains("all_reduce") && a.contains("7 bytes"), "{a}");
        assert!(a.contains("i64") && a.contains("8 bytes each"), "{a}");
        let b = msg(b);
        assert!(b.contains("output of 3 bytes") && b.contains("f16"), "{b}");
        let c = msg(c);
        assert!(c.contains("input of 5 bytes") && c.contains("f32"), "{c}");
        assert_eq!(x, 3);
    }
}

#[test]
fn avg_on_integers_is_refused() {
    let got = on_both_engines(|c| {
        let mut x = [4i64, 6];
        let a = all_reduce_as(c, &mut x, ReduceOp::Avg);
        let mut out = vec![0i64; chunk_range(2, 3, c.rank()).len()];
        let b = reduce_scatter_as(c, &[4i64, 6], &mut out, ReduceOp::Avg);
        (a, b, x)
    });
    for (a, b, x) in got {
        for e in [a, b] {
            assert!(
                matches!(&e, Err(CommError::InvalidArgument(m)) if m.contains("Avg") && m.contains("i64")),
                "{e:?}"
            );
        }
        assert_eq!(x, [4, 6], "a refused call leaves the buffer alone");
    }
    assert!(!DType::I64.supports(ReduceOp::Avg));
    assert!(DType::F16.supports(ReduceOp::Avg));
}

#[test]
fn ranks_reducing_different_types_fail_instead_of_mixing() {
    let cfg = LocalConfig {
        all_reduce: AllReduceChoice::RecursiveDoubling,
        ..LocalConfig::with_timeout(std::time::Duration::from_millis(500))
    };
    let got = LocalCluster::run_with_config(2, cfg, |c| {
        if c.rank() == 0 {
            all_reduce_as(&c, &mut [1i64; 4], ReduceOp::Sum)
        } else {
            all_reduce_as(&c, &mut [1.0f32; 4], ReduceOp::Sum)
        }
    })
    .expect("no rank panics");
    for g in got {
        assert!(
            matches!(&g, Err(CommError::InvalidArgument(m)) if m.contains("i64") && m.contains("f32")),
            "{g:?}"
        );
    }
}

#[test]
fn sim_counts_bytes_by_element_size() {
    fn bytes_of(dtype: DType, n: usize) -> (u64, f64, u64) {
        // One algorithm for every type: under `Auto` the local engine picks it by byte size,
        // and the inner counts would then differ by more than the element size.
        let got = LocalCluster::run_with_config(4, config(3, 256 * 1024), |c| {
            let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
            let mut buf = vec![0u8; n * dtype.size()];
            s.all_reduce_bytes(&mut buf, dtype, ReduceOp::Sum)
                .expect("all_reduce_bytes");
            let snap = s.clock().snapshot();
            let stats = s.stats().get(OpKind::AllReduce);
            (
                snap.bytes_sent.values().sum::<u64>(),
                snap.comm_s,
                stats.bytes_sent,
            )
        })
        .expect("no rank panics");
        got[0]
    }
    // Sizes on one side of the model's ring / recursive-doubling crossover for every
    // type, so that only the element size differs between the runs.
    let crossover = cost::ring_crossover_bytes(4, &topo().inter).expect("a crossover");
    for n in [
        (crossover / 16.0) as usize,
        (crossover / 2.0) as usize + 1000,
    ] {
        let (f32_bytes, f32_time, f32_inner) = bytes_of(DType::F32, n);
        let (f16_bytes, f16_time, f16_inner) = bytes_of(DType::F16, n);
        let (bf16_bytes, _, _) = bytes_of(DType::Bf16, n);
        let (i64_bytes, _, _) = bytes_of(DType::I64, n);
        assert!(f32_bytes > 0);
        assert_eq!(
            2 * f16_bytes,
            f32_bytes,
            "f16 moves half the bytes of f32 (n {n})"
        );
        assert_eq!(bf16_bytes, f16_bytes);
        assert_eq!(i64_bytes, 2 * f32_bytes);
        assert!(f16_time < f32_time, "and costs less modelled time");
        // The wrapped local engine counts what it really moved, also by element size.
        assert_eq!(2 * f16_inner, f32_inner);
    }
}
