//! The layout-equivalence check across processes: under `mpirun -np 4` every rank runs its
//! part of a tp 2 × pp 2 step (1F1B, 4 micro-batches) on the MPI engine, computes the
//! one-device reference itself, and compares its own slices of the loss, the gradients and
//! the AdamW update. Exits non-zero on any rank's failure.
//!
//! cargo build --release -p meshrec-parallel --features mpi --example mpi_equivalence
//! mpirun --allow-run-as-root --oversubscribe -np 4 target/release/examples/mpi_equivalence

use std::process::ExitCode;

use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
use meshrec_comm::Communicator;
use meshrec_model::device::test_device;
use meshrec_parallel::check::{
    layout_step, rank_deviation, rank_slices, reference_step, tiny_case, StepSettings,
};
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::Mesh;
use meshrec_parallel::rank::initial_state;
use meshrec_pipeline::schedule::{Schedule, ScheduleKind};

const TOLERANCE: f32 = 1e-4;

fn run() -> Result<String, String> {
    let runtime = MpiRuntime::init().map_err(|e| format!("MPI init: {e}"))?;
    let world = runtime.world(MpiConfig::default());
    let (rank, size) = (world.rank(), world.size());
    let (dp, tp, pp) = match size {
        4 => (1, 2, 2),
        // Data parallelism across processes: the DP reduction thread beside the main one.
        2 => (2, 1, 1),
        n => {
            return Err(format!(
                "run with -np 4 (tp 2 × pp 2) or -np 2 (dp 2), not {n}"
            ))
        }
    };
    let (config, genres, batch) = tiny_case();
    let device = test_device();
    let (_, initial) = initial_state(&config, &genres, 3, &device);
    let want = reference_step(
        &config,
        &genres,
        &initial,
        &batch,
        StepSettings::default(),
        &device,
    )
    .map_err(|e| e.to_string())?;
    let mesh = Mesh::new(dp, tp, pp).map_err(|e| e.to_string())?;
    let layout = Layout::uniform(mesh, 1, config.n_layers).map_err(|e| e.to_string())?;
    let schedule = Schedule::new(ScheduleKind::OneFOneB, pp, 4, 1).map_err(|e| e.to_string())?;
    let mut settings = StepSettings::default();
    settings.dp.threaded = runtime.concurrent_threads();
    let got = layout_step(
        Box::new(world),
        &config,
        &genres,
        &layout,
        &schedule,
        &batch,
        &initial,
        settings,
        &device,
    )
    .map_err(|e| format!("rank {rank}: {e}"))?;
    let loss = got.loss.loss_sum / got.loss.targets as f64;
    if ((loss - want.loss) / want.loss).abs() >= f64::from(TOLERANCE) {
        return Err(format!(
            "rank {rank}: loss {loss} vs one device {}",
            want.loss
        ));
    }
    let mut report = format!(
        "rank {rank} ({:?}): loss {loss:.6} (one device {:.6})",
        got.grads.coord, want.loss
    );
    for (what, full, mine) in [
        ("gradient", &want.grads, &got.grads),
        ("update", &want.updated, &got.updated),
    ] {
        let expected = rank_slices(full, mine, &layout).map_err(|e| e.to_string())?;
        let (path, err) = rank_deviation(&expected, mine, 1e-6).map_err(|e| e.to_string())?;
        if err >= TOLERANCE {
            return Err(format!("rank {rank}: {what} of `{path}` off by {err:e}"));
        }
        report += &format!(", worst {what} error {err:.1e}");
    }
    Ok(report)
}

fn main() -> ExitCode {
    match run() {
        Ok(report) => {
            println!("{report}: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mpi_equivalence: {e}");
            ExitCode::FAILURE
        }
    }
}
