//! Dropout with masks drawn on the host from a fast, explicitly seeded generator.
//!
//! burn's `Dropout` samples a Bernoulli tensor through its backend RNG, which on the Flex
//! CPU backend cost about 15% of a `small` training step, and cannot be re-seeded per step
//! (a resumed run would draw other masks). Here each thread owns a xoshiro generator that
//! the trainer seeds per step with [`seed_dropout`]; the `Dropout` module keeps burn's
//! configuration and `training` flag, only the sampling is replaced.
//!
//! A step that stays on a GPU ([`seed_dropout_on_device`]) draws its masks there instead,
//! from the device's generator seeded the same way per step: a mask is as large as the
//! activations, and uploading each one would move tens of MB per step.

use std::cell::{Cell, RefCell};

use burn::nn::Dropout;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::device::Residency;

thread_local! {
    static DROPOUT_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::seed_from_u64(0));
    static WITHOUT_GRAPH: Cell<bool> = const { Cell::new(false) };
    static ON_DEVICE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with training dropout applied to plain (non-autodiff) tensors and modules in
/// evaluation mode too: a training forward run without a graph (what full recomputation
/// keeps nothing of) still draws the training masks, from this thread's stream.
pub fn training_without_graph<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            WITHOUT_GRAPH.with(|w| w.set(self.0));
        }
    }
    let _reset = Reset(WITHOUT_GRAPH.with(|w| w.replace(true)));
    f()
}

/// Seeds this thread's dropout stream (call once per step with a key derived from the run
/// seed and the step, so a resumed run draws the same masks).
pub fn seed_dropout(seed: u64) {
    ON_DEVICE.with(|d| d.set(false));
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = SmallRng::seed_from_u64(seed));
}

/// Seeds this step's masks where a step of `residency` draws them: this thread's host
/// stream, or `device`'s generator.
pub fn seed_step(residency: Residency, device: &Device, seed: u64) {
    match residency {
        Residency::Host => seed_dropout(seed),
        Residency::Device => seed_dropout_on_device(device, seed),
    }
}

/// Seeds `device`'s generator and has this thread's masks drawn on the device until the
/// next [`seed_dropout`] (a device-resident step; the masks differ from the host stream's but
/// are as reproducible: a resumed run seeds the same step the same way).
pub fn seed_dropout_on_device(device: &Device, seed: u64) {
    ON_DEVICE.with(|d| d.set(true));
    device.seed(seed);
}

/// An inverted-dropout mask of `n` values, each `1 / (1 - prob)` with probability
/// `1 - prob`, else zero, drawn from `rng`.
pub fn mask_values(rng: &mut impl RngCore, n: usize, prob: f64) -> Vec<f32> {
    let keep = 1.0 - prob;
    let scale = (1.0 / keep) as f32;
    // Compare 32 random bits with keep * 2^32: one draw per element, no float conversion.
    let threshold = (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let mut out = Vec::with_capacity(n);
    out.extend((0..n).map(|_| {
        if rng.next_u32() < threshold {
            scale
        } else {
            0.0
        }
    }));
    out
}

/// Applies `dropout`'s configuration to `x` with a mask from this thread's stream; the
/// identity in evaluation (no autodiff, or the module's `training` flag cleared; unless
/// inside [`training_without_graph`]) and for probability zero, as burn's own.
pub fn apply<const D: usize>(dropout: &Dropout, x: Tensor<D>) -> Tensor<D> {
    let training = WITHOUT_GRAPH.with(Cell::get)
        || (dropout.training.is_enabled() && x.device().is_autodiff());
    if !training || dropout.prob <= 0.0 {
        return x;
    }
    let dims = x.dims();
    if ON_DEVICE.with(Cell::get) {
        let keep = Tensor::<D>::random(
            dims,
            Distribution::Bernoulli(1.0 - dropout.prob),
            &x.device(),
        );
        return x * (keep * (1.0 / (1.0 - dropout.prob)));
    }
    let n = dims.iter().product();
    let values = DROPOUT_RNG.with(|rng| mask_values(&mut *rng.borrow_mut(), n, dropout.prob));
    let mask: Tensor<D> = crate::transfer::upload(TensorData::new(values, dims), &x.device());
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_the_expected_share_and_scales() {
        let mut rng = SmallRng::seed_from_u64(7);
        let m = mask_values(&mut rng, 100_000, 0.2);
        let kept = m.iter().filter(|&&x| x > 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.8).abs() < 0.01, "kept {kept}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.25).abs() < 1e-6));
        let mean: f64 = m.iter().map(|&x| f64::from(x)).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn seeding_replays_the_same_masks() {
        seed_dropout(11);
        let a = DROPOUT_RNG.with(|r| mask_values(&mut *r.borrow_mut(), 64, 0.5));
        seed_dropout(11);
        let b = DROPOUT_RNG.with(|r| mask_values(&mut *r.borrow_mut(), 64, 0.5));
        assert_eq!(a, b);
    }
}
