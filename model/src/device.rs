//! Picking the burn device at run time among the backends compiled in (`flex`, `wgpu`, `cuda`),
//! and where a single-device step keeps its loss and optimizer on it.

use burn::tensor::Device;

use crate::error::ConfigError;

/// Parses `cpu` (Flex), `wgpu` (the default adapter: a discrete GPU, else an integrated one,
/// else the CPU adapter, by wgpu's own preference), `wgpu:cpu`, `wgpu:gpu` (the first adapter
/// that is a card), `wgpu:N` (the N-th adapter wgpu lists), `cuda` or `cuda:N`; names a
/// backend that was not compiled in as an error rather than falling back silently.
pub fn parse_device(name: &str) -> Result<Device, ConfigError> {
    let not_built = |feature: &str| {
        ConfigError::new(
            "device",
            format!("`{name}` needs meshrec built with `--features {feature}`"),
        )
    };
    match name.trim() {
        "cpu" | "flex" => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            #[cfg(not(feature = "flex"))]
            return Err(not_built("flex"));
        }
        other if other == "wgpu" || other.starts_with("wgpu:") => {
            #[cfg(feature = "wgpu")]
            return wgpu_adapter(other.strip_prefix("wgpu:"));
            #[cfg(not(feature = "wgpu"))]
            return Err(not_built("wgpu"));
        }
        other if other == "cuda" || other.starts_with("cuda:") => {
            let index: usize = match other.strip_prefix("cuda:") {
                None => 0,
                Some(i) => i.parse().map_err(|_| {
                    ConfigError::new(
                        "device",
                        format!("`{other}`: the index after `cuda:` is not a number"),
                    )
                })?,
            };
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(index));
            #[cfg(not(feature = "cuda"))]
            {
                let _ = index;
                Err(not_built("cuda"))
            }
        }
        other => Err(ConfigError::new(
            "device",
            format!(
                "unknown device `{other}` (expected cpu, wgpu, wgpu:cpu, wgpu:gpu, wgpu:N, cuda \
                 or cuda:N)"
            ),
        )),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_adapter(choice: Option<&str>) -> Result<Device, ConfigError> {
    use burn::tensor::{DeviceKind, DeviceType};
    let listed = || Device::enumerate(DeviceType::Wgpu).into_vec();
    let names = |devices: &[Device]| {
        devices
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{i}: {}", describe(d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match choice {
        None => Ok(Device::wgpu(DeviceKind::DefaultDevice)),
        Some("cpu") => Ok(Device::wgpu(DeviceKind::Cpu)),
        Some("gpu") => {
            let devices = listed();
            let card = devices
                .iter()
                .find(|d| d.identity().is_some_and(|id| id.physical.is_some()));
            card.cloned().ok_or_else(|| {
                ConfigError::new(
                    "device",
                    format!(
                        "`wgpu:gpu`: wgpu found no GPU adapter (adapters: {})",
                        names(&devices)
                    ),
                )
            })
        }
        Some(index) => {
            let n: usize = index.parse().map_err(|_| {
                ConfigError::new(
                    "device",
                    format!("`wgpu:{index}`: expected `cpu`, `gpu` or an adapter number"),
                )
            })?;
            let devices = listed();
            devices.get(n).cloned().ok_or_else(|| {
                ConfigError::new(
                    "device",
                    format!(
                        "`wgpu:{n}`: wgpu lists {} adapter(s) ({})",
                        devices.len(),
                        names(&devices)
                    ),
                )
            })
        }
    }
}

/// What the device is, for the log: the adapter's own name on a cubecl backend (opening it),
/// `flex (CPU)` on the host backend.
pub fn describe(device: &Device) -> String {
    if runs_on_host(device) {
        return "flex (CPU)".into();
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Some(id) = device.identity() {
        let kind = if id.physical.is_some() {
            "GPU"
        } else {
            "no card: CPU or software adapter"
        };
        return format!("{} ({kind}, {})", id.name, id.fingerprint);
    }
    format!("{device:?}")
}

/// Whether `device` is the host backend (Flex), whose tensors live in host memory: there the
/// catalogue-wide loss and AdamW run on host buffers, the fastest place for them.
pub fn runs_on_host(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        matches!(
            device.clone().inner().as_dispatch(),
            burn::backend::DispatchDevice::Flex(_)
        )
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Where a single-device step runs its loss and optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Loss and AdamW on host buffers (the fused `gemm` kernel, flat `Vec<f32>` state): the
    /// table and hidden rows come down and every gradient and parameter crosses each step.
    Host,
    /// Loss and AdamW as tensor ops on the device: only the batch and a few scalars cross.
    Device,
}

impl Residency {
    /// The fastest for `device`: the host for Flex, the device for everything else.
    pub fn for_device(device: &Device) -> Self {
        if runs_on_host(device) {
            Self::Host
        } else {
            Self::Device
        }
    }
}

/// The device tests run on: `MESHREC_TEST_DEVICE` (e.g. `wgpu` in CI), else the CPU.
pub fn test_device() -> Device {
    let name = std::env::var("MESHREC_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match parse_device(&name) {
        Ok(d) => d,
        Err(e) => panic!("MESHREC_TEST_DEVICE: {e}"),
    }
}
