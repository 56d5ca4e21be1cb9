//! Sub-communicators, non-blocking overlap, bucketing and statistics of the local engine.

use meshrec_comm::bucket::all_reduce_bucketed;
use meshrec_comm::{Communicator, GradBucketer, LocalCluster, OpKind, ReduceOp};
use proptest::prelude::*;

#[test]
fn split_makes_ordered_subgroups_that_work() {
    let n = 7;
    let got = LocalCluster::run(n, |c| {
        let r = c.rank();
        // Three colors; key reverses the order inside each color.
        let sub = c.split((r % 3) as u32, (100 - r) as u32)?;
        let mut b = vec![r as f32; 5];
        sub.all_reduce(&mut b, ReduceOp::Sum)?;
        // A split of a split, and the parent still works afterwards.
        let subsub = sub.split(0, sub.rank() as u32)?;
        let mut one = [1.0f32];
        subsub.all_reduce(&mut one, ReduceOp::Sum)?;
        let mut w = [r as f32];
        c.all_reduce(&mut w, ReduceOp::Max)?;
        Ok::<_, meshrec_comm::CommError>((sub.rank(), sub.size(), b[0], one[0], w[0]))
    })
    .expect("no rank panics");
    for (r, g) in got.into_iter().enumerate() {
        let (sr, ss, sum, one, max) = g.expect("split group works");
        let members: Vec<usize> = (0..n).filter(|q| q % 3 == r % 3).collect();
        assert_eq!(ss, members.len());
        // Ordered by key = 100 - rank: highest rank first.
        let pos = members.iter().rev().position(|&q| q == r).expect("member");
        assert_eq!(sr, pos);
        assert_eq!(sum, members.iter().sum::<usize>() as f32);
        assert_eq!(one, members.len() as f32);
        assert_eq!(max, (n - 1) as f32);
    }
}

#[test]
fn split_groups_run_concurrently_like_a_mesh() {
    // 2 x 3 mesh: TP groups of 3 (rows), DP groups of 2 (columns), used interleaved.
    let got = LocalCluster::run(6, |c| {
        let r = c.rank();
        let tp = c.split((r / 3) as u32, r as u32)?;
        let dp = c.split((r % 3) as u32, r as u32)?;
        let mut t = vec![r as f32; 20_000];
        let pending = dp.iall_reduce(vec![r as f32; 9], ReduceOp::Sum)?;
        tp.all_reduce(&mut t, ReduceOp::Sum)?;
        let d = pending.wait()?;
        Ok::<_, meshrec_comm::CommError>((t[0], d[0]))
    })
    .expect("no rank panics");
    for (r, g) in got.into_iter().enumerate() {
        let (t, d) = g.expect("mesh works");
        let row = r / 3;
        assert_eq!(t, (3 * row * 3 + 3) as f32); // (3row)+(3row+1)+(3row+2)
        assert_eq!(d, (r % 3 + r % 3 + 3) as f32);
    }
}

#[test]
fn two_outstanding_non_blocking_ops_complete_correctly() {
    for n in [1usize, 2, 3, 4] {
        let got = LocalCluster::run(n, |c| {
            let r = c.rank() as f32;
            let big = c.iall_reduce(vec![r; 50_000], ReduceOp::Sum)?;
            let mut small = c.iall_reduce(vec![r + 1.0; 3], ReduceOp::Max)?;
            // A blocking collective while both are in flight.
            let mut b = [1.0f32; 4];
            c.all_reduce(&mut b, ReduceOp::Sum)?;
            // Non-blocking p2p overlapping too.
            let rx = c.irecv((c.rank() + n - 1) % n, 3, 2)?;
            let tx = c.isend((c.rank() + 1) % n, 3, vec![r, r])?;
            while !small.test() {
                std::thread::yield_now();
            }
            let s = small.wait()?;
            let bg = big.wait()?;
            tx.wait()?;
            let got = rx.wait()?;
            Ok::<_, meshrec_comm::CommError>((bg, s, b, got))
        })
        .expect("no rank panics");
        let total: f32 = (0..n).map(|r| r as f32).sum();
        for (r, g) in got.into_iter().enumerate() {
            let (bg, s, b, p2p) = g.expect("non-blocking ops succeed");
            assert!(bg.len() == 50_000 && bg.iter().all(|&x| x == total));
            assert_eq!(s, vec![n as f32; 3]);
            assert_eq!(b, [n as f32; 4]);
            assert_eq!(p2p, vec![((r + n - 1) % n) as f32; 2]);
        }
    }
}

#[test]
fn irecvs_on_one_tag_match_in_posting_order() {
    let got = LocalCluster::run(2, |c| {
        if c.rank() == 0 {
            for k in 0..4 {
                c.send(1, 5, &[k as f32])?;
            }
            Ok(vec![])
        } else {
            let reqs: Vec<_> = (0..4).map(|_| c.irecv(0, 5, 1)).collect::<Result<_, _>>()?;
            // Wait in reverse: matching follows posting order regardless.
            let mut out: Vec<f32> = reqs
                .into_iter()
                .rev()
                .map(|q| q.wait().map(|v| v[0]))
                .collect::<Result<_, _>>()?;
            out.reverse();
            Ok::<_, meshrec_comm::CommError>(out)
        }
    })
    .expect("no rank panics");
    assert_eq!(
        got[1].as_ref().expect("irecv succeeds"),
        &vec![0.0, 1.0, 2.0, 3.0]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn bucketing_round_trips(
        n in 1usize..=5,
        sizes in proptest::collection::vec(0usize..700, 1..30),
        bucket_bytes in 4usize..4096,
    ) {
        let got = LocalCluster::run(n, |c| {
            let mut grads: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(t, &s)| (0..s).map(|i| (c.rank() * 1000 + t * 10 + i % 10) as f32).collect())
                .collect();
            // Handle-per-bucket API: every bucket launched once full, ids come back.
            let mut b = GradBucketer::new(bucket_bytes, ReduceOp::Sum)?;
            let mut handles = Vec::new();
            for (t, g) in grads.iter().enumerate() {
                handles.extend(b.push(&c, t, g)?);
            }
            handles.extend(b.flush(&c)?);
            let mut seen = vec![None; sizes.len()];
            for (k, h) in handles.into_iter().enumerate() {
                assert_eq!(h.index(), k);
                let red = h.wait()?;
                for (id, v) in red.iter() {
                    seen[id] = Some(v.to_vec());
                }
            }
            // The convenience wrapper gives the same.
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            all_reduce_bucketed(&c, &mut views, bucket_bytes, ReduceOp::Sum)?;
            Ok::<_, meshrec_comm::CommError>((seen, grads))
        })
        .expect("no rank panics");
        let rank_sum: usize = (0..n).sum();
        for g in got {
            let (seen, grads) = g.expect("bucketing succeeds");
            for (t, &s) in sizes.iter().enumerate() {
                let want: Vec<f32> =
                    (0..s).map(|i| (rank_sum * 1000 + n * (t * 10 + i % 10)) as f32).collect();
                prop_assert_eq!(seen[t].as_ref().expect("every tensor in a bucket"), &want);
                prop_assert_eq!(&grads[t], &want);
            }
        }
    }
}

#[test]
fn buckets_launch_as_soon_as_full() {
    LocalCluster::run(2, |c| {
        let mut b = GradBucketer::new(40, ReduceOp::Sum).expect("valid size");
        assert!(b.push(&c, 0, &[1.0; 4]).expect("push").is_none());
        let h = b
            .push(&c, 1, &[1.0; 6])
            .expect("push")
            .expect("10 floats fill a 40-byte bucket");
        assert_eq!(h.ids().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(b.pending_elems(), 0);
        let red = h.wait().expect("bucket reduces");
        assert_eq!(red.get(1), Some(&[2.0f32; 6][..]));
        assert!(b.flush(&c).expect("flush").is_none());
    })
    .expect("no rank panics");
}

#[test]
fn stats_count_ops_and_bytes() {
    let got = LocalCluster::run(4, |c| {
        let mut b = vec![1.0f32; 100_000];
        c.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
        c.all_reduce(&mut b[..10], ReduceOp::Sum)
            .expect("all_reduce");
        c.barrier().expect("barrier");
        if c.rank() == 0 {
            c.send(1, 0, &[0.0; 8]).expect("send");
        } else if c.rank() == 1 {
            let mut x = [0.0; 8];
            c.recv(0, 0, &mut x).expect("recv");
        }
        c.stats()
    })
    .expect("no rank panics");
    for (r, s) in got.iter().enumerate() {
        let ar = s.get(OpKind::AllReduce);
        assert_eq!(ar.count, 2);
        // Ring on 400 kB: 2(n-1)/n * S = 600 kB; recursive doubling on 40 B: 2 * 40 B.
        assert_eq!(ar.bytes_sent, 600_000 + 80);
        assert_eq!(ar.bytes_received, 600_000 + 80);
        assert!(ar.time_s > 0.0);
        assert_eq!(s.get(OpKind::Barrier).count, 1);
        assert_eq!(s.get(OpKind::Send).bytes_sent, if r == 0 { 32 } else { 0 });
        assert_eq!(
            s.get(OpKind::Recv).bytes_received,
            if r == 1 { 32 } else { 0 }
        );
        assert!(!s.bytes_modelled);
    }
}
