//! The local engine's in-place algorithms (every rank reduces its chunk straight from the
//! peers' buffers in shared memory): all-reduce and reduce-scatter of every element type and
//! operation against the sequential reduction, for ragged, prime, tiny and empty lengths,
//! bit-identical on every rank; and their failure paths (dead, silent, late, panicking and
//! mismatched ranks), which must end in the engine's usual errors, never in a hang.

use std::time::{Duration, Instant};

use half::{bf16, f16};
use meshrec_comm::local::AllReduceChoice;
use meshrec_comm::{
    all_reduce_as, chunk_range, reduce_scatter_as, ClusterError, CommError, Communicator, DType,
    Element, LocalCluster, LocalConfig, OpKind, ReduceOp,
};
use proptest::prelude::*;

/// Time scale of the timing-based failure tests: Miri's clock runs far slower code.
const SCALE: u64 = if cfg!(miri) { 30 } else { 1 };

fn in_place() -> LocalConfig {
    LocalConfig {
        all_reduce: AllReduceChoice::InPlace,
        ..LocalConfig::default()
    }
}

fn short_in_place(ms: u64) -> LocalConfig {
    LocalConfig {
        timeout: Duration::from_millis(ms),
        ..in_place()
    }
}

fn mix(seed: u64, rank: usize, i: usize) -> u64 {
    seed.wrapping_mul(6364136223846793005)
        .wrapping_add((rank as u64).wrapping_mul(1442695040888963407))
        .wrapping_add((i as u64).wrapping_mul(2862933555777620107))
        .rotate_left(23)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Element types under test: how to make one from a seed, and its arithmetic in `f64`.
trait Case: Element + Copy + PartialEq + std::fmt::Debug {
    fn make(h: u64) -> Self;
    fn to_f64(self) -> f64;
    /// One combining step as the engines compute it (halves: in f32, rounded once).
    fn step(op: ReduceOp, a: Self, b: Self) -> Self;
    /// The last step: `step` then, for `Avg`, the division, rounded once.
    fn last(op: ReduceOp, a: Self, b: Self, n: usize) -> Self;
    /// Relative size of one rounding (0 for exact types).
    const U: f64;
}

impl Case for f32 {
    fn make(h: u64) -> Self {
        // Non-integers of mixed sign and magnitude: sums round, so order matters.
        ((h % 2_000_001) as f32 - 1_000_000.0) / 997.0 * (1 + (h >> 60)) as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn step(op: ReduceOp, a: f32, b: f32) -> f32 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }
    fn last(op: ReduceOp, a: f32, b: f32, n: usize) -> f32 {
        let t = Self::step(op, a, b);
        if op == ReduceOp::Avg {
            t / n as f32
        } else {
            t
        }
    }
    const U: f64 = 1.0 / (1u64 << 24) as f64;
}

impl Case for i64 {
    fn make(h: u64) -> Self {
        (h as i64) >> (h % 62)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn step(op: ReduceOp, a: i64, b: i64) -> i64 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }
    fn last(op: ReduceOp, a: i64, b: i64, _n: usize) -> i64 {
        Self::step(op, a, b)
    }
    const U: f64 = 0.0;
}

macro_rules! half_case {
    ($t:ty, $u:expr) => {
        impl Case for $t {
            fn make(h: u64) -> Self {
                <$t>::from_f32((h % 51_200) as f32 / 256.0 - 100.0)
            }
            fn to_f64(self) -> f64 {
                f64::from(self.to_f32())
            }
            fn step(op: ReduceOp, a: $t, b: $t) -> $t {
                <$t>::from_f32(f32::step(op, a.to_f32(), b.to_f32()))
            }
            fn last(op: ReduceOp, a: $t, b: $t, n: usize) -> $t {
                <$t>::from_f32(f32::last(op, a.to_f32(), b.to_f32(), n))
            }
            const U: f64 = $u;
        }
    };
}
half_case!(f16, 1.0 / 2048.0);
half_case!(bf16, 1.0 / 256.0);

fn inputs<T: Case>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::make(mix(seed, rank, i))).collect()
}

/// The sequential reduction in rank order, as the in-place algorithm promises to compute it.
fn in_rank_order<T: Case>(seed: u64, n: usize, len: usize, op: ReduceOp) -> Vec<T> {
    let all: Vec<Vec<T>> = (0..n).map(|r| inputs(seed, r, len)).collect();
    (0..len)
        .map(|i| {
            let mut acc = all[0][i];
            for (q, v) in all.iter().enumerate().skip(1) {
                acc = if q + 1 == n {
                    T::last(op, acc, v[i], n)
                } else {
                    T::step(op, acc, v[i])
                };
            }
            acc
        })
        .collect()
}

/// Checks `got` against the exact (`f64`) reduction of the inputs within the type's
/// rounding: at most `n - 1` rounded steps (plus one for `Avg`'s division) for sums, none
/// for max / min; exact for `i64` (whose wrapping sum the rank-order reference gives).
fn within_rounding<T: Case>(
    seed: u64,
    n: usize,
    len: usize,
    op: ReduceOp,
    got: &[T],
    range: std::ops::Range<usize>,
) -> Result<(), TestCaseError> {
    let all: Vec<Vec<T>> = (0..n).map(|r| inputs(seed, r, len)).collect();
    for (k, i) in range.enumerate() {
        let xs: Vec<f64> = all.iter().map(|v| v[i].to_f64()).collect();
        let abs: f64 = xs.iter().map(|x| x.abs()).sum();
        let (want, tol) = match op {
            ReduceOp::Sum => (xs.iter().sum::<f64>(), (n - 1) as f64 * T::U * abs),
            ReduceOp::Avg => (
                xs.iter().sum::<f64>() / n as f64,
                n as f64 * T::U * abs / n as f64,
            ),
            ReduceOp::Max => (xs.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0),
            ReduceOp::Min => (xs.iter().copied().fold(f64::INFINITY, f64::min), 0.0),
        };
        if T::U == 0.0 {
            continue; // integers: compared exactly against the wrapping reference instead
        }
        let g = got[k].to_f64();
        prop_assert!(
            (g - want).abs() <= tol * 1.05 + f64::MIN_POSITIVE,
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
    Ok(())
}

fn bytes_of<T: Element>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

fn check_all_reduce<T: Case>(
    n: usize,
    len: usize,
    seed: u64,
    op: ReduceOp,
) -> Result<(), TestCaseError> {
    let got = LocalCluster::run_with_config(n, in_place(), |c| {
        let mut b = inputs::<T>(seed, c.rank(), len);
        all_reduce_as(&c, &mut b, op).map(|()| b)
    })
    .expect("no rank panics");
    let got: Vec<Vec<T>> = got
        .into_iter()
        .map(|g| g.expect("all_reduce succeeds"))
        .collect();
    let want = in_rank_order::<T>(seed, n, len, op);
    prop_assert!(
        bytes_of(&got[0]) == bytes_of(&want),
        "{} {:?} n {} len {}: not the rank-order reduction",
        T::DTYPE,
        op,
        n,
        len
    );
    within_rounding(seed, n, len, op, &got[0], 0..len)?;
    for g in &got[1..] {
        prop_assert!(bytes_of(g) == bytes_of(&got[0]), "ranks agree bit for bit");
    }
    Ok(())
}

fn check_reduce_scatter<T: Case>(
    n: usize,
    len: usize,
    seed: u64,
    op: ReduceOp,
) -> Result<(), TestCaseError> {
    let got = LocalCluster::run_with_config(n, in_place(), |c| {
        let input = inputs::<T>(seed, c.rank(), len);
        let mut out = vec![T::make(0); chunk_range(len, n, c.rank()).len()];
        reduce_scatter_as(&c, &input, &mut out, op).map(|()| out)
    })
    .expect("no rank panics");
    let want = in_rank_order::<T>(seed, n, len, op);
    for (r, g) in got.into_iter().enumerate() {
        let g = g.expect("reduce_scatter succeeds");
        let range = chunk_range(len, n, r);
        prop_assert!(bytes_of(&g) == bytes_of(&want[range.clone()]), "rank {}", r);
        within_rounding(seed, n, len, op, &g, range)?;
    }
    Ok(())
}

const PRIMES: [usize; 12] = [2, 3, 5, 7, 11, 13, 97, 1009, 4099, 7919, 16_411, 65_537];

/// (ranks 2..=5, length): empty, one, primes, shorter than the group, not divisible by it,
/// and spanning several kernel blocks.
fn shape() -> impl Strategy<Value = (usize, usize)> {
    (2usize..=5).prop_flat_map(|n| {
        let len = prop_oneof![
            Just(0usize),
            Just(1usize),
            proptest::sample::select(&PRIMES[..]),
            0..n,
            (1usize..2000).prop_map(move |k| k * n + 1 + k % (n - 1)),
            0usize..5000,
            20_000usize..40_000,
        ];
        (Just(n), len)
    })
}

fn any_op() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Avg),
        Just(ReduceOp::Max),
        Just(ReduceOp::Min)
    ]
}

fn int_op() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Max),
        Just(ReduceOp::Min)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn f32_all_reduce((n, len) in shape(), seed in any::<u64>(), op in any_op()) {
        check_all_reduce::<f32>(n, len, seed, op)?;
    }

    #[test]
    fn i64_all_reduce_is_exact((n, len) in shape(), seed in any::<u64>(), op in int_op()) {
        check_all_reduce::<i64>(n, len, seed, op)?;
    }

    #[test]
    fn f16_all_reduce((n, len) in shape(), seed in any::<u64>(), op in any_op()) {
        check_all_reduce::<f16>(n, len, seed, op)?;
    }

    #[test]
    fn bf16_all_reduce((n, len) in shape(), seed in any::<u64>(), op in any_op()) {
        check_all_reduce::<bf16>(n, len, seed, op)?;
    }

    #[test]
    fn f32_reduce_scatter((n, len) in shape(), seed in any::<u64>(), op in any_op()) {
        check_reduce_scatter::<f32>(n, len, seed, op)?;
    }

    #[test]
    fn i64_reduce_scatter_is_exact((n, len) in shape(), seed in any::<u64>(), op in int_op()) {
        check_reduce_scatter::<i64>(n, len, seed, op)?;
    }

    #[test]
    fn half_reduce_scatter((n, len) in shape(), seed in any::<u64>(), op in any_op()) {
        check_reduce_scatter::<f16>(n, len, seed, op)?;
        check_reduce_scatter::<bf16>(n, len, seed, op)?;
    }

    /// `Auto` picks the in-place algorithm by byte size: every algorithm must give one answer
    /// (exact integer sums, so any order agrees).
    #[test]
    fn auto_threshold_switches_algorithms_consistently(
        (n, len) in shape(), seed in any::<u64>(), threshold in 0usize..200_000
    ) {
        let cfg = LocalConfig { in_place_threshold_bytes: threshold, ..LocalConfig::default() };
        let got = LocalCluster::run_with_config(n, cfg, |c| {
            let mut b = inputs::<i64>(seed, c.rank(), len);
            all_reduce_as(&c, &mut b, ReduceOp::Sum).map(|()| b)
        }).expect("no rank panics");
        let want = in_rank_order::<i64>(seed, n, len, ReduceOp::Sum);
        for g in got {
            prop_assert_eq!(g.expect("all_reduce succeeds"), want.clone());
        }
    }
}

#[test]
fn unaligned_byte_buffers_are_reduced_in_place() {
    let got = LocalCluster::run_with_config(3, in_place(), |c| {
        let vals: Vec<i64> = (0..1001).map(|i| i * (c.rank() as i64 + 1)).collect();
        let mut words = vec![0u64; 1002];
        let raw = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[3..3 + 8 * 1001];
        raw.copy_from_slice(bytemuck::cast_slice(&vals));
        c.all_reduce_bytes(raw, DType::I64, ReduceOp::Sum)
            .map(|()| {
                raw.chunks_exact(8)
                    .map(bytemuck::pod_read_unaligned::<i64>)
                    .collect::<Vec<_>>()
            })
    })
    .expect("no rank panics");
    for g in got {
        let g = g.expect("all_reduce_bytes succeeds");
        assert!(g.iter().enumerate().all(|(i, &x)| x == 6 * i as i64));
    }
}

#[test]
fn statistics_count_the_bytes_moved_between_ranks() {
    // Each rank reads its chunk of the 3 peers' buffers and writes the result back, and the
    // peers do the same with theirs of its buffer: 2 (n - 1) / n of 400 kB each way.
    let got = LocalCluster::run_with_config(4, in_place(), |c| {
        let mut b = vec![1.0f32; 100_000];
        c.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
        let mut out = vec![0.0f32; 25_000];
        c.reduce_scatter(&b, &mut out, ReduceOp::Sum)
            .expect("reduce_scatter");
        c.stats()
    })
    .expect("no rank panics");
    for s in got {
        let ar = s.get(OpKind::AllReduce);
        assert_eq!((ar.bytes_sent, ar.bytes_received), (600_000, 600_000));
        let rs = s.get(OpKind::ReduceScatter);
        assert_eq!((rs.bytes_sent, rs.bytes_received), (300_000, 300_000));
    }
}

#[test]
fn blocking_and_non_blocking_in_place_reductions_overlap() {
    // The progress thread's lane has its own board: both run in place at the same time.
    let got = LocalCluster::run_with_config(3, in_place(), |c| {
        let r = c.rank() as f32;
        let pending = c.iall_reduce(vec![r; 300_001], ReduceOp::Sum)?;
        let mut b = vec![r + 1.0; 200_003];
        c.all_reduce(&mut b, ReduceOp::Max)?;
        let nb = pending.wait()?;
        Ok::<_, CommError>((b, nb))
    })
    .expect("no rank panics");
    for g in got {
        let (b, nb) = g.expect("both succeed");
        assert!(b.iter().all(|&x| x == 3.0));
        assert!(nb.iter().all(|&x| x == 3.0));
    }
}

#[test]
fn dead_rank_gives_peer_lost() {
    for op in [OpKind::AllReduce, OpKind::ReduceScatter] {
        let got = LocalCluster::run_with_config(4, short_in_place(300), |c| {
            if c.rank() == 2 {
                return Ok(()); // dies: drops its communicator without taking part
            }
            let mut b = vec![1.0f32; 10_000];
            match op {
                OpKind::AllReduce => c.all_reduce(&mut b, ReduceOp::Sum),
                _ => {
                    let mut out = vec![0.0; 2500];
                    c.reduce_scatter(&b, &mut out, ReduceOp::Sum)
                }
            }
        })
        .expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            if r != 2 {
                assert_eq!(g, Err(CommError::PeerLost { rank: 2, op }), "rank {r}");
            }
        }
    }
}

#[test]
fn silent_rank_gives_timeout() {
    let t0 = Instant::now();
    let got = LocalCluster::run_with_config(3, short_in_place(300), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(900));
            return Ok(());
        }
        let mut b = vec![1.0f32; 10_000];
        c.all_reduce(&mut b, ReduceOp::Sum)
    })
    .expect("no rank panics");
    for r in [0, 2] {
        assert!(
            matches!(
                got[r],
                Err(CommError::Timeout {
                    op: OpKind::AllReduce,
                    ..
                })
            ),
            "rank {r}: {:?}",
            got[r]
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// Rank 0 publishes its buffer, times out waiting for the late ranks and leaves; the late
/// ranks then find its *ready* but not its buffer (revoked), must not touch it, and report
/// its error. The group stays usable.
#[test]
fn a_rank_that_left_after_publishing_is_never_touched() {
    let got = LocalCluster::run_with_config(3, short_in_place(600 * SCALE), |c| {
        let r = c.rank();
        if r > 0 {
            std::thread::sleep(Duration::from_millis((900 + 20 * r as u64) * SCALE));
        }
        let mut b = vec![(r + 1) as f32; 4_000];
        let first = c.all_reduce(&mut b, ReduceOp::Sum);
        let untouched = b.iter().all(|&x| x == (r + 1) as f32);
        c.barrier().expect("barrier after the failure");
        let mut again = vec![(r + 1) as f32; 4_000];
        let second = c.all_reduce(&mut again, ReduceOp::Sum).map(|()| again[0]);
        (first, untouched, second)
    })
    .expect("no rank panics");
    for (r, (first, untouched, second)) in got.into_iter().enumerate() {
        assert!(
            matches!(
                first,
                Err(CommError::Timeout {
                    rank: 1,
                    op: OpKind::AllReduce,
                    ..
                })
            ),
            "rank {r}: rank 0's timeout, relayed: {first:?}"
        );
        if r == 0 {
            assert!(
                untouched,
                "nobody wrote into the buffer of the rank that left"
            );
        }
        assert_eq!(second, Ok(6.0), "rank {r}");
    }
}

#[test]
fn mismatched_lengths_and_types_are_reported() {
    let got = LocalCluster::run_with_config(3, short_in_place(500), |c| {
        let mine = if c.rank() == 1 { 10_001 } else { 10_000 };
        let mut b = vec![1.0f32; mine];
        let len = c.all_reduce(&mut b, ReduceOp::Sum);
        let ty = if c.rank() == 2 {
            all_reduce_as(&c, &mut [1i64; 10_000], ReduceOp::Sum)
        } else {
            all_reduce_as(&c, &mut [1.0f32; 10_000], ReduceOp::Sum)
        };
        let mut ok = [1.0f32; 7];
        let after = c.all_reduce(&mut ok, ReduceOp::Sum).map(|()| ok[0]);
        (len, ty, after)
    })
    .expect("no rank panics");
    for (r, (len, ty, after)) in got.into_iter().enumerate() {
        assert!(
            matches!(len, Err(CommError::SizeMismatch { op: OpKind::AllReduce, rank, peer, .. }) if rank == 1 || peer == 1),
            "rank {r}: {len:?}"
        );
        assert!(
            matches!(&ty, Err(CommError::InvalidArgument(m)) if m.contains("i64") && m.contains("f32")),
            "rank {r}: {ty:?}"
        );
        assert_eq!(after, Ok(3.0));
    }
}

#[test]
fn types_reduced_by_different_algorithms_are_named() {
    // Under `Auto`, 20 000 i64 (160 kB) run in place and 20 000 f32 (80 kB) do not.
    let cfg = LocalConfig {
        in_place_threshold_bytes: 128 * 1024,
        ..LocalConfig::with_timeout(Duration::from_millis(500))
    };
    let got = LocalCluster::run_with_config(2, cfg, |c| {
        if c.rank() == 0 {
            all_reduce_as(&c, &mut vec![1i64; 20_000], ReduceOp::Sum)
        } else {
            all_reduce_as(&c, &mut vec![1.0f32; 20_000], ReduceOp::Sum)
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
fn panicking_rank_poisons_ranks_waiting_in_place() {
    let t0 = Instant::now();
    let seen = std::sync::Mutex::new(Vec::new());
    let cfg = LocalConfig {
        timeout: Duration::from_secs(30 * SCALE),
        ..in_place()
    };
    let r = LocalCluster::run_with_config(3, cfg, |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(50 * SCALE));
            panic!("injected failure on rank 2");
        }
        let mut b = vec![1.0f32; 4_000];
        let e = c.all_reduce(&mut b, ReduceOp::Sum);
        seen.lock().expect("lock").push((c.rank(), e));
    });
    assert!(
        matches!(r, Err(ClusterError::RankPanicked { rank: 2, .. })),
        "{r:?}"
    );
    for (rank, e) in seen.into_inner().expect("lock") {
        assert!(
            matches!(e, Err(CommError::Poisoned { world_rank: 2, .. })),
            "rank {rank}: {e:?}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(10 * SCALE));
}

#[test]
fn bad_output_length_is_refused_before_publishing() {
    let got = LocalCluster::run_with_config(2, in_place(), |c| {
        let mut out = [0.0f32; 3];
        let bad = c.reduce_scatter(&[1.0; 10], &mut out, ReduceOp::Sum);
        let mut ok = [0.0f32; 5];
        let good = c
            .reduce_scatter(&[1.0; 10], &mut ok, ReduceOp::Sum)
            .map(|()| ok);
        (bad, good)
    })
    .expect("no rank panics");
    for (bad, good) in got {
        assert!(
            matches!(
                bad,
                Err(CommError::BadLength {
                    op: OpKind::ReduceScatter,
                    expected: 5,
                    got: 3,
                    ..
                })
            ),
            "{bad:?}"
        );
        assert_eq!(good, Ok([2.0; 5]));
    }
}

/// Small enough for `cargo miri test --test in_place small_`, which checks the unsafe code of
/// the in-place path (pointers published on the board, disjoint chunk access, revocation).
#[test]
fn small_in_place_reductions() {
    for n in 2..=4 {
        for len in [0usize, 1, 5, 37] {
            let got = LocalCluster::run_with_config(n, in_place(), |c| {
                let r = c.rank();
                let mut b: Vec<f32> = (0..len).map(|i| (i * n + r) as f32).collect();
                c.all_reduce(&mut b, ReduceOp::Avg)?;
                let input: Vec<i64> = (0..len).map(|i| (i + r) as i64).collect();
                let mut out = vec![0i64; chunk_range(len, n, r).len()];
                reduce_scatter_as(&c, &input, &mut out, ReduceOp::Max)?;
                Ok::<_, CommError>((b, out))
            })
            .expect("no rank panics");
            for (r, g) in got.into_iter().enumerate() {
                let (b, out) = g.expect("reductions succeed");
                let avg: Vec<f32> = (0..len)
                    .map(|i| (0..n).map(|q| (i * n + q) as f32).sum::<f32>() / n as f32)
                    .collect();
                assert_eq!(b, avg, "n {n} len {len} rank {r}");
                let max: Vec<i64> = chunk_range(len, n, r).map(|i| (i + n - 1) as i64).collect();
                assert_eq!(out, max, "n {n} len {len} rank {r}");
            }
        }
    }
}
