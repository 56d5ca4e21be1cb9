//! Early stopping on the validation NDCG@10: remember the best evaluation, stop after
//! `patience` evaluations without a better one. Its state lives in the checkpointed
//! [`Progress`], so a resumed run stops where the uninterrupted one would.

use std::collections::BTreeMap;

use crate::checkpoint::Progress;

/// The metric that decides.
pub const METRIC: &str = "ndcg@10";

/// What an evaluation means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Better than every earlier evaluation: the new best model.
    Improved,
    /// Not better, patience left.
    NoBetter,
    /// Not better for `patience` evaluations in a row: stop.
    Stop,
}

/// Early stopping with a patience (0: never stop early).
#[derive(Debug, Clone, Copy)]
pub struct EarlyStopping {
    pub patience: u64,
}

impl EarlyStopping {
    /// Records epoch `epoch`'s validation metrics in `progress` and says what they mean. A
    /// report without the metric changes nothing.
    pub fn observe(
        &self,
        progress: &mut Progress,
        epoch: u64,
        valid: &BTreeMap<String, f64>,
    ) -> Verdict {
        let Some(&value) = valid.get(METRIC) else {
            return Verdict::NoBetter;
        };
        if progress.best_ndcg.is_none_or(|best| value > best) {
            progress.best_ndcg = Some(value);
            progress.best_epoch = epoch;
            progress.best_valid = valid.clone();
            progress.since_best = 0;
            return Verdict::Improved;
        }
        progress.since_best += 1;
        if self.patience > 0 && progress.since_best >= self.patience {
            Verdict::Stop
        } else {
            Verdict::NoBetter
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(x: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([(METRIC.to_string(), x)])
    }

    #[test]
    fn stops_after_patience_evaluations_without_a_better_one() {
        let policy = EarlyStopping { patience: 2 };
        let mut p = Progress::default();
        assert_eq!(policy.observe(&mut p, 1, &valid(0.1)), Verdict::Improved);
        assert_eq!(policy.observe(&mut p, 2, &valid(0.1)), Verdict::NoBetter);
        assert_eq!(policy.observe(&mut p, 3, &valid(0.2)), Verdict::Improved);
        assert_eq!(p.best_epoch, 3);
        assert_eq!(policy.observe(&mut p, 4, &valid(0.15)), Verdict::NoBetter);
        assert_eq!(policy.observe(&mut p, 5, &valid(0.19)), Verdict::Stop);
        assert_eq!((p.best_ndcg, p.since_best), (Some(0.2), 2));
        let never = EarlyStopping { patience: 0 };
        for e in 6..20 {
            assert_eq!(never.observe(&mut p, e, &valid(0.0)), Verdict::NoBetter);
        }
        assert_eq!(
            policy.observe(&mut p, 21, &BTreeMap::new()),
            Verdict::NoBetter
        );
    }
}
