//! One device as a [`Stepper`]: the model in burn, its parameters and AdamW state on the
//! host (the fastest place for them on the CPU backend).

use burn::tensor::Device;
use meshrec_model::data::Batch;
use meshrec_model::optim::{clip_by_global_norm, sum_of_squares, AdamW};
use meshrec_model::params::{param_paths, read_values, write_values, ParamInfo};
use meshrec_model::step::{forward_backward, StepOutput};
use meshrec_model::Recommender;

use crate::checkpoint::{Progress, StateKind, TrainState};
use crate::config::RunConfig;
use crate::error::RunError;
use crate::faults::{poison_first, ConfigFaults, FaultHooks};
use crate::setup::{adamw_config, dropout_seed};
use crate::stepper::{StepResult, Stepper};

/// The single-device stepper: the model in burn, parameters and AdamW on the host.
pub struct SingleDevice {
    model: Recommender,
    infos: Vec<ParamInfo>,
    values: Vec<Vec<f32>>,
    optimizer: AdamW,
    decay: Vec<bool>,
    clip_norm: f64,
    seed: u64,
    faults: ConfigFaults,
    device: Device,
}

impl SingleDevice {
    pub fn new(model: Recommender, config: &RunConfig, device: &Device) -> Self {
        let infos = param_paths(&model);
        Self {
            values: read_values(&model),
            optimizer: AdamW::new(adamw_config(config), infos.iter().map(|p| p.numel())),
            decay: infos.iter().map(|p| p.shape.len() > 1).collect(),
            infos,
            clip_norm: config.train.clip_norm,
            seed: config.train.seed,
            faults: ConfigFaults::new(&config.fault, 0, false),
            model,
            device: device.clone(),
        }
    }
}

impl SingleDevice {
    /// The model as it stands (a module clone shares its tensors: cheap to keep).
    pub fn model(&self) -> &Recommender {
        &self.model
    }

    /// One optimizer step whose gradients come from `grads` (the next-item loss in
    /// training; distillation passes its own): dropout seeded for `step`, the global norm
    /// checked (a non-finite one skips the update), clipping, host AdamW at `lr`.
    pub fn step_with(
        &mut self,
        batch: &Batch,
        step: u64,
        lr: f32,
        grads: impl FnOnce(&Recommender, &Batch) -> StepOutput,
    ) -> StepResult {
        meshrec_model::dropout::seed_dropout(dropout_seed(self.seed, step));
        let mut out = grads(&self.model, batch);
        if self.faults.poisons(step) {
            poison_first(&mut out.grads);
        }
        let norm = sum_of_squares(&out.grads).sqrt();
        let skipped = !norm.is_finite();
        if !skipped {
            clip_by_global_norm(&mut out.grads, norm, self.clip_norm);
            self.optimizer
                .update(&mut self.values, &out.grads, lr, &self.decay);
            // A module clone shares its tensors: cheap.
            self.model = write_values(self.model.clone(), &self.values, &self.device);
        }
        StepResult {
            loss_sum: out.loss_sum,
            loss_targets: out.targets,
            targets: out.targets,
            skipped,
            parallel: None,
            migration: None,
            memory: Vec::new(),
        }
    }
}

impl Stepper for SingleDevice {
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError> {
        let device = self.device.clone();
        Ok(self.step_with(batch, step, lr, |model, batch| {
            forward_backward(
                model,
                batch,
                1.0 / batch.num_targets().max(1) as f32,
                &device,
            )
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
        Ok(Some(TrainState::from_ordered(
            &self.infos,
            self.values.clone(),
            self.optimizer.m.clone(),
            self.optimizer.v.clone(),
            self.optimizer.step,
        )))
    }

    fn import_state(&mut self, state: &TrainState, _same_layout: bool) -> Result<(), RunError> {
        let ordered = |kind| {
            state
                .full(kind)
                .to_ordered(&self.infos)
                .map_err(|e| RunError::Parallel(e.to_string()))
        };
        self.values = ordered(StateKind::Values)?;
        self.optimizer.m = ordered(StateKind::AdamM)?;
        self.optimizer.v = ordered(StateKind::AdamV)?;
        self.optimizer.step = state.optimizer_steps;
        self.model = write_values(self.model.clone(), &self.values, &self.device);
        Ok(())
    }
}
