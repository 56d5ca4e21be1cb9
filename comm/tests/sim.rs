//! The `sim` engine: real results from the wrapped engine, virtual clocks advanced by the
//! `cost` formulas, modelled bytes per link class.

use meshrec_comm::cost::{self, LinkClass, LinkKind, Topology};
use meshrec_comm::{Communicator, LocalCluster, ReduceOp, SimCommunicator};

fn topo() -> Topology {
    Topology {
        devices_per_node: 2,
        intra: LinkClass::new_us_gbps(1.0, 100.0),
        inter: LinkClass::new_us_gbps(10.0, 10.0),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
}

#[test]
fn collectives_wait_for_the_last_rank_and_charge_the_model() {
    let got = LocalCluster::run(4, |c| {
        let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
        // Rank 3 computes longest; the all-reduce starts when it arrives.
        s.clock().advance(0.001 * (s.rank() + 1) as f64);
        let mut b = vec![s.rank() as f32; 250_000];
        s.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
        (b[0], s.virtual_time_s(), s.clock().snapshot())
    })
    .expect("no rank panics");
    let t = cost::all_reduce_time(4, 1e6, &topo().inter); // 4 devices span 2 nodes
    for (r, (v, now, snap)) in got.into_iter().enumerate() {
        assert_eq!(v, 6.0, "real data moved");
        assert!(close(now, 0.004 + t), "rank {r}: {now} vs {}", 0.004 + t);
        assert!(close(snap.compute_s, 0.001 * (r + 1) as f64));
        // Ring successor of rank 1 is rank 2 on the other node; of rank 0 rank 1 on its own.
        let kind = if r % 2 == 1 {
            LinkKind::Inter
        } else {
            LinkKind::Intra
        };
        assert_eq!(
            snap.bytes_sent.get(&kind).copied(),
            Some(1_500_000),
            "rank {r}"
        );
    }
}

#[test]
fn point_to_point_arrives_after_latency_and_transfer() {
    let got = LocalCluster::run(4, |c| {
        let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
        match s.rank() {
            0 => {
                s.clock().advance(0.5);
                s.send(1, 0, &[1.0; 1000]).expect("send intra");
                s.send(2, 0, &[1.0; 1000]).expect("send inter");
            }
            1 | 2 => {
                let mut b = [0.0; 1000];
                s.recv(0, 0, &mut b).expect("recv");
                assert_eq!(b, [1.0; 1000]);
            }
            _ => {}
        }
        s.virtual_time_s()
    })
    .expect("no rank panics");
    let intra = cost::p2p_time(4000.0, &topo().intra);
    let inter = cost::p2p_time(4000.0, &topo().inter);
    assert!(close(got[0], 0.5 + intra + inter));
    assert!(close(got[1], 0.5 + intra));
    assert!(
        close(got[2], 0.5 + intra + inter),
        "second send leaves after the first"
    );
    assert_eq!(got[3], 0.0);
}

#[test]
fn non_blocking_all_reduce_overlaps_compute() {
    let got = LocalCluster::run(2, |c| {
        let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
        let q = s
            .iall_reduce(vec![1.0; 1000], ReduceOp::Sum)
            .expect("start");
        s.clock().advance(1.0); // long compute hides the communication
        let v = q.wait().expect("wait");
        let after_hidden = s.virtual_time_s();
        let q = s
            .iall_reduce(vec![1.0; 1000], ReduceOp::Sum)
            .expect("start");
        let v2 = q.wait().expect("wait");
        (v[0] + v2[0], after_hidden, s.virtual_time_s())
    })
    .expect("no rank panics");
    let t = cost::all_reduce_time(2, 4000.0, &topo().intra);
    for (sum, hidden, exposed) in got {
        assert_eq!(sum, 4.0);
        assert!(close(hidden, 1.0));
        assert!(close(exposed, 1.0 + t));
    }
}

#[test]
fn split_groups_share_the_rank_clock_and_know_their_link() {
    let got = LocalCluster::run(4, |c| {
        let s = SimCommunicator::new(Box::new(c), topo()).expect("valid topology");
        // Pairs on one node: {0,1} and {2,3}.
        let node = s
            .split_sim((s.rank() / 2) as u32, s.rank() as u32)
            .expect("split");
        let mut b = vec![1.0f32; 1000];
        node.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
        (
            node.devices().to_vec(),
            node.group_link(),
            s.virtual_time_s(),
            b[0],
        )
    })
    .expect("no rank panics");
    for (r, (devices, link, now, v)) in got.into_iter().enumerate() {
        assert_eq!(devices, if r < 2 { vec![0, 1] } else { vec![2, 3] });
        assert_eq!(link, topo().intra);
        assert!(close(now, cost::all_reduce_time(2, 4000.0, &topo().intra)));
        assert_eq!(v, 2.0);
    }
}

#[test]
fn bad_topology_is_rejected() {
    LocalCluster::run(1, |c| {
        let mut t = topo();
        t.devices_per_node = 0;
        assert!(SimCommunicator::new(Box::new(c), t).is_err());
    })
    .expect("no rank panics");
}
