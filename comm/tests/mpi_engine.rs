//! The MPI engine under `mpirun` (feature `mpi`): this test binary launches itself on 2
//! ranks. Here, the mismatch that the amortised size check cannot report — one rank passes a
//! new length where the others pass one checked already — must end the job through the
//! watchdog within about the timeout, naming the operation, never hang it.
#![cfg(feature = "mpi")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
use meshrec_comm::{Communicator, ReduceOp};

const CHILD: &str = "MESHREC_COMM_TEST_MPI_CHILD";

/// The rank side; does nothing unless launched by [`stale_shape_aborts_through_the_watchdog`].
#[test]
fn stale_shape_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let rt = MpiRuntime::init().expect("MPI initialises");
    let world = rt.world(MpiConfig {
        timeout: Duration::from_secs(1),
        ..MpiConfig::default()
    });
    let mut b = vec![1.0f32; 100];
    world
        .all_reduce(&mut b, ReduceOp::Sum)
        .expect("a consistent call");
    assert_eq!(world.checked_shapes(), 1);
    // Rank 1's shape is new (it checks), rank 0's is cached (it skips): the watchdog ends it.
    let mut b = vec![1.0f32; if world.rank() == 1 { 101 } else { 100 }];
    let r = world.all_reduce(&mut b, ReduceOp::Sum);
    println!("rank {} returned {r:?}", world.rank());
    std::process::exit(3);
}

#[test]
fn stale_shape_aborts_through_the_watchdog() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let t0 = Instant::now();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(&exe)
        .args([
            "--exact",
            "stale_shape_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdin(Stdio::null())
        .output()
        .expect("mpirun runs (feature `mpi` needs Open MPI installed)");
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the job must fail: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("MPI all_reduce on world rank") && stderr.contains("exceeded its timeout"),
        "the watchdog names the operation: {stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("returned"),
        "no rank returns from the mismatched call: {stdout}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "ended after {elapsed:?}, not about the 1 s timeout"
    );
}
