//! AdamW and global-norm clipping as tensor ops on the device, for backends whose memory is
//! not the host's (wgpu, cuda): moments live beside the parameters and a step reads back one
//! scalar (the gradient norm, which decides clipping and whether the step is skipped).
//!
//! The formula is [`crate::optim::AdamW`]'s (PyTorch's decoupled weight decay, bias
//! correction folded into the step size), term for term, so the two agree to rounding.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::optim::AdamWConfig;
use crate::params::ParamInfo;
use crate::transfer::{download, download_scalar, upload};

/// AdamW state on the device: each parameter's moments flattened, in
/// [`crate::params::param_paths`] order.
#[derive(Debug, Clone)]
pub struct DeviceAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    m: Vec<Tensor<1>>,
    v: Vec<Tensor<1>>,
}

impl DeviceAdamW {
    /// Zero moments for `infos`' parameters on `device` (outside autodiff).
    pub fn new(config: AdamWConfig, infos: &[ParamInfo], device: &Device) -> Self {
        let device = device.clone().inner();
        let zeros = || -> Vec<Tensor<1>> {
            infos
                .iter()
                .map(|p| Tensor::zeros([p.numel()], &device))
                .collect()
        };
        Self {
            config,
            step: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// State taken up from host buffers (a checkpoint).
    pub fn from_host(
        config: AdamWConfig,
        step: u64,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        device: &Device,
    ) -> Self {
        let device = device.clone().inner();
        let up = |bufs: &[Vec<f32>]| -> Vec<Tensor<1>> {
            bufs.iter()
                .map(|b| upload(TensorData::new(b.clone(), [b.len()]), &device))
                .collect()
        };
        Self {
            config,
            step,
            m: up(m),
            v: up(v),
        }
    }

    /// The moments copied to the host (for a checkpoint; never on the step's path).
    pub fn moments_to_host(&self) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let down = |ts: &[Tensor<1>]| ts.iter().cloned().map(download).collect();
        (down(&self.m), down(&self.v))
    }

    /// One update of `module`'s parameters from `grads` (flat, in parameter order) times
    /// `scale` (clipping's factor), at `lr`; `decay[i]` says whether parameter `i` takes weight
    /// decay. Parameter ids are kept, so a module clone made before still names them.
    pub fn update<M: Module>(
        &mut self,
        module: M,
        grads: Vec<Tensor<1>>,
        lr: f32,
        scale: f32,
        decay: &[bool],
    ) -> M {
        assert_eq!(
            grads.len(),
            self.m.len(),
            "DeviceAdamW: parameter count changed"
        );
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let (track_variance, t2) = c.variance_step(self.step);
        let bias2 = 1.0 - c.beta2.powi(t2);
        module.map(&mut Updater {
            state: self,
            grads,
            next: 0,
            lr,
            scale,
            step_size: lr / bias1,
            inv_sqrt_bias2: 1.0 / bias2.sqrt(),
            track_variance,
            decay,
        })
    }
}

struct Updater<'a> {
    state: &'a mut DeviceAdamW,
    grads: Vec<Tensor<1>>,
    next: usize,
    lr: f32,
    scale: f32,
    step_size: f32,
    inv_sqrt_bias2: f32,
    track_variance: bool,
    decay: &'a [bool],
}

impl ModuleMapper for Updater<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.next;
        self.next += 1;
        let c = self.state.config;
        let g = self.grads[i].clone() * self.scale;
        let m = self.state.m[i].clone() * c.beta1 + g.clone() * (1.0 - c.beta1);
        let v = if self.track_variance {
            self.state.v[i].clone() * c.beta2 + (g.clone() * g) * (1.0 - c.beta2)
        } else {
            self.state.v[i].clone()
        };
        let denom = v.clone().sqrt() * self.inv_sqrt_bias2 + c.eps;
        let update = (m.clone() / denom) * self.step_size;
        self.state.m[i] = m;
        self.state.v[i] = v;
        let shrink = if self.decay.get(i).copied().unwrap_or(false) {
            1.0 - self.lr * c.weight_decay
        } else {
            1.0
        };
        param.map(|old| {
            let tracked = old.is_autodiff();
            let shape = old.dims();
            let n: usize = shape.iter().product();
            let flat = old.without_autodiff().reshape([n]);
            let new = (flat * shrink - update).reshape(shape);
            if tracked {
                new.autodiff().require_grad()
            } else {
                new
            }
        })
    }
}

/// Every parameter's gradient, flattened, on the device, in parameter order (zeros where
/// backward did not reach one).
pub fn device_grads<M: Module>(module: &M, grads: &Gradients) -> Vec<Tensor<1>> {
    struct Collect<'g> {
        grads: &'g Gradients,
        out: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let n: usize = value.dims().iter().product();
            let g = match value.grad(self.grads) {
                Some(g) => g.reshape([n]),
                None => Tensor::zeros([n], &value.device().inner()),
            };
            self.out.push(g);
        }
    }
    let mut collect = Collect {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut collect);
    collect.out
}

/// The gradients' global L2 norm, read back as the one scalar a step needs on the host.
pub fn global_norm(grads: &[Tensor<1>]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    let squares: Vec<Tensor<1>> = grads
        .iter()
        .map(|g| (g.clone() * g.clone()).sum())
        .collect();
    f64::from(download_scalar(Tensor::cat(squares, 0).sum())).sqrt()
}
