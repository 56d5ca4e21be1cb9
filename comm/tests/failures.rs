//! Failure injection for the local engine: dead and silent ranks, mismatched lengths,
//! mismatched collectives, panicking ranks. Every case must end in an error, never a hang.

use std::time::{Duration, Instant};

use meshrec_comm::{
    ClusterError, CommError, Communicator, LocalCluster, LocalConfig, OpKind, ReduceOp,
};

fn short() -> LocalConfig {
    LocalConfig::with_timeout(Duration::from_millis(300))
}

#[test]
fn dead_rank_gives_peer_lost() {
    for len in [4usize, 100_000] {
        let got = LocalCluster::run_with_config(4, short(), |c| {
            if c.rank() == 2 {
                return Ok(()); // dies: drops its communicator without taking part
            }
            let mut b = vec![1.0f32; len];
            c.all_reduce(&mut b, ReduceOp::Sum)
        })
        .expect("no rank panics");
        for (r, g) in got.into_iter().enumerate() {
            if r == 2 {
                continue;
            }
            match g {
                Err(CommError::PeerLost {
                    rank: 2,
                    op: OpKind::AllReduce,
                }) => {}
                other => panic!("rank {r}, len {len}: expected PeerLost(2), got {other:?}"),
            }
        }
    }
}

#[test]
fn dead_sender_gives_peer_lost_on_recv() {
    let got = LocalCluster::run_with_config(2, short(), |c| {
        if c.rank() == 0 {
            return Ok(());
        }
        c.recv_bytes(0, 1).map(|_| ())
    })
    .expect("no rank panics");
    assert_eq!(
        got[1],
        Err(CommError::PeerLost {
            rank: 0,
            op: OpKind::Recv
        })
    );
}

#[test]
fn silent_rank_gives_timeout_for_everyone() {
    let t0 = Instant::now();
    let got = LocalCluster::run_with_config(4, short(), |c| {
        if c.rank() == 1 {
            // Alive (holds its communicator) but never calls.
            std::thread::sleep(Duration::from_millis(900));
            return Ok(());
        }
        let mut b = vec![1.0f32; 50_000];
        c.all_reduce(&mut b, ReduceOp::Sum)
    })
    .expect("no rank panics");
    // A rank waiting on a rank that waits on the silent one may time out at the same moment
    // and name its direct peer; the silent rank must be named by someone.
    let mut named_silent = false;
    for (r, g) in got.into_iter().enumerate() {
        if r == 1 {
            continue;
        }
        match g {
            Err(CommError::Timeout {
                rank,
                op: OpKind::AllReduce,
                ..
            }) => named_silent |= rank == 1,
            other => panic!("rank {r}: expected Timeout, got {other:?}"),
        }
    }
    assert!(named_silent, "some rank names the silent rank 1");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "errors came within the timeout scale"
    );
}

#[test]
fn silent_peer_times_out_a_recv_and_a_non_blocking_wait() {
    let got = LocalCluster::run_with_config(2, short(), |c| {
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_millis(700));
            return (Ok(()), Ok(()));
        }
        let mut x = [0.0f32; 2];
        let a = c.recv(0, 3, &mut x);
        let b = c
            .iall_reduce(vec![1.0; 8], ReduceOp::Sum)
            .and_then(|q| q.wait())
            .map(|_| ());
        (a, b)
    })
    .expect("no rank panics");
    let (a, b) = &got[1];
    assert!(
        matches!(
            a,
            Err(CommError::Timeout {
                rank: 0,
                op: OpKind::Recv,
                ..
            })
        ),
        "{a:?}"
    );
    assert!(
        matches!(
            b,
            Err(CommError::Timeout {
                rank: 0,
                op: OpKind::AllReduce,
                ..
            })
        ),
        "{b:?}"
    );
}

#[test]
fn mismatched_lengths_name_both_ranks_on_every_rank() {
    for len in [10usize, 100_000] {
        let got = LocalCluster::run_with_config(4, short(), |c| {
            let mine = if c.rank() == 2 { len + 3 } else { len };
            let mut b = vec![1.0f32; mine];
            let ar = c.all_reduce(&mut b, ReduceOp::Sum);
            let mut out = vec![0.0f32; 4 * mine];
            let ag = c.all_gather(&b, &mut out);
            // The group is still usable afterwards.
            let mut ok = [1.0f32];
            let after = c.all_reduce(&mut ok, ReduceOp::Sum).map(|()| ok[0]);
            (ar, ag, after)
        })
        .expect("no rank panics");
        for (r, (ar, ag, after)) in got.into_iter().enumerate() {
            match ar {
                Err(CommError::SizeMismatch {
                    op: OpKind::AllReduce,
                    rank,
                    len: l1,
                    peer,
                    peer_len,
                }) => {
                    assert!(
                        rank == 2 || peer == 2,
                        "rank {r}: names rank 2: {rank} {peer}"
                    );
                    assert_ne!(rank, peer);
                    assert_ne!(l1, peer_len);
                    assert!([len, len + 3].contains(&l1) && [len, len + 3].contains(&peer_len));
                }
                other => panic!("rank {r}: expected SizeMismatch, got {other:?}"),
            }
            assert_eq!(
                ag,
                Err(CommError::SizeMismatch {
                    op: OpKind::AllGather,
                    rank: 0,
                    len,
                    peer: 2,
                    peer_len: len + 3
                })
            );
            assert_eq!(after, Ok(4.0));
        }
    }
}

#[test]
fn mismatched_recv_length_names_both_ranks() {
    let got = LocalCluster::run_with_config(2, short(), |c| {
        if c.rank() == 0 {
            c.send(1, 0, &[1.0; 5])
        } else {
            let mut b = [0.0; 4];
            c.recv(0, 0, &mut b)
        }
    })
    .expect("no rank panics");
    assert_eq!(
        got[1],
        Err(CommError::SizeMismatch {
            op: OpKind::Recv,
            rank: 1,
            len: 4,
            peer: 0,
            peer_len: 5
        })
    );
}

#[test]
fn different_collectives_are_reported() {
    let got = LocalCluster::run_with_config(3, short(), |c| {
        if c.rank() == 1 {
            c.barrier()
        } else {
            let mut b = [1.0f32; 3];
            c.all_reduce(&mut b, ReduceOp::Sum)
        }
    })
    .expect("no rank panics");
    assert!(
        got.iter()
            .any(|g| matches!(g, Err(CommError::CollectiveMismatch { .. }))),
        "{got:?}"
    );
    assert!(got.iter().all(Result::is_err), "{got:?}");
}

#[test]
fn panicking_rank_poisons_the_group() {
    let t0 = Instant::now();
    let seen = std::sync::Mutex::new(Vec::new());
    // A long timeout: the others must be woken by the poison, not time out.
    let cfg = LocalConfig::with_timeout(Duration::from_secs(30));
    let r = LocalCluster::run_with_config(4, cfg, |c| {
        let sub = c.split((c.rank() % 2) as u32, 0).expect("split");
        if c.rank() == 3 {
            std::thread::sleep(Duration::from_millis(50));
            panic!("injected failure on rank 3");
        }
        // Rank 1 waits in a subgroup with rank 3; ranks 0 and 2 in the world group.
        let e = if c.rank() == 1 {
            let mut b = [1.0f32; 8];
            sub.all_reduce(&mut b, ReduceOp::Sum)
        } else {
            c.barrier().and_then(|()| c.barrier())
        };
        seen.lock().expect("lock").push((c.rank(), e));
    });
    match r {
        Err(ClusterError::RankPanicked { rank: 3, message }) => {
            assert!(message.contains("injected failure"), "{message}")
        }
        other => panic!("expected RankPanicked(3), got {other:?}"),
    }
    let seen = seen.into_inner().expect("lock");
    assert_eq!(seen.len(), 3);
    for (rank, e) in seen {
        assert!(
            matches!(e, Err(CommError::Poisoned { world_rank: 3, .. })),
            "rank {rank}: expected Poisoned by 3, got {e:?}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let got = LocalCluster::run_with_config(2, short(), |c| {
        let a = c.broadcast(&mut [0.0], 5);
        let b = c.send(9, 0, &[1.0]);
        let mut out = [0.0f32; 3];
        let d = c.reduce_scatter(&[1.0; 4], &mut out, ReduceOp::Sum);
        (a, b, d)
    })
    .expect("no rank panics");
    for (a, b, d) in got {
        assert_eq!(
            a,
            Err(CommError::InvalidRank {
                what: "root",
                rank: 5,
                size: 2
            })
        );
        assert_eq!(
            b,
            Err(CommError::InvalidRank {
                what: "destination",
                rank: 9,
                size: 2
            })
        );
        assert!(
            matches!(
                d,
                Err(CommError::BadLength {
                    op: OpKind::ReduceScatter,
                    ..
                })
            ),
            "{d:?}"
        );
    }
    assert!(LocalCluster::new(0).is_err());
}
