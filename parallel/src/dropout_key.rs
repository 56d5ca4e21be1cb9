//! Counter-keyed dropout: every mask of a step is a function of (seed, step, DP rank,
//! micro-batch, block, site), so TP replicas agree without communication, a resumed run
//! draws the same masks, and a recomputed branch redraws the ones its forward drew.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Identifies one dropout site of one micro-batch of one step: the mask depends on nothing
/// else, so TP replicas agree and a resumed run draws the same masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
    /// The data-parallel rank: replicas see different samples.
    pub dp_rank: u64,
}

impl DropoutKey {
    pub(crate) fn stream(&self, micro_batch: usize, block: usize, site: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.key(micro_batch, block, site))
    }

    /// Seeds this thread's dropout stream (the attention's own dropout, inside a branch)
    /// for one branch of one micro-batch on TP rank `tp_rank` (heads differ by rank): a
    /// branch run again for recomputation draws the same masks.
    pub(crate) fn seed_branch(&self, micro_batch: usize, block: usize, site: u64, tp_rank: usize) {
        let key = self.key(micro_batch, block, site | BRANCH_SITE);
        meshrec_model::dropout::seed_dropout(key ^ (tp_rank as u64).wrapping_mul(0x9e37_79b9));
    }

    fn key(&self, micro_batch: usize, block: usize, site: u64) -> u64 {
        let mut key = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for part in [
            self.step,
            self.dp_rank,
            micro_batch as u64,
            block as u64,
            site,
        ] {
            key = (key ^ part).wrapping_mul(0x0100_0000_01b3).rotate_left(17);
        }
        key
    }
}

/// Marks the sites of branch-internal dropout streams apart from the residual masks'.
pub(crate) const BRANCH_SITE: u64 = 1 << 32;

/// An inverted-dropout mask (`0` or `1 / (1 - p)`), `None` when `p == 0`.
pub(crate) fn keyed_mask(
    mut rng: ChaCha8Rng,
    dims: [usize; 3],
    prob: f64,
    device: &Device,
) -> Option<Tensor<3>> {
    if prob <= 0.0 {
        return None;
    }
    let keep = 1.0 - prob;
    let scale = (1.0 / keep) as f32;
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Some(meshrec_model::transfer::upload(
        TensorData::new(values, dims),
        device,
    ))
}
