//! Picking the burn device at run time among the backends compiled in (`flex`, `wgpu`, `cuda`).

use burn::tensor::Device;

use crate::error::ConfigError;

/// Parses `cpu` (Flex), `wgpu`, `cuda` or `cuda:N`; names a backend that was not compiled in
/// as an error rather than falling back silently.
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
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::Cpu));
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
            format!("unknown device `{other}` (expected cpu, wgpu, cuda or cuda:N)"),
        )),
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
