//! The host-side optimizer: AdamW over flat per-parameter buffers, global-norm clipping and
//! the warm-up + cosine learning-rate schedule. Host buffers are what gradients arrive in
//! after the collectives, what shards and checkpoints hold, and what ZeRO-Offload-style CPU
//! Adam updates; on the CPU backend it is also far cheaper than one tensor op per update term.

use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters, PyTorch's meaning (decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Stop updating the second moment after this many steps and precondition with the
    /// frozen one from then on (1-bit Adam, Tang et al. 2021). Under sparsified
    /// communication a coordinate's gradient arrives in bursts, a sum over the steps it
    /// waited; a live second moment then shrinks such a burst to about one step's move
    /// (Adam normalises per coordinate), while with a frozen one the update is linear in
    /// the gradient, so a burst moves the weight as far as the steps it sums would have.
    #[serde(default)]
    pub freeze_variance_after: Option<u64>,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, set explicitly (burn's own differ: eps 1e-5, decay 1e-4).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            freeze_variance_after: None,
        }
    }
}

impl AdamWConfig {
    /// Whether step `t` (counted from 1) updates the second moment, and the step count its
    /// bias correction uses.
    pub fn variance_step(&self, t: u64) -> (bool, i32) {
        match self.freeze_variance_after {
            Some(f) if t > f => (false, f as i32),
            _ => (true, t as i32),
        }
    }
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Fresh state for parameters of the given sizes.
    pub fn new(config: AdamWConfig, sizes: impl IntoIterator<Item = usize>) -> Self {
        let (m, v): (Vec<_>, Vec<_>) = sizes
            .into_iter()
            .map(|n| (vec![0.0; n], vec![0.0; n]))
            .unzip();
        Self {
            config,
            step: 0,
            m,
            v,
        }
    }

    /// One update. `decay[i]` says whether parameter `i` takes weight decay (matrices do,
    /// norm scales do not).
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32, decay: &[bool]) {
        let mut params: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        let grads: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        self.update_slices(&mut params, &grads, lr, decay);
    }

    /// One update of parameter slices whose moments this state holds: the whole parameters,
    /// or under ZeRO a rank's shard of each (`m[i]`, `v[i]`, `params[i]` and `grads[i]`
    /// all of one length).
    pub fn update_slices(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f32,
        decay: &[bool],
    ) {
        assert_eq!(params.len(), self.m.len(), "AdamW: parameter count changed");
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let (track_variance, t2) = c.variance_step(self.step);
        let bias2 = 1.0 - c.beta2.powi(t2);
        let step_size = lr / bias1;
        let inv_sqrt_bias2 = 1.0 / bias2.sqrt();
        for i in 0..params.len() {
            let shrink = if decay[i] {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let (p, g, m, v) = (&mut *params[i], grads[i], &mut self.m[i], &mut self.v[i]);
            assert!(
                p.len() == g.len() && p.len() == m.len(),
                "AdamW: parameter {i} has {} values, its gradient {} and its moments {}",
                p.len(),
                g.len(),
                m.len()
            );
            for j in 0..p.len() {
                let gj = g[j];
                m[j] = c.beta1 * m[j] + (1.0 - c.beta1) * gj;
                if track_variance {
                    v[j] = c.beta2 * v[j] + (1.0 - c.beta2) * gj * gj;
                }
                let denom = v[j].sqrt() * inv_sqrt_bias2 + c.eps;
                p[j] = p[j] * shrink - step_size * m[j] / denom;
            }
        }
    }

    /// Bytes of the moments this state holds (allocated capacity, what the process keeps).
    pub fn held_bytes(&self) -> u64 {
        self.m
            .iter()
            .chain(&self.v)
            .map(|b| 4 * b.capacity() as u64)
            .sum()
    }
}

/// The squared L2 norm of all gradients, accumulated in f64 (sum the partial results of
/// shards, then take the root).
pub fn sum_of_squares(grads: &[Vec<f32>]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| f64::from(x) * f64::from(x))
        .sum()
}

/// Scales gradients so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`). Returns the factor applied.
pub fn clip_by_global_norm(grads: &mut [Vec<f32>], norm: f64, max_norm: f64) -> f32 {
    let scale = clip_scale(norm, max_norm);
    if scale == 1.0 {
        return 1.0;
    }
    for g in grads.iter_mut() {
        for x in g.iter_mut() {
            *x *= scale;
        }
    }
    scale
}

/// The factor that brings gradients of global `norm` to at most `max_norm` (1 when they are
/// within it or clipping is off).
pub fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 || norm <= max_norm {
        1.0
    } else {
        (max_norm / (norm + 1e-6)) as f32
    }
}

/// Linear warm-up to `lr`, then cosine decay to `lr * min_ratio` at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_ratio: f64,
}

impl LrSchedule {
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One AdamW step against values computed by hand from PyTorch's formula.
    #[test]
    fn adamw_matches_reference_formula() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            freeze_variance_after: None,
        };
        let mut opt = AdamW::new(cfg, [2]);
        let mut p = vec![vec![1.0f32, -2.0]];
        let g = vec![vec![0.5f32, -0.25]];
        opt.update(&mut p, &g, 0.01, &[true]);
        // step 1: m_hat = g, v_hat = g^2, update = g / (|g| + eps) = sign(g)
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in p[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// With the second moment frozen after step 1, step 2 keeps v (and its bias
    /// correction) from step 1, so the update is linear in the gradient: a gradient
    /// four times larger moves four times as far.
    #[test]
    fn a_frozen_variance_makes_the_update_linear() {
        let cfg = AdamWConfig {
            beta1: 0.0,
            beta2: 0.5,
            eps: 0.0,
            weight_decay: 0.0,
            freeze_variance_after: Some(1),
        };
        let mut opt = AdamW::new(cfg, [1]);
        let mut p = vec![vec![0.0f32]];
        opt.update(&mut p, &[vec![2.0]], 1.0, &[false]);
        // Step 1: v = 0.5 * 4 = 2, bias2 = 0.5, sqrt(v / bias2) = 2: p = -2 / 2.
        assert!((p[0][0] + 1.0).abs() < 1e-6, "{}", p[0][0]);
        assert_eq!(opt.v[0][0], 2.0);
        opt.update(&mut p, &[vec![8.0]], 1.0, &[false]);
        // Step 2, frozen: v stays 2 with bias2 of step 1, so p -= 8 / 2 (live: v = 33,
        // bias2 = 0.75, p -= 8 / sqrt(44) = 1.206).
        assert_eq!(opt.v[0][0], 2.0);
        assert!((p[0][0] + 5.0).abs() < 1e-5, "{}", p[0][0]);
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0f32]];
        let norm = sum_of_squares(&g).sqrt();
        assert_eq!(norm, 5.0);
        clip_by_global_norm(&mut g, norm, 1.0);
        assert!((sum_of_squares(&g).sqrt() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_ratio: 0.1,
        };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        assert!((s.at(110) - 0.1).abs() < 1e-12);
        assert!((s.at(500) - 0.1).abs() < 1e-12);
    }
}
