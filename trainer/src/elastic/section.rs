//! `[elastic]`: whether a run survives losing a data-parallel replica, how few replicas it
//! may shrink to, how fast a loss must be noticed, and when a replica joins.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::elastic::phase::Budgets;

/// `[elastic]`, every field defaulted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticSection {
    /// Keep training through the loss of a replica (local engine: in the same process;
    /// under MPI: `meshrec launch` restarts from the newest checkpoint).
    pub enabled: bool,
    /// Fewest replicas to continue with; below it the run stops with an error and a
    /// checkpoint.
    pub min_dp: usize,
    /// Most replicas (0: `parallel.dp`); a join beyond it is refused.
    pub max_dp: usize,
    /// A lost or silent rank is noticed within this many seconds; a rank that stops
    /// progressing within this or `hang_factor` times its phase's measured duration,
    /// whichever is longer.
    pub timeout_s: f64,
    /// How many times its longest recent duration a phase (step, evaluation, checkpoint)
    /// may take before its rank counts as hung.
    pub hang_factor: f64,
    /// A phase never measured yet (the first steps, the first evaluation) may take this
    /// long before its rank counts as hung.
    pub first_phase_s: f64,
    /// Add a replica at this step boundary (local engine).
    pub join_step: Option<u64>,
    /// `meshrec launch`: restarts before it gives up.
    pub max_restarts: usize,
}

impl Default for ElasticSection {
    fn default() -> Self {
        Self {
            enabled: false,
            min_dp: 1,
            max_dp: 0,
            timeout_s: 5.0,
            hang_factor: 5.0,
            first_phase_s: 60.0,
            join_step: None,
            max_restarts: 3,
        }
    }
}

/// What the rest of the config must allow for elastic training to be sound.
pub struct ElasticNeeds {
    pub dp: usize,
    pub sync_dp: bool,
    pub zero: bool,
}

impl ElasticSection {
    /// The largest DP size allowed.
    pub fn max_dp_for(&self, dp: usize) -> usize {
        if self.max_dp == 0 {
            dp
        } else {
            self.max_dp
        }
    }

    /// The watchdog's budgets: no phase under half the timeout (polled every tenth of it,
    /// detection stays within it), `hang_factor` times a phase's measured duration,
    /// `first_phase_s` before one is measured.
    pub fn budgets(&self) -> Budgets {
        Budgets {
            floor: Duration::from_secs_f64(self.timeout_s / 2.0),
            factor: self.hang_factor,
            first: Duration::from_secs_f64(self.first_phase_s),
        }
    }

    /// How often a rank's heart beats.
    pub fn beat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s / 10.0)
    }

    /// Checks the section against the rest of the config: the key at fault and why.
    pub fn check(&self, needs: &ElasticNeeds) -> Result<(), (&'static str, String)> {
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err((
                "elastic.timeout_s",
                "must be a positive number of seconds".into(),
            ));
        }
        if !(self.hang_factor.is_finite() && self.hang_factor >= 1.0) {
            return Err(("elastic.hang_factor", "must be at least 1".into()));
        }
        if !(self.first_phase_s.is_finite() && self.first_phase_s > 0.0) {
            return Err((
                "elastic.first_phase_s",
                "must be a positive number of seconds".into(),
            ));
        }
        if !self.enabled {
            if self.join_step.is_some() {
                return Err(("elastic.join_step", "needs elastic.enabled = true".into()));
            }
            return Ok(());
        }
        let max = self.max_dp_for(needs.dp);
        if self.min_dp == 0 || self.min_dp > needs.dp {
            return Err((
                "elastic.min_dp",
                format!("must be between 1 and parallel.dp ({})", needs.dp),
            ));
        }
        if max < needs.dp {
            return Err((
                "elastic.max_dp",
                format!("is below parallel.dp ({})", needs.dp),
            ));
        }
        if self.join_step.is_some() && max <= needs.dp {
            return Err((
                "elastic.join_step",
                format!(
                    "a replica cannot join: dp {} is already elastic.max_dp",
                    needs.dp
                ),
            ));
        }
        if !needs.sync_dp {
            return Err((
                "elastic.enabled",
                "needs dp.mode = \"sync\": survivors agree on the step to continue from by the update each applied, which async and local SGD replicas do not share".into(),
            ));
        }
        if needs.zero {
            return Err((
                "elastic.enabled",
                "needs dp.zero = 0: under ZeRO a lost replica takes its optimizer shards with it (resume from a checkpoint instead)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(dp: usize) -> ElasticNeeds {
        ElasticNeeds {
            dp,
            sync_dp: true,
            zero: false,
        }
    }

    #[test]
    fn refusals_name_their_key() {
        let on = ElasticSection {
            enabled: true,
            ..Default::default()
        };
        assert!(on.check(&needs(2)).is_ok());
        let key = |s: ElasticSection, n: ElasticNeeds| s.check(&n).unwrap_err().0;
        assert_eq!(
            key(
                ElasticSection {
                    min_dp: 3,
                    ..on.clone()
                },
                needs(2)
            ),
            "elastic.min_dp"
        );
        assert_eq!(
            key(
                ElasticSection {
                    join_step: Some(3),
                    ..on.clone()
                },
                needs(2)
            ),
            "elastic.join_step"
        );
        assert_eq!(
            key(
                on.clone(),
                ElasticNeeds {
                    zero: true,
                    ..needs(2)
                }
            ),
            "elastic.enabled"
        );
        assert_eq!(
            key(
                ElasticSection {
                    timeout_s: 0.0,
                    ..on.clone()
                },
                needs(2)
            ),
            "elastic.timeout_s"
        );
        assert!(ElasticSection {
            join_step: Some(3),
            max_dp: 3,
            ..on
        }
        .check(&needs(2))
        .is_ok());
    }
}
