//! A synthetic interaction generator for scale tests and benchmarks: Zipf item popularity,
//! per-user sessions and a learnable sequential signal.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, Zipf};

use super::read::RawInteraction;
use super::split::Dataset;
use crate::error::DataError;

/// Parameters of a synthetic dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub users: usize,
    pub items: usize,
    /// Exponent of the Zipf law of item popularity (1.0 is classic Zipf).
    pub zipf_exponent: f64,
    /// Mean number of interactions per user (at least 3 each, so every user is evaluated).
    pub mean_length: f64,
    /// Probability that the next item follows the previous one by a fixed transition, the
    /// signal a sequential model can learn; otherwise it is a popularity draw.
    pub transition_prob: f64,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            users: 1000,
            items: 2000,
            zipf_exponent: 1.0,
            mean_length: 50.0,
            transition_prob: 0.5,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    fn validate(&self) -> Result<(), DataError> {
        let bad = |key, message: &str| {
            Err(DataError::InvalidParameter {
                key,
                message: message.into(),
            })
        };
        if self.users == 0 {
            return bad("synthetic.users", "must be at least 1");
        }
        if self.items < 2 {
            return bad("synthetic.items", "must be at least 2");
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent > 0.0) {
            return bad("synthetic.zipf_exponent", "must be a positive number");
        }
        if !(self.mean_length.is_finite() && self.mean_length >= 3.0) {
            return bad("synthetic.mean_length", "must be at least 3");
        }
        if !(0.0..=1.0).contains(&self.transition_prob) {
            return bad("synthetic.transition_prob", "must be in [0, 1]");
        }
        Ok(())
    }

    /// Generates the raw interactions (deterministic in `seed`).
    pub fn interactions(&self) -> Result<Vec<RawInteraction>, DataError> {
        self.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let popularity = Zipf::new(self.items as f64, self.zipf_exponent).map_err(|e| {
            DataError::InvalidParameter {
                key: "synthetic.zipf_exponent",
                message: e.to_string(),
            }
        })?;
        let extra = Poisson::new(self.mean_length - 3.0 + 1e-9).map_err(|e| {
            DataError::InvalidParameter {
                key: "synthetic.mean_length",
                message: e.to_string(),
            }
        })?;
        // A fixed random successor per item: the sequential pattern to learn.
        let successor: Vec<usize> = (0..self.items)
            .map(|_| rng.random_range(0..self.items))
            .collect();
        let mut out = Vec::new();
        let mut line = 0;
        for user in 0..self.users {
            let len = 3 + extra.sample(&mut rng) as usize;
            let mut prev = popularity.sample(&mut rng) as usize - 1;
            for t in 0..len {
                let item = if t > 0 && rng.random_bool(self.transition_prob) {
                    successor[prev]
                } else {
                    popularity.sample(&mut rng) as usize - 1
                };
                line += 1;
                out.push(RawInteraction {
                    user: user.to_string(),
                    item: (item + 1).to_string(),
                    timestamp: t as f64,
                    line,
                });
                prev = item;
            }
        }
        Ok(out)
    }

    pub fn dataset(&self) -> Result<Dataset, DataError> {
        Ok(Dataset::from_interactions(
            "synthetic",
            &self.interactions()?,
        ))
    }
}
