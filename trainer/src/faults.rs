//! Fault injection behind one trait: what a rank's step lets a fault do (stall before the
//! step, compute slower, poison a gradient, die — by an error, a panic or a hang — at a
//! named point of the run). `[fault]` is the config-driven implementation the tests, the
//! soak and mpirun processes use; a run without `[fault]` entries gets hooks that do
//! nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use meshrec_model::transfer::upload;

use crate::error::RunError;
pub use crate::fault_section::{FaultKind, FaultPoint, FaultSection};

/// What a rank lets faults do to its step. Every method has a do-nothing default.
pub trait FaultHooks: Send {
    /// At the step's start, before any compute (a straggler stalls here).
    fn before_step(&mut self, step: u64) {
        let _ = step;
    }

    /// How many times longer than measured this rank's compute takes (1: as measured).
    fn compute_stretch(&self) -> f64 {
        1.0
    }

    /// Whether this step's first gradient is poisoned with NaN.
    fn poisons(&self, step: u64) -> bool {
        let _ = step;
        false
    }

    /// At `point` of `step`: an injected crash fails here (or ends the process, as a real
    /// crash would under MPI), panics, or hangs.
    fn at(&mut self, point: FaultPoint, step: u64) -> Result<(), RunError> {
        let _ = (point, step);
        Ok(())
    }
}

/// What an elastic run lends a rank's fault hooks: when the fault struck (for the time to
/// detection), and the flag that releases a hung rank once it has been evicted.
#[derive(Debug, Clone, Default)]
pub struct FaultWitness {
    pub struck: Arc<std::sync::Mutex<Option<Instant>>>,
    pub released: Arc<AtomicBool>,
}

impl FaultWitness {
    fn strike(&self) {
        let mut at = self.struck.lock().unwrap_or_else(|e| e.into_inner());
        at.get_or_insert_with(Instant::now);
    }
}

/// No faults.
pub struct NoFaults;

impl FaultHooks for NoFaults {}

/// `[fault]`'s faults, for the world rank they name.
pub struct ConfigFaults {
    fault: FaultSection,
    world_rank: usize,
    /// Under MPI a crash kills the process (abort), as a real one would; on the local
    /// engine it is an error of this rank's thread.
    abort_process: bool,
    witness: FaultWitness,
}

impl ConfigFaults {
    pub fn new(fault: &FaultSection, world_rank: usize, abort_process: bool) -> Self {
        Self {
            fault: fault.clone(),
            world_rank,
            abort_process,
            witness: FaultWitness::default(),
        }
    }

    /// The same faults reporting to an elastic run's witness.
    pub fn witnessed(mut self, witness: FaultWitness) -> Self {
        self.witness = witness;
        self
    }
}

impl FaultHooks for ConfigFaults {
    fn before_step(&mut self, _step: u64) {
        if self.fault.slow_ms > 0 && self.fault.slow_rank == self.world_rank {
            std::thread::sleep(Duration::from_millis(self.fault.slow_ms));
        }
    }

    fn compute_stretch(&self) -> f64 {
        if self.fault.slow_compute_rank == self.world_rank {
            self.fault.slow_compute
        } else {
            1.0
        }
    }

    fn poisons(&self, step: u64) -> bool {
        self.fault.nan_step == Some(step) && self.fault.nan_rank == self.world_rank
    }

    fn at(&mut self, point: FaultPoint, step: u64) -> Result<(), RunError> {
        let f = &self.fault;
        if f.crash_step != Some(step) || f.crash_rank != self.world_rank || f.crash_at != point {
            return Ok(());
        }
        self.witness.strike();
        let rank = self.world_rank;
        let what = format!(
            "[fault] injected crash ({}) of world rank {rank} at step {step} ({point})",
            f.crash_kind
        );
        match f.crash_kind {
            FaultKind::Hang => {
                eprintln!("meshrec: {what}: hanging");
                while !self.witness.released.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Err(RunError::Parallel(format!(
                    "{what}: released after eviction"
                )));
            }
            _ if self.abort_process => {
                eprintln!("meshrec: {what}");
                std::process::abort();
            }
            FaultKind::Panic => panic!("{what}"),
            FaultKind::Error => {}
        }
        Err(RunError::Parallel(what))
    }
}

/// Sets the first gradient element to NaN (what a poisoning fault does).
pub fn poison_first(grads: &mut [Vec<f32>]) {
    if let Some(x) = grads.iter_mut().find_map(|g| g.first_mut()) {
        *x = f32::NAN;
    }
}

/// [`poison_first`] for gradients held on the device.
pub fn poison_first_on_device(grads: &mut [Tensor<1>]) {
    if let Some(g) = grads.iter_mut().find(|g| g.dims()[0] > 0) {
        let n = g.dims()[0];
        let nan: Tensor<1> = upload(TensorData::new(vec![f32::NAN], [1]), &g.device());
        *g = Tensor::cat(vec![nan, g.clone().narrow(0, 1, n - 1)], 0);
    }
}

/// Stretches a piece of compute that took `elapsed` to `stretch` times as long, by sleeping
/// the difference (a slower device, for the balancing tests).
pub fn stretch(elapsed: Duration, stretch: f64) {
    if stretch > 1.0 {
        std::thread::sleep(elapsed.mul_f64(stretch - 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_faults_hit_only_their_rank_and_step() {
        let fault = FaultSection {
            nan_step: Some(3),
            nan_rank: 1,
            crash_step: Some(5),
            crash_rank: 2,
            slow_compute: 2.5,
            slow_compute_rank: 1,
            ..FaultSection::default()
        };
        let mut one = ConfigFaults::new(&fault, 1, false);
        let mut two = ConfigFaults::new(&fault, 2, false);
        assert!(one.poisons(3) && !one.poisons(4) && !two.poisons(3));
        assert_eq!(one.compute_stretch(), 2.5);
        assert_eq!(two.compute_stretch(), 1.0);
        assert!(one.at(FaultPoint::MidStep, 5).is_ok() && two.at(FaultPoint::MidStep, 4).is_ok());
        assert!(two.at(FaultPoint::Checkpoint, 5).is_ok(), "another point");
        let err = two.at(FaultPoint::MidStep, 5).unwrap_err().to_string();
        assert!(
            err.contains("world rank 2") && err.contains("step 5"),
            "{err}"
        );
        let mut grads = vec![vec![], vec![1.0, 2.0]];
        poison_first(&mut grads);
        assert!(grads[1][0].is_nan() && grads[1][1] == 2.0);
    }
}
