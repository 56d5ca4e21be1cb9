//! Fault injection behind one trait: what a rank's step lets a fault do (stall before the
//! step, compute slower, poison a gradient, die mid-step). `[fault]` is the config-driven
//! implementation the tests and mpirun processes use; a run without `[fault]` entries gets
//! hooks that do nothing.

use std::time::Duration;

use crate::config::FaultSection;
use crate::error::RunError;

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

    /// Mid-step, after backward, with the peers waiting in the step's reductions: an
    /// injected crash fails here (or ends the process, as a real crash would under MPI).
    fn mid_step(&mut self, step: u64) -> Result<(), RunError> {
        let _ = step;
        Ok(())
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
}

impl ConfigFaults {
    pub fn new(fault: &FaultSection, world_rank: usize, abort_process: bool) -> Self {
        Self {
            fault: fault.clone(),
            world_rank,
            abort_process,
        }
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

    fn mid_step(&mut self, step: u64) -> Result<(), RunError> {
        if self.fault.crash_step != Some(step) || self.fault.crash_rank != self.world_rank {
            return Ok(());
        }
        let rank = self.world_rank;
        if self.abort_process {
            eprintln!("meshrec: [fault] crash of world rank {rank} at step {step}");
            std::process::abort();
        }
        Err(RunError::Parallel(format!(
            "[fault] injected crash of world rank {rank} at step {step}"
        )))
    }
}

/// Sets the first gradient element to NaN (what a poisoning fault does).
pub fn poison_first(grads: &mut [Vec<f32>]) {
    if let Some(x) = grads.iter_mut().find_map(|g| g.first_mut()) {
        *x = f32::NAN;
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
        assert!(one.mid_step(5).is_ok() && two.mid_step(4).is_ok());
        let err = two.mid_step(5).unwrap_err().to_string();
        assert!(
            err.contains("world rank 2") && err.contains("step 5"),
            "{err}"
        );
        let mut grads = vec![vec![], vec![1.0, 2.0]];
        poison_first(&mut grads);
        assert!(grads[1][0].is_nan() && grads[1][1] == 2.0);
    }
}
