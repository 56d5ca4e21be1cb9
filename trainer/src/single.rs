//! One device as a [`Stepper`]: the model in burn, its loss and AdamW where the backend
//! runs them fastest — host buffers on the CPU backend, tensor ops on a GPU backend, where
//! nothing but the batch and a few scalars crosses to the host in a step.

use burn::tensor::{Device, Tensor, TensorData};
use meshrec_model::data::Batch;
use meshrec_model::device::Residency;
use meshrec_model::device_optim::{global_norm, DeviceAdamW};
use meshrec_model::dropout::seed_step;
use meshrec_model::optim::{clip_by_global_norm, clip_scale, sum_of_squares, AdamW};
use meshrec_model::params::{param_paths, read_values, write_values, ParamInfo};
use meshrec_model::step::{forward_backward_on_device, forward_backward_placed, StepOutput};
use meshrec_model::transfer::upload;
use meshrec_model::Recommender;

use crate::checkpoint::{Progress, StateKind, TrainState};
use crate::config::RunConfig;
use crate::error::RunError;
use crate::faults::{poison_first, poison_first_on_device, ConfigFaults, FaultHooks};
use crate::setup::{adamw_config, dropout_seed};
use crate::stepper::{StepResult, Stepper};

/// Where the optimizer's state lives.
enum Optimizer {
    /// Parameters mirrored as host buffers, updated there and written back each step.
    Host { values: Vec<Vec<f32>>, adamw: AdamW },
    /// Moments beside the parameters on the device; the module's tensors are the values.
    Device(DeviceAdamW),
}

/// The single-device stepper.
pub struct SingleDevice {
    model: Recommender,
    infos: Vec<ParamInfo>,
    optimizer: Optimizer,
    decay: Vec<bool>,
    clip_norm: f64,
    seed: u64,
    faults: ConfigFaults,
    device: Device,
}

impl SingleDevice {
    /// The stepper with the residency `train.residency` names (`auto`: what suits `device`).
    pub fn new(model: Recommender, config: &RunConfig, device: &Device) -> Result<Self, RunError> {
        let residency = config.train.residency(device)?;
        Ok(Self::with_residency(model, config, device, residency))
    }

    /// The stepper with its loss and optimizer placed by `residency`.
    pub fn with_residency(
        model: Recommender,
        config: &RunConfig,
        device: &Device,
        residency: Residency,
    ) -> Self {
        let infos = param_paths(&model);
        let optimizer = match residency {
            Residency::Host => Optimizer::Host {
                values: read_values(&model),
                adamw: AdamW::new(adamw_config(config), infos.iter().map(|p| p.numel())),
            },
            Residency::Device => {
                Optimizer::Device(DeviceAdamW::new(adamw_config(config), &infos, device))
            }
        };
        Self {
            optimizer,
            decay: infos.iter().map(|p| p.shape.len() > 1).collect(),
            infos,
            clip_norm: config.train.clip_norm,
            seed: config.train.seed,
            faults: ConfigFaults::new(&config.fault, 0, false),
            model,
            device: device.clone(),
        }
    }

    /// The model as it stands (a module clone shares its tensors: cheap to keep).
    pub fn model(&self) -> &Recommender {
        &self.model
    }

    /// Where this stepper runs its loss and optimizer.
    pub fn residency(&self) -> Residency {
        match self.optimizer {
            Optimizer::Host { .. } => Residency::Host,
            Optimizer::Device(_) => Residency::Device,
        }
    }

    /// Seeds this step's dropout masks where the step draws them.
    fn seed_masks(&self, step: u64) {
        seed_step(
            self.residency(),
            &self.device,
            dropout_seed(self.seed, step),
        );
    }

    /// One optimizer step whose gradients come from `grads` on the host (the next-item
    /// loss in training on the CPU backend; distillation passes its own): dropout seeded for
    /// `step`, the global norm checked (a non-finite one skips the update), clipping, AdamW
    /// at `lr` wherever the state lives.
    pub fn step_with(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f32,
        grads: impl FnOnce(&Recommender, &Batch) -> StepOutput,
    ) -> StepResult {
        self.seed_masks(step);
        let mut out = grads(&self.model, batch);
        if self.faults.poisons(step) {
            poison_first(&mut out.grads);
        }
        let skipped = match &mut self.optimizer {
            Optimizer::Host { values, adamw } => {
                let norm = sum_of_squares(&out.grads).sqrt();
                let skipped = !norm.is_finite();
                if !skipped {
                    clip_by_global_norm(&mut out.grads, norm, self.clip_norm);
                    adamw.update(values, &out.grads, lr, &self.decay);
                    // A module clone shares its tensors: cheap.
                    self.model = write_values(self.model.clone(), values, &self.device);
                }
                skipped
            }
            Optimizer::Device(_) => {
                let inner = self.device.clone().inner();
                let grads = out
                    .grads
                    .into_iter()
                    .map(|g| {
                        let n = g.len();
                        upload::<1, burn::tensor::Float>(TensorData::new(g, [n]), &inner)
                    })
                    .collect();
                self.update_on_device(grads, lr)
            }
        };
        step_result(out.loss_sum, out.targets, skipped)
    }

    /// The device-resident step: loss, gradients, clipping and AdamW on the device; the batch
    /// goes up, the loss and the gradient norm come back.
    fn step_on_device(&mut self, batch: &Batch, step: u64, lr: f32) -> StepResult {
        self.seed_masks(step);
        let scale = 1.0 / batch.num_targets().max(1) as f32;
        let out =
            forward_backward_on_device(&self.model, batch, scale, Residency::Device, &self.device);
        let mut grads = out.grads;
        if self.faults.poisons(step) {
            poison_first_on_device(&mut grads);
        }
        let skipped = self.update_on_device(grads, lr);
        step_result(out.loss_sum, out.targets, skipped)
    }

    /// Clipping and the device AdamW; returns whether the step was skipped (non-finite norm).
    fn update_on_device(&mut self, grads: Vec<Tensor<1>>, lr: f32) -> bool {
        let Optimizer::Device(adamw) = &mut self.optimizer else {
            unreachable!("update_on_device on a host optimizer")
        };
        let norm = global_norm(&grads);
        if !norm.is_finite() {
            return true;
        }
        let scale = clip_scale(norm, self.clip_norm);
        self.model = adamw.update(self.model.clone(), grads, lr, scale, &self.decay);
        false
    }
}

fn step_result(loss_sum: f64, targets: usize, skipped: bool) -> StepResult {
    StepResult {
        loss_sum,
        loss_targets: targets,
        targets,
        skipped,
        parallel: None,
        migration: None,
        memory: Vec::new(),
    }
}

impl Stepper for SingleDevice {
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError> {
        if self.residency() == Residency::Device {
            return Ok(self.step_on_device(batch, step, lr));
        }
        let device = self.device.clone();
        Ok(self.step_with(batch, step, lr, |model, batch| {
            let scale = 1.0 / batch.num_targets().max(1) as f32;
            forward_backward_placed(model, batch, scale, Residency::Host, &device)
        }))
    }

    fn full_model(&mut self) -> Result<Recommender, RunError> {
        Ok(self.model.clone())
    }

    fn is_leader(&self) -> bool {
        true
    }

    fn leader_decides_stop(&mut self, stop: bool, _: &mut Progress) -> Result<bool, RunError> {
        Ok(stop)
    }

    fn export_state(&mut self) -> Result<Option<TrainState>, RunError> {
        let (values, m, v, steps) = match &self.optimizer {
            Optimizer::Host { values, adamw } => {
                (values.clone(), adamw.m.clone(), adamw.v.clone(), adamw.step)
            }
            Optimizer::Device(adamw) => {
                let (m, v) = adamw.moments_to_host();
                (read_values(&self.model), m, v, adamw.step)
            }
        };
        Ok(Some(TrainState::from_ordered(
            &self.infos,
            values,
            m,
            v,
            steps,
        )))
    }

    fn import_state(&mut self, state: &TrainState, _same_layout: bool) -> Result<(), RunError> {
        let ordered = |kind| {
            state
                .full(kind)
                .to_ordered(&self.infos)
                .map_err(|e| RunError::Parallel(e.to_string()))
        };
        let values = ordered(StateKind::Values)?;
        let (m, v) = (ordered(StateKind::AdamM)?, ordered(StateKind::AdamV)?);
        self.model = write_values(self.model.clone(), &values, &self.device);
        match &mut self.optimizer {
            Optimizer::Host {
                values: held,
                adamw,
            } => {
                *held = values;
                adamw.m = m;
                adamw.v = v;
                adamw.step = state.optimizer_steps;
            }
            Optimizer::Device(adamw) => {
                *adamw = DeviceAdamW::from_host(
                    adamw.config,
                    state.optimizer_steps,
                    &m,
                    &v,
                    &self.device,
                );
            }
        }
        Ok(())
    }
}
