//! Shared helpers for the integration tests: seeded random vectors.

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// `n` standard-normal values from `seed`.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut g = StdRng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut g)).collect()
}

/// `n` values with heavy tails (like real gradients): normal times a log-uniform scale.
pub fn heavy(n: usize, seed: u64) -> Vec<f32> {
    let mut g = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut g);
            z * 10f32.powf(g.random_range(-4.0..1.0))
        })
        .collect()
}
