//! Every collective of the local engine against a naive reference, for world sizes 1..=8 and
//! lengths 0, 1, below the world size, not divisible by it, and large (ring path).

use meshrec_comm::local::AllReduceChoice;
use meshrec_comm::{chunk_range, Communicator, LocalCluster, LocalConfig, ReduceOp};
use proptest::prelude::*;

/// Integer-valued inputs keep every sum exact, so any summation order must match bit for bit.
fn value(seed: u64, rank: usize, i: usize) -> f32 {
    let h = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add((rank as u64) * 1442695040888963407)
        .wrapping_add((i as u64).wrapping_mul(2862933555777620107));
    ((h >> 33) % 201) as f32 - 100.0
}

fn input(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(seed, rank, i)).collect()
}

fn reference(seed: u64, n: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let xs = (0..n).map(|r| value(seed, r, i));
            match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Avg => xs.sum::<f32>() / n as f32,
                ReduceOp::Max => xs.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Min => xs.fold(f32::INFINITY, f32::min),
            }
        })
        .collect()
}

fn op_strategy() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Avg),
        Just(ReduceOp::Max),
        Just(ReduceOp::Min)
    ]
}

/// (world size, length): the length classes the issue names.
fn shape() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=8).prop_flat_map(|n| {
        let len = prop_oneof![
            Just(0usize),
            Just(1usize),
            0..n.max(1),
            (1usize..40).prop_map(move |k| k * n + 1 + k % (n.max(2) - 1)),
            0usize..300,
            20_000usize..40_000,
        ];
        (Just(n), len)
    })
}

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

fn seg_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(4usize),
        Just(28usize),
        Just(4096usize),
        Just(256 * 1024usize)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn all_reduce_matches_reference(
        (n, len) in shape(), seed in any::<u64>(), op in op_strategy(), algo in 0u8..4, seg in seg_strategy()
    ) {
        let want = reference(seed, n, len, op);
        let got = LocalCluster::run_with_config(n, config(algo, seg), |c| {
            let mut b = input(seed, c.rank(), len);
            c.all_reduce(&mut b, op).map(|()| b)
        }).expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            let g = g.expect("all_reduce succeeds");
            prop_assert_eq!(&g, &want, "rank {} of {}, len {}", r, n, len);
        }
    }

    #[test]
    fn reduce_scatter_matches_reference(
        (n, len) in shape(), seed in any::<u64>(), op in op_strategy(), algo in 0u8..4, seg in seg_strategy()
    ) {
        let want = reference(seed, n, len, op);
        let got = LocalCluster::run_with_config(n, config(algo, seg), |c| {
            let inp = input(seed, c.rank(), len);
            let mut out = vec![0.0; chunk_range(len, n, c.rank()).len()];
            c.reduce_scatter(&inp, &mut out, op).map(|()| out)
        }).expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            prop_assert_eq!(g.expect("reduce_scatter succeeds"), want[chunk_range(len, n, r)].to_vec());
        }
    }

    #[test]
    fn all_gather_matches_reference((n, len) in shape(), seed in any::<u64>()) {
        let want: Vec<f32> = (0..n).flat_map(|r| input(seed, r, len)).collect();
        let got = LocalCluster::run(n, |c| {
            let mut out = vec![f32::NAN; n * len];
            c.all_gather(&input(seed, c.rank(), len), &mut out).map(|()| out)
        }).expect("no rank panics");
        for g in got {
            prop_assert_eq!(g.expect("all_gather succeeds"), want.clone());
        }
    }

    #[test]
    fn all_gatherv_returns_every_ragged_payload(
        n in 1usize..=8, lens in proptest::collection::vec(0usize..200, 8), seed in any::<u64>()
    ) {
        let payload = |r: usize| -> Vec<u8> { (0..lens[r]).map(|i| value(seed, r, i) as i8 as u8).collect() };
        let got = LocalCluster::run(n, |c| {
            let bytes = c.all_gatherv_bytes(&payload(c.rank()));
            let floats = c.all_gatherv(&input(seed, c.rank(), lens[c.rank()]));
            (bytes, floats)
        }).expect("no rank panics");
        for (bytes, floats) in got {
            let bytes = bytes.expect("all_gatherv_bytes succeeds");
            let floats = floats.expect("all_gatherv succeeds");
            for r in 0..n {
                prop_assert_eq!(&bytes[r], &payload(r));
                prop_assert_eq!(&floats[r], &input(seed, r, lens[r]));
            }
        }
    }

    #[test]
    fn broadcast_copies_the_root((n, len) in shape(), seed in any::<u64>(), root_pick in any::<usize>()) {
        let root = root_pick % n;
        let got = LocalCluster::run(n, |c| {
            let mut b = input(seed, c.rank(), len);
            let mut bytes = vec![c.rank() as u8; c.rank() + len % 7];
            c.broadcast(&mut b, root)?;
            c.broadcast_bytes(&mut bytes, root)?;
            Ok::<_, meshrec_comm::CommError>((b, bytes))
        }).expect("no rank panics");
        for g in got {
            let (b, bytes) = g.expect("broadcast succeeds");
            prop_assert_eq!(b, input(seed, root, len));
            prop_assert_eq!(bytes, vec![root as u8; root + len % 7]);
        }
    }
}

#[test]
fn all_ranks_get_bit_identical_results_with_rounding() {
    // Non-integer values: summation order differs from the reference, so compare with a
    // tolerance, and require every rank to agree bit for bit with rank 0.
    for algo in [1u8, 2, 3] {
        for n in [3usize, 5, 8] {
            let len = 10_007;
            let got = LocalCluster::run_with_config(n, config(algo, 1000), |c| {
                let mut b: Vec<f32> = (0..len)
                    .map(|i| ((i * 7 + c.rank() * 13) % 101) as f32 * 0.013 + 0.1)
                    .collect();
                c.all_reduce(&mut b, ReduceOp::Avg).map(|()| b)
            })
            .expect("no rank panics");
            let got: Vec<Vec<f32>> = got
                .into_iter()
                .map(|g| g.expect("all_reduce succeeds"))
                .collect();
            for i in 0..len {
                let want: f32 = (0..n)
                    .map(|r| ((i * 7 + r * 13) % 101) as f32 * 0.013 + 0.1)
                    .sum::<f32>()
                    / n as f32;
                assert!(
                    (got[0][i] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "i {i}"
                );
            }
            for g in &got[1..] {
                assert!(g
                    .iter()
                    .zip(&got[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

#[test]
fn barrier_and_tagged_point_to_point() {
    let n = 5;
    let got = LocalCluster::run(n, |c| {
        let (r, n) = (c.rank(), c.size());
        c.barrier()?;
        // Two tags sent in one order, received in the other: tags match, not arrival order.
        c.send((r + 1) % n, 7, &[r as f32; 3])?;
        c.send((r + 1) % n, 9, &[r as f32 + 0.5; 2])?;
        c.send_bytes((r + n - 1) % n, 1, &[r as u8; 4])?;
        let mut b9 = [0.0; 2];
        c.recv((r + n - 1) % n, 9, &mut b9)?;
        let mut b7 = [0.0; 3];
        c.recv((r + n - 1) % n, 7, &mut b7)?;
        let bytes = c.recv_bytes((r + 1) % n, 1)?;
        c.barrier()?;
        Ok::<_, meshrec_comm::CommError>((b7, b9, bytes))
    })
    .expect("no rank panics");
    for (r, g) in got.into_iter().enumerate() {
        let (b7, b9, bytes) = g.expect("p2p succeeds");
        let left = ((r + n - 1) % n) as f32;
        assert_eq!(b7, [left; 3]);
        assert_eq!(b9, [left + 0.5; 2]);
        assert_eq!(bytes, vec![((r + 1) % n) as u8; 4]);
    }
}
