//! Device descriptions (peak FLOP/s, memory bandwidth and size, achievable efficiency)
//! and named presets for the devices the simulator and planner reason about.
//!
//! GPU presets are datasheet numbers for dense bf16 tensor-core math (no sparsity) with
//! efficiencies typical of well-tuned transformer training (model FLOPs utilisation of
//! 40–55% on large GEMMs); they are **modelled**, not measured here. The CPU preset is the
//! measurement recorded in DESIGN.md for this machine; the trainer replaces it with its own
//! measurement through [`DeviceSpec::measured`].

use serde::{Deserialize, Serialize};

use crate::error::BalanceError;

const GB: f64 = 1e9;
const GIB: u64 = 1 << 30;

/// Where the trainer runs the catalogue-wide loss on a device (the trainer's `Residency`):
/// on host buffers for the CPU backend, whose tensors are host memory already, as tensor ops
/// on a GPU. On the host the loss copies the table shard and the loss rows out of the
/// backend's tensors and their gradients back in; on a GPU nothing crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossPlacement {
    Host,
    #[default]
    Device,
}

/// One accelerator (or one CPU socket acting as one device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Preset or user name.
    pub name: String,
    /// Peak dense matrix-multiply FLOP/s at the training precision.
    pub peak_flops: f64,
    /// Peak memory bandwidth in bytes/s.
    pub mem_bw: f64,
    /// Device memory available to training, bytes.
    pub memory_bytes: u64,
    /// Fraction of `peak_flops` that large GEMMs achieve in practice (0, 1].
    pub flop_efficiency: f64,
    /// Fraction of `mem_bw` that streaming kernels (softmax, norms) achieve (0, 1].
    pub bw_efficiency: f64,
    /// Whether the numbers were measured on real hardware (true) or taken from a
    /// datasheet (false: modelled).
    pub measured: bool,
    /// Where the trainer runs the loss on this device (the head's copies follow it).
    #[serde(default)]
    pub loss_placement: LossPlacement,
}

impl DeviceSpec {
    /// A device from measured *achieved* rates: matrix-multiply FLOP/s and streaming
    /// bandwidth as a benchmark saw them (so both efficiencies are 1), and where the trainer
    /// runs the loss on it.
    pub fn measured(
        name: impl Into<String>,
        achieved_flops: f64,
        achieved_bw: f64,
        memory_bytes: u64,
        loss_placement: LossPlacement,
    ) -> Result<Self, BalanceError> {
        let spec = Self {
            name: name.into(),
            peak_flops: achieved_flops,
            mem_bw: achieved_bw,
            memory_bytes,
            flop_efficiency: 1.0,
            bw_efficiency: 1.0,
            measured: true,
            loss_placement,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// This machine's CPU as DESIGN.md records it: burn Flex with `simd` + `rayon` on 2
    /// threads reaches 125–150 GFLOP/s on square f32 matmuls (137.5 taken); streaming
    /// bandwidth is assumed 10 GB/s (2 cores of a server part; not measured); 16 GiB of the
    /// 23 GiB RAM usable. A documented default (`measured` false): the trainer should call
    /// [`DeviceSpec::measured`] with the numbers it measures.
    pub fn cpu_default() -> Self {
        Self {
            name: "cpu".into(),
            peak_flops: 137.5e9,
            mem_bw: 10.0 * GB,
            memory_bytes: 16 * GIB,
            flop_efficiency: 1.0,
            bw_efficiency: 1.0,
            measured: false,
            loss_placement: LossPlacement::Host,
        }
    }

    /// NVIDIA A100-SXM4-80GB: 312 TFLOP/s bf16 dense, 2.039 TB/s HBM2e, 80 GB.
    pub fn a100_80gb() -> Self {
        Self {
            name: "a100-80gb".into(),
            peak_flops: 312e12,
            mem_bw: 2039.0 * GB,
            memory_bytes: 80 * GIB,
            flop_efficiency: 0.55,
            bw_efficiency: 0.8,
            measured: false,
            loss_placement: LossPlacement::Device,
        }
    }

    /// NVIDIA H100-SXM5-80GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB.
    pub fn h100_80gb() -> Self {
        Self {
            name: "h100-80gb".into(),
            peak_flops: 989e12,
            mem_bw: 3350.0 * GB,
            memory_bytes: 80 * GIB,
            flop_efficiency: 0.45,
            bw_efficiency: 0.8,
            measured: false,
            loss_placement: LossPlacement::Device,
        }
    }

    /// NVIDIA V100-SXM2-32GB (the slower device of heterogeneous clusters): 125 TFLOP/s
    /// fp16 tensor cores (no bf16), 900 GB/s HBM2, 32 GB.
    pub fn v100_32gb() -> Self {
        Self {
            name: "v100-32gb".into(),
            peak_flops: 125e12,
            mem_bw: 900.0 * GB,
            memory_bytes: 32 * GIB,
            flop_efficiency: 0.5,
            bw_efficiency: 0.8,
            measured: false,
            loss_placement: LossPlacement::Device,
        }
    }

    /// NVIDIA T4: 65 TFLOP/s fp16 tensor cores, 320 GB/s GDDR6, 16 GB, 70 W.
    pub fn t4_16gb() -> Self {
        Self {
            name: "t4-16gb".into(),
            peak_flops: 65e12,
            mem_bw: 320.0 * GB,
            memory_bytes: 16 * GIB,
            flop_efficiency: 0.4,
            bw_efficiency: 0.75,
            measured: false,
            loss_placement: LossPlacement::Device,
        }
    }

    /// A device preset by name: `cpu`, `a100`, `h100`, `v100`, `t4` (the `-80gb` style
    /// full names are accepted too).
    pub fn preset(name: &str) -> Result<Self, BalanceError> {
        let spec = match name.to_ascii_lowercase().as_str() {
            "cpu" => Self::cpu_default(),
            "a100" | "a100-80gb" => Self::a100_80gb(),
            "h100" | "h100-80gb" => Self::h100_80gb(),
            "v100" | "v100-32gb" => Self::v100_32gb(),
            "t4" | "t4-16gb" => Self::t4_16gb(),
            other => {
                return Err(BalanceError::InvalidDevice(format!(
                    "unknown device preset {other:?} (known: cpu, a100, h100, v100, t4)"
                )))
            }
        };
        Ok(spec)
    }

    /// Checks that rates and efficiencies are positive and finite.
    pub fn validate(&self) -> Result<(), BalanceError> {
        let checks = [
            ("peak_flops", self.peak_flops),
            ("mem_bw", self.mem_bw),
            ("flop_efficiency", self.flop_efficiency),
            ("bw_efficiency", self.bw_efficiency),
        ];
        for (field, value) in checks {
            if !(value.is_finite() && value > 0.0) {
                return Err(BalanceError::InvalidDevice(format!(
                    "{}: {field} must be positive and finite, got {value}",
                    self.name
                )));
            }
        }
        if self.flop_efficiency > 1.0 || self.bw_efficiency > 1.0 {
            return Err(BalanceError::InvalidDevice(format!(
                "{}: efficiencies must be at most 1",
                self.name
            )));
        }
        if self.memory_bytes == 0 {
            return Err(BalanceError::InvalidDevice(format!(
                "{}: memory_bytes is 0",
                self.name
            )));
        }
        Ok(())
    }

    /// Achieved matrix-multiply FLOP/s.
    pub fn achieved_flops(&self) -> f64 {
        self.peak_flops * self.flop_efficiency
    }

    /// Achieved streaming bandwidth, bytes/s.
    pub fn achieved_bw(&self) -> f64 {
        self.mem_bw * self.bw_efficiency
    }

    /// Roofline time of a kernel: `max(flops / achieved FLOP/s, bytes / achieved bandwidth)`.
    pub fn roofline_s(&self, flops: f64, bytes: f64) -> f64 {
        (flops / self.achieved_flops()).max(bytes / self.achieved_bw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_rank_by_speed() {
        let names = ["cpu", "a100", "h100", "v100", "t4"];
        for n in names {
            DeviceSpec::preset(n).unwrap().validate().unwrap();
        }
        let h = DeviceSpec::h100_80gb().achieved_flops();
        let a = DeviceSpec::a100_80gb().achieved_flops();
        let v = DeviceSpec::v100_32gb().achieved_flops();
        assert!(h > a && a > v);
    }

    #[test]
    fn unknown_preset_and_bad_numbers_are_errors() {
        let e = DeviceSpec::preset("tpu").unwrap_err();
        assert!(e.to_string().contains("\"tpu\""), "{e}");
        let e = DeviceSpec::measured("cpu", 0.0, 1e9, 1, LossPlacement::Host).unwrap_err();
        assert!(e.to_string().contains("peak_flops"), "{e}");
        let e = DeviceSpec::measured("cpu", 1e9, f64::NAN, 1, LossPlacement::Host).unwrap_err();
        assert!(e.to_string().contains("mem_bw"), "{e}");
    }

    #[test]
    fn roofline_picks_the_binding_limit() {
        let d = DeviceSpec::measured("x", 100.0, 10.0, 1, LossPlacement::Device).unwrap();
        assert_eq!(d.roofline_s(1000.0, 10.0), 10.0);
        assert_eq!(d.roofline_s(100.0, 1000.0), 100.0);
    }
}
