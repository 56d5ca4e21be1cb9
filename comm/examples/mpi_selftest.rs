//! MPI engine self-test: the collective checks of the local engine's tests, run on every rank
//! under `mpirun` against a naive reference (plus typed i64 / f16 / bf16 reductions, split,
//! non-blocking overlap, SizeMismatch and the other shape checks, and Timeout). Prints a summary on rank 0; exits non-zero on any failure on any rank.
//!
//! cargo build --release -p meshrec-comm --features mpi --example mpi_selftest
//! mpirun --allow-run-as-root --oversubscribe -np 3 target/release/examples/mpi_selftest
//!
//! `mpi_selftest stale-shape` instead makes rank 1 pass a new length where the others pass
//! one that was checked already: the mismatch the amortised size check cannot report, which
//! must end the job through the watchdog (about one second here), not hang it.

use std::time::Duration;

use half::{bf16, f16};
use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
use meshrec_comm::{
    all_reduce_as, chunk_range, reduce_scatter_as, CommError, Communicator, DType, Element, OpKind,
    ReduceOp,
};

fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7919 + i * 104_729) % 201) as f32 - 100.0
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

fn reference(ranks: &[usize], len: usize, op: ReduceOp) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let xs = ranks.iter().map(|&r| value(r, i));
            match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Avg => xs.sum::<f32>() / ranks.len() as f32,
                ReduceOp::Max => xs.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Min => xs.fold(f32::INFINITY, f32::min),
            }
        })
        .collect()
}

/// Beyond 2^24 (where f32 stops counting exactly), both signs.
fn int_value(rank: usize, i: usize) -> i64 {
    let v = (1i64 << 40) * (rank as i64 + 1) + (i as i64) * 1_000_003 + 1;
    if (rank + i).is_multiple_of(3) {
        -v
    } else {
        v
    }
}

fn int_reference(ranks: &[usize], len: usize, op: ReduceOp) -> Vec<i64> {
    (0..len)
        .map(|i| {
            let xs = ranks.iter().map(|&r| int_value(r, i));
            match op {
                ReduceOp::Max => xs.max().unwrap_or(0),
                ReduceOp::Min => xs.min().unwrap_or(0),
                _ => xs.sum(),
            }
        })
        .collect()
}

/// Integers in [-50, 50]: every partial sum over up to 5 ranks is exact in f16 and bf16, so
/// the half reductions must match an f32 reference rounded once (the mean's division).
fn small_value(rank: usize, i: usize) -> f32 {
    ((rank * 7919 + i * 104_729) % 101) as f32 - 50.0
}

fn half_reference<T: Element>(
    from: fn(f32) -> T,
    ranks: &[usize],
    len: usize,
    op: ReduceOp,
) -> Vec<T> {
    (0..len)
        .map(|i| {
            let xs = ranks.iter().map(|&r| small_value(r, i));
            from(match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Avg => xs.sum::<f32>() / ranks.len() as f32,
                ReduceOp::Max => xs.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Min => xs.fold(f32::INFINITY, f32::min),
            })
        })
        .collect()
}

/// All-reduce and reduce-scatter of a half type against [`half_reference`], every op.
fn check_half<T: Element + PartialEq + std::fmt::Debug>(
    c: &dyn Communicator,
    from: fn(f32) -> T,
    lens: &[usize],
    ck: &mut Checks,
) -> Result<(), CommError> {
    let (r, n) = (c.rank(), c.size());
    let all: Vec<usize> = (0..n).collect();
    for &len in lens {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let input: Vec<T> = (0..len).map(|i| from(small_value(r, i))).collect();
            let want = half_reference(from, &all, len, op);
            let mut b = input.clone();
            all_reduce_as(c, &mut b, op)?;
            ck.check(
                &format!("all_reduce {} {op:?} len {len}", T::DTYPE),
                eq(&b, &want),
            );
            let mut out = vec![from(0.0); chunk_range(len, n, r).len()];
            reduce_scatter_as(c, &input, &mut out, op)?;
            ck.check(
                &format!("reduce_scatter {} {op:?} len {len}", T::DTYPE),
                eq(&out[..], &want[chunk_range(len, n, r)]),
            );
        }
    }
    Ok(())
}

struct Checks {
    rank: usize,
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Ok(()) => self.passed += 1,
            Err(e) => {
                println!("[rank {}] FAIL {name}: {e}", self.rank);
                self.failed.push(name.to_owned());
            }
        }
    }
}

fn eq<T: PartialEq + std::fmt::Debug>(got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("got {got:?}, want {want:?}"))
    }
}

fn run(c: &dyn Communicator, short: &dyn Communicator, ck: &mut Checks) -> Result<(), CommError> {
    let (r, n) = (c.rank(), c.size());
    let all: Vec<usize> = (0..n).collect();
    let lens = [0usize, 1, n.saturating_sub(1), 3 * n + 1, 1000, 100_003];
    for &len in &lens {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let mut b = input(r, len);
            c.all_reduce(&mut b, op)?;
            ck.check(
                &format!("all_reduce {op:?} len {len}"),
                eq(b, reference(&all, len, op)),
            );
            let mut out = vec![0.0; chunk_range(len, n, r).len()];
            c.reduce_scatter(&input(r, len), &mut out, op)?;
            ck.check(
                &format!("reduce_scatter {op:?} len {len}"),
                eq(
                    out,
                    reference(&all, len, op)[chunk_range(len, n, r)].to_vec(),
                ),
            );
        }
        let mut out = vec![f32::NAN; n * len];
        c.all_gather(&input(r, len), &mut out)?;
        let want: Vec<f32> = (0..n).flat_map(|q| input(q, len)).collect();
        ck.check(&format!("all_gather len {len}"), eq(out, want));
        let root = len % n;
        let mut b = input(r, len);
        c.broadcast(&mut b, root)?;
        ck.check(&format!("broadcast len {len}"), eq(b, input(root, len)));
    }
    // Typed reductions: i64 exact beyond 2^24, halves through the user-defined MPI ops.
    for &len in &lens {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let mut b: Vec<i64> = (0..len).map(|i| int_value(r, i)).collect();
            all_reduce_as(c, &mut b, op)?;
            ck.check(
                &format!("all_reduce i64 {op:?} len {len}"),
                eq(b, int_reference(&all, len, op)),
            );
            let input: Vec<i64> = (0..len).map(|i| int_value(r, i)).collect();
            let mut out = vec![0i64; chunk_range(len, n, r).len()];
            reduce_scatter_as(c, &input, &mut out, op)?;
            ck.check(
                &format!("reduce_scatter i64 {op:?} len {len}"),
                eq(
                    out,
                    int_reference(&all, len, op)[chunk_range(len, n, r)].to_vec(),
                ),
            );
        }
    }
    check_half(c, f16::from_f32, &lens, ck)?;
    check_half(c, bf16::from_f32, &lens, ck)?;
    let refused = |e: Result<(), CommError>, needle: &str| match e {
        Err(CommError::InvalidArgument(m)) if m.contains(needle) => Ok(()),
        other => Err(format!("{other:?}")),
    };
    ck.check(
        "i64 Avg refused",
        refused(all_reduce_as(c, &mut [1i64, 2], ReduceOp::Avg), "Avg"),
    );
    ck.check(
        "ragged bytes refused",
        refused(
            c.all_reduce_bytes(&mut [0u8; 7], DType::I64, ReduceOp::Sum),
            "7 bytes",
        ),
    );

    // Ragged payloads.
    let payload = |q: usize| -> Vec<u8> { (0..q * 13 + 1).map(|i| (i * (q + 1)) as u8).collect() };
    let got = c.all_gatherv_bytes(&payload(r))?;
    ck.check(
        "all_gatherv_bytes",
        eq(got, (0..n).map(payload).collect::<Vec<_>>()),
    );
    let got = c.all_gatherv(&input(r, r * 3))?;
    ck.check(
        "all_gatherv f32",
        eq(got, (0..n).map(|q| input(q, q * 3)).collect::<Vec<_>>()),
    );
    let mut bytes = vec![r as u8; r + 2];
    c.broadcast_bytes(&mut bytes, n - 1)?;
    ck.check("broadcast_bytes", eq(bytes, vec![(n - 1) as u8; n + 1]));
    c.barrier()?;

    // Tagged point-to-point around a ring, two tags received in the other order.
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    c.send(right, 7, &[r as f32; 3])?;
    c.send(right, 9, &[r as f32 + 0.5; 2])?;
    c.send_bytes(left, 1, &[r as u8; 4])?;
    let mut b9 = [0.0; 2];
    c.recv(left, 9, &mut b9)?;
    let mut b7 = [0.0; 3];
    c.recv(left, 7, &mut b7)?;
    let bb = c.recv_bytes(right, 1)?;
    ck.check(
        "p2p tags",
        eq(
            (b7, b9, bb),
            (
                [left as f32; 3],
                [left as f32 + 0.5; 2],
                vec![right as u8; 4],
            ),
        ),
    );

    // Split: colors by parity, key reverses the order.
    let sub = c.split((r % 2) as u32, (1000 - r) as u32)?;
    let members: Vec<usize> = (0..n).filter(|q| q % 2 == r % 2).collect();
    let pos = members
        .iter()
        .rev()
        .position(|&q| q == r)
        .unwrap_or(usize::MAX);
    ck.check(
        "split rank/size",
        eq((sub.rank(), sub.size()), (pos, members.len())),
    );
    let mut b = input(r, 777);
    sub.all_reduce(&mut b, ReduceOp::Sum)?;
    ck.check(
        "split all_reduce",
        eq(b, reference(&members, 777, ReduceOp::Sum)),
    );

    // Two outstanding non-blocking all-reduces, a blocking one and p2p in between.
    let big = c.iall_reduce(input(r, 200_000), ReduceOp::Sum)?;
    let mut small = c.iall_reduce(input(r, 5), ReduceOp::Max)?;
    let rx = c.irecv(left, 3, 4)?;
    let tx = c.isend(right, 3, vec![r as f32; 4])?;
    let mut mid = input(r, 64);
    c.all_reduce(&mut mid, ReduceOp::Sum)?;
    while !small.test() {
        std::thread::yield_now();
    }
    let s = small.wait()?;
    let bg = big.wait()?;
    tx.wait()?;
    let got = rx.wait()?;
    ck.check(
        "iall_reduce big",
        eq(bg, reference(&all, 200_000, ReduceOp::Sum)),
    );
    ck.check(
        "iall_reduce small",
        eq(s, reference(&all, 5, ReduceOp::Max)),
    );
    ck.check(
        "blocking between",
        eq(mid, reference(&all, 64, ReduceOp::Sum)),
    );
    ck.check("isend/irecv", eq(got, vec![left as f32; 4]));

    // Mismatched lengths: every rank reports rank 0 against rank 1. Shapes are checked once
    // each, so the mismatch must be on a shape no rank has used yet (the engine catches a
    // disagreement on a call whose shape is new to every rank; see `ShapeChecks`).
    if n > 1 {
        let len = if r == 1 { 12_346 } else { 12_345 };
        let mut b = vec![1.0f32; len];
        let e = c.all_reduce(&mut b, ReduceOp::Sum);
        ck.check(
            "SizeMismatch names both ranks",
            eq(
                e,
                Err(CommError::SizeMismatch {
                    op: OpKind::AllReduce,
                    rank: 0,
                    len: 12_345,
                    peer: 1,
                    peer_len: 12_346,
                }),
            ),
        );
        // A shape that passed its check is not checked again, and still reduces right.
        for _ in 0..3 {
            let mut b = input(r, 12_345);
            c.all_reduce(&mut b, ReduceOp::Sum)?;
            ck.check(
                "repeated shape reduces",
                eq(b, reference(&all, 12_345, ReduceOp::Sum)),
            );
        }
        // Another reduction, element type, collective or root on a new shape is caught too.
        let mut b = vec![1.0f32; 12_347];
        let e = c.all_reduce(&mut b, if r == 1 { ReduceOp::Max } else { ReduceOp::Sum });
        ck.check(
            "different reductions refused",
            match e {
                Err(CommError::InvalidArgument(m)) if m.contains("Sum") && m.contains("Max") => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            },
        );
        let e = if r == 1 {
            all_reduce_as(c, &mut [1i64; 12_348], ReduceOp::Sum)
        } else {
            all_reduce_as(c, &mut [1.0f32; 12_348], ReduceOp::Sum)
        };
        ck.check(
            "different element types refused",
            match e {
                Err(CommError::InvalidArgument(m)) if m.contains("f32") && m.contains("i64") => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            },
        );
        let mut b = vec![1.0f32; 12_349];
        let e = if r == 1 {
            c.broadcast(&mut b, 0)
        } else {
            c.all_reduce(&mut b, ReduceOp::Sum)
        };
        ck.check(
            "different collectives refused",
            eq(
                e,
                Err(CommError::CollectiveMismatch {
                    rank: 0,
                    op: OpKind::AllReduce,
                    peer: 1,
                    peer_op: OpKind::Broadcast,
                }),
            ),
        );
        let e = c.broadcast(&mut b, if r == 1 { 1 } else { 0 });
        ck.check(
            "different roots refused",
            match e {
                Err(CommError::InvalidArgument(m)) if m.contains("root") => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        // Nothing reached the data communicator: it still works.
        let mut b = input(r, 12_350);
        c.all_reduce(&mut b, ReduceOp::Avg)?;
        ck.check(
            "usable after refusals",
            eq(b, reference(&all, 12_350, ReduceOp::Avg)),
        );
        // Mismatched receive length.
        if r == 0 {
            c.send(1, 11, &[1.0; 5])?;
        } else if r == 1 {
            let mut b = [0.0; 4];
            let e = c.recv(0, 11, &mut b);
            ck.check(
                "recv SizeMismatch",
                eq(
                    e,
                    Err(CommError::SizeMismatch {
                        op: OpKind::Recv,
                        rank: 1,
                        len: 4,
                        peer: 0,
                        peer_len: 5,
                    }),
                ),
            );
        }
        // A receive nobody answers times out (short-timeout communicator).
        if r == 0 {
            let e = short.recv_bytes(1, 12345);
            ck.check(
                "recv Timeout",
                match e {
                    Err(CommError::Timeout {
                        rank: 1,
                        op: OpKind::Recv,
                        ..
                    }) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
            );
        }
    }
    c.barrier()?;

    // Statistics are kept (modelled bytes for MPI).
    let st = c.stats();
    ck.check(
        "stats",
        if st.bytes_modelled && st.get(OpKind::AllReduce).count > 10 {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        },
    );
    Ok(())
}

/// The mismatch a cached shape hides (see the module docs): the job must abort.
fn stale_shape(rt: &std::sync::Arc<MpiRuntime>) -> ! {
    let world = rt.world(MpiConfig {
        timeout: Duration::from_secs(1),
        ..MpiConfig::default()
    });
    let mut b = vec![1.0f32; 100];
    world
        .all_reduce(&mut b, ReduceOp::Sum)
        .expect("a checked shape");
    let mut b = vec![1.0f32; if world.rank() == 1 { 101 } else { 100 }];
    let r = world.all_reduce(&mut b, ReduceOp::Sum);
    println!(
        "[rank {}] stale-shape: the mismatched call returned {r:?}",
        world.rank()
    );
    std::process::exit(3);
}

fn main() {
    let rt = match MpiRuntime::init() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mpi_selftest: {e}");
            std::process::exit(2);
        }
    };
    if std::env::args().nth(1).as_deref() == Some("stale-shape") {
        stale_shape(&rt);
    }
    let world = rt.world(MpiConfig::default());
    let short = rt.world(MpiConfig {
        timeout: Duration::from_millis(300),
        ..MpiConfig::default()
    });
    let mut ck = Checks {
        rank: world.rank(),
        passed: 0,
        failed: Vec::new(),
    };
    if let Err(e) = run(&world, &short, &mut ck) {
        println!("[rank {}] FAIL aborted: {e}", world.rank());
        ck.failed.push(format!("aborted: {e}"));
    }
    // Checked shapes are remembered, once each, alike on every rank.
    let mut shapes = [world.checked_shapes() as f32; 2];
    let before = world.checked_shapes();
    let mut b = vec![1.0f32; 12_345];
    let repeat = world.all_reduce(&mut b, ReduceOp::Sum);
    let mut b = vec![1.0f32; 54_321];
    let fresh = world.all_reduce(&mut b, ReduceOp::Sum);
    ck.check(
        "shape cache",
        eq(
            (repeat, fresh, world.checked_shapes()),
            (Ok(()), Ok(()), before + 1),
        ),
    );
    shapes[1] = -shapes[1];
    let agreed = world.all_reduce(&mut shapes, ReduceOp::Max);
    ck.check(
        "same shapes on every rank",
        eq(agreed.map(|()| shapes[0] == -shapes[1]), Ok(true)),
    );
    let mut fails = [ck.failed.len() as f32];
    let agreed = world.all_reduce(&mut fails, ReduceOp::Sum);
    let total_failed = if agreed.is_ok() {
        fails[0] as usize
    } else {
        ck.failed.len().max(1)
    };
    if world.rank() == 0 {
        println!(
            "mpi_selftest: {} ranks, {} checks per rank passed on rank 0, {} failed over all ranks ({})",
            world.size(),
            ck.passed,
            total_failed,
            rt.library_version().lines().next().unwrap_or("")
        );
        println!(
            "{}",
            if total_failed == 0 {
                "MPI SELFTEST PASSED"
            } else {
                "MPI SELFTEST FAILED"
            }
        );
    }
    drop(short);
    drop(world);
    drop(rt);
    std::process::exit(if total_failed == 0 { 0 } else { 1 });
}
