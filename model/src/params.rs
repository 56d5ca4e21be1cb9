//! Parameters as host buffers: a fixed path order, reading values and gradients out of a
//! module, writing values back, and the seeded, layout-independent initialisation.
//!
//! Everything parallel (gradient all-reduce, sharding, checkpoints, the host optimizer)
//! works on these flat `Vec<f32>` per parameter, in the order of [`param_paths`].

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::transfer::upload;

/// One parameter: its dotted module path and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub path: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn current(&self) -> String {
        self.0.join(".")
    }
}

/// Visits float parameters with their paths; `f(path, shape, values)` per parameter.
struct Reader<'g, F> {
    path: PathStack,
    grads: Option<&'g Gradients>,
    f: F,
}

impl<F: FnMut(String, Vec<usize>, Option<Vec<f32>>)> ModuleVisitor for Reader<'_, F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let values = match self.grads {
            None => Some(to_host(tensor)),
            Some(grads) => tensor.grad(grads).map(to_host),
        };
        (self.f)(self.path.current(), shape, values);
    }
}

/// A tensor's values as a flat row-major `Vec<f32>` on the host (converted from whatever
/// float type the backend holds). The one place the crates copy a tensor out.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    crate::transfer::download(t)
}

/// The parameters of a module in its fixed traversal order.
pub fn param_paths<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut out = Vec::new();
    module.visit(&mut Reader {
        path: PathStack::default(),
        grads: None,
        f: |path, shape, _| out.push(ParamInfo { path, shape }),
    });
    out
}

/// Copies every parameter to the host, in [`param_paths`] order.
pub fn read_values<M: Module>(module: &M) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    module.visit(&mut Reader {
        path: PathStack::default(),
        grads: None,
        f: |_, _, v: Option<Vec<f32>>| out.push(v.unwrap_or_default()),
    });
    out
}

/// Copies every parameter's gradient to the host, zeros where backward produced none.
pub fn read_grads<M: Module>(module: &M, grads: &Gradients) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    module.visit(&mut Reader {
        path: PathStack::default(),
        grads: Some(grads),
        f: |_, shape: Vec<usize>, v: Option<Vec<f32>>| {
            out.push(v.unwrap_or_else(|| vec![0.0; shape.iter().product()]))
        },
    });
    out
}

/// Adds each parameter's gradient found in `grads` into `acc` (in [`param_paths`] order);
/// parameters that backward did not reach are left alone, so several partial backwards
/// (graph-cut pieces, micro-batches) accumulate without allocating zeros.
pub fn accumulate_grads<M: Module>(module: &M, grads: &Gradients, acc: &mut [Vec<f32>]) {
    let mut index = 0usize;
    module.visit(&mut Reader {
        path: PathStack::default(),
        grads: Some(grads),
        f: |_, _, v: Option<Vec<f32>>| {
            if let (Some(v), Some(slot)) = (v, acc.get_mut(index)) {
                for (a, g) in slot.iter_mut().zip(&v) {
                    *a += g;
                }
            }
            index += 1;
        },
    });
}

struct Writer<'a> {
    values: &'a [Vec<f32>],
    next: usize,
    device: Device,
}

impl ModuleMapper for Writer<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let values = &self.values[self.next];
        self.next += 1;
        let device = self.device.clone();
        param.map(|old| {
            let shape = old.dims();
            let t: Tensor<D> = upload(TensorData::new(values.clone(), shape), &device);
            if device.is_autodiff() {
                t.require_grad()
            } else {
                t
            }
        })
    }
}

/// Replaces every parameter's value (same order and sizes as [`param_paths`]), keeping ids.
///
/// # Panics
/// If `values` does not match the module's parameters: an internal invariant, checked by the
/// callers that build `values` from [`param_paths`].
pub fn write_values<M: Module>(module: M, values: &[Vec<f32>], device: &Device) -> M {
    let infos = param_paths(&module);
    assert_eq!(
        infos.len(),
        values.len(),
        "write_values: parameter count differs"
    );
    for (info, v) in infos.iter().zip(values) {
        assert_eq!(
            info.numel(),
            v.len(),
            "write_values: `{}` has the wrong size",
            info.path
        );
    }
    module.map(&mut Writer {
        values,
        next: 0,
        device: device.clone(),
    })
}

/// How a parameter is initialised, decided by its path.
fn init_rule(path: &str, std: f64, n_layers: usize) -> Option<f64> {
    let leaf = path.rsplit('.').next().unwrap_or(path);
    if leaf == "gamma" || leaf == "beta" || path.contains("norm") {
        // Norm scales start at one and shifts at zero (burn's own init); left as they are.
        return None;
    }
    // GPT-2: residual output projections scaled by 1/sqrt(2 * layers).
    if path.contains(".wo.") || path.contains(".w2.") {
        return Some(std / (2.0 * n_layers.max(1) as f64).sqrt());
    }
    Some(std)
}

/// Seeded initialisation of the FULL (unsharded) model: each parameter draws from its own
/// stream keyed by `(seed, path)`, so the values do not depend on traversal order, and a
/// sharded layout can take its slice of exactly the same numbers.
pub fn init_values(
    infos: &[ParamInfo],
    seed: u64,
    std: f64,
    n_layers: usize,
    current: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    infos
        .iter()
        .zip(current)
        .map(|(info, cur)| match init_rule(&info.path, std, n_layers) {
            None => cur.clone(),
            Some(std) => {
                let key = info
                    .path
                    .bytes()
                    .fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                    });
                let mut rng = ChaCha8Rng::seed_from_u64(key);
                let normal = Normal::new(0.0f32, std as f32)
                    .unwrap_or_else(|_| Normal::new(0.0, 0.02).expect("valid"));
                (0..info.numel()).map(|_| normal.sample(&mut rng)).collect()
            }
        })
        .collect()
}

/// Applies [`init_values`] to a full model.
pub fn init_normal<M: Module>(
    module: M,
    seed: u64,
    std: f64,
    n_layers: usize,
    device: &Device,
) -> M {
    let infos = param_paths(&module);
    let current = read_values(&module);
    let values = init_values(&infos, seed, std, n_layers, &current);
    write_values(module, &values, device)
}
