//! Clusters: one [`DeviceSpec`] per global device and `meshrec-comm`'s [`Topology`] (devices
//! per node, intra- and inter-node link classes), with named presets such as `a100x8`.
//!
//! Link numbers are modelled presets, never measurements: each is an entry of
//! `meshrec_comm::cost`'s link table ([`LinkClass::TABLE`], nominal per-direction datasheet
//! rates), where the link *formulas* also come from.

use meshrec_comm::cost::{LinkClass, Topology};
use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::error::BalanceError;

/// A set of devices grouped into nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Preset or user name.
    pub name: String,
    /// Device `i` is global rank `i`'s device (node `i / devices_per_node`).
    pub devices: Vec<DeviceSpec>,
    /// Devices per node and link classes.
    pub topology: Topology,
}

impl Cluster {
    /// `n_devices` identical devices, `devices_per_node` to a node.
    pub fn homogeneous(
        name: impl Into<String>,
        device: DeviceSpec,
        n_devices: usize,
        devices_per_node: usize,
        intra: LinkClass,
        inter: LinkClass,
    ) -> Result<Self, BalanceError> {
        let cluster = Self {
            name: name.into(),
            devices: vec![device; n_devices],
            topology: Topology {
                devices_per_node,
                intra,
                inter,
            },
        };
        cluster.validate()?;
        Ok(cluster)
    }

    /// Checks devices and links.
    pub fn validate(&self) -> Result<(), BalanceError> {
        if self.devices.is_empty() {
            return Err(BalanceError::InvalidDevice(format!(
                "cluster {} has no devices",
                self.name
            )));
        }
        if self.topology.devices_per_node == 0 {
            return Err(BalanceError::InvalidDevice(format!(
                "cluster {}: devices_per_node is 0",
                self.name
            )));
        }
        for (what, l) in [
            ("intra", self.topology.intra),
            ("inter", self.topology.inter),
        ] {
            if !l.is_valid() {
                return Err(BalanceError::InvalidDevice(format!(
                    "cluster {}: {what}-node link {l:?} is not usable",
                    self.name
                )));
            }
        }
        for d in &self.devices {
            d.validate()?;
        }
        Ok(())
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the cluster has no devices (never for a validated one).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Whether all devices are the same.
    pub fn is_homogeneous(&self) -> bool {
        self.devices.windows(2).all(|w| w[0] == w[1])
    }

    /// Names [`Cluster::preset`] knows.
    pub const PRESET_NAMES: [&'static str; 5] =
        ["a100x8", "h100x8", "v100x8", "a100+v100x8", "cpu"];

    /// A named preset with `n_devices` devices (modelled numbers; every link is an entry of
    /// `meshrec_comm`'s link table, per-direction datasheet rates, see [`LinkClass::TABLE`]):
    /// - `a100x8`: A100-80GB, 8 per node, [`LinkClass::NVLINK3_A100`] inside, one
    ///   [`LinkClass::IB_HDR`] NIC per GPU between nodes (DGX A100);
    /// - `h100x8`: H100-80GB, 8 per node, [`LinkClass::NVLINK4_H100`] inside, one
    ///   [`LinkClass::IB_NDR`] NIC per GPU between nodes (DGX H100);
    /// - `v100x8`: V100-32GB, 8 per node, [`LinkClass::NVLINK2_V100`] inside, one
    ///   [`LinkClass::IB_EDR`] port per GPU between nodes (optimistic for DGX-1, whose 8
    ///   GPUs share 4 EDR ports);
    /// - `a100+v100x8`: heterogeneous, nodes alternate between A100 and V100 devices, links
    ///   as `v100x8` (the slower generation's network);
    /// - `cpu`: this machine's CPU cores shared by `n_devices` threads on one node (each
    ///   device gets `1/n` of [`DeviceSpec::cpu_default`]'s FLOP/s and bandwidth, memory
    ///   shared), linked by [`LinkClass::SHARED_MEMORY`] (an assumption).
    pub fn preset(name: &str, n_devices: usize) -> Result<Self, BalanceError> {
        if n_devices == 0 {
            return Err(BalanceError::InvalidDevice(format!(
                "preset {name}: 0 devices"
            )));
        }
        match name.to_ascii_lowercase().as_str() {
            "a100x8" => Self::homogeneous(
                "a100x8",
                DeviceSpec::a100_80gb(),
                n_devices,
                8,
                LinkClass::NVLINK3_A100,
                LinkClass::IB_HDR,
            ),
            "h100x8" => Self::homogeneous(
                "h100x8",
                DeviceSpec::h100_80gb(),
                n_devices,
                8,
                LinkClass::NVLINK4_H100,
                LinkClass::IB_NDR,
            ),
            "v100x8" => Self::homogeneous(
                "v100x8",
                DeviceSpec::v100_32gb(),
                n_devices,
                8,
                LinkClass::NVLINK2_V100,
                LinkClass::IB_EDR,
            ),
            "a100+v100x8" => {
                let devices = (0..n_devices)
                    .map(|i| {
                        if (i / 8) % 2 == 0 {
                            DeviceSpec::a100_80gb()
                        } else {
                            DeviceSpec::v100_32gb()
                        }
                    })
                    .collect();
                let c = Self {
                    name: "a100+v100x8".into(),
                    devices,
                    topology: Topology {
                        devices_per_node: 8,
                        intra: LinkClass::NVLINK2_V100,
                        inter: LinkClass::IB_EDR,
                    },
                };
                c.validate()?;
                Ok(c)
            }
            "cpu" => {
                let base = DeviceSpec::cpu_default();
                let n = n_devices as f64;
                let share = DeviceSpec {
                    name: format!("cpu/{n_devices}"),
                    peak_flops: base.peak_flops / n,
                    mem_bw: base.mem_bw / n,
                    memory_bytes: base.memory_bytes / n_devices as u64,
                    ..base
                };
                let shm = LinkClass::SHARED_MEMORY;
                Self::homogeneous("cpu", share, n_devices, n_devices, shm, shm)
            }
            other => Err(BalanceError::InvalidDevice(format!(
                "unknown cluster preset {other:?} (known: {})",
                Self::PRESET_NAMES.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshrec_comm::cost::LinkKind;

    #[test]
    fn presets_place_devices_on_nodes() {
        let c = Cluster::preset("a100x8", 16).unwrap();
        assert_eq!(c.len(), 16);
        assert!(c.is_homogeneous());
        assert_eq!(c.topology.link_kind(0, 7), LinkKind::Intra);
        assert_eq!(c.topology.link_kind(7, 8), LinkKind::Inter);
        let h = Cluster::preset("a100+v100x8", 32).unwrap();
        assert!(!h.is_homogeneous());
        assert_eq!(h.devices[8].name, "v100-32gb");
        assert_eq!(h.devices[16].name, "a100-80gb");
        // Every preset's links are entries of the link table (one source for the numbers).
        for name in Cluster::PRESET_NAMES {
            let t = Cluster::preset(name, 16).unwrap().topology;
            for l in [t.intra, t.inter] {
                assert!(l.table_name().is_some(), "{name}: {l:?}");
            }
        }
        assert_eq!(c.topology.intra, LinkClass::NVLINK3_A100);
        assert_eq!(c.topology.inter, LinkClass::IB_HDR);
        assert_eq!(h.topology.intra, LinkClass::NVLINK2_V100);
        let cpu = Cluster::preset("cpu", 4).unwrap();
        assert!(
            (cpu.devices[0].peak_flops * 4.0 - DeviceSpec::cpu_default().peak_flops).abs() < 1.0
        );
    }

    #[test]
    fn bad_presets_are_errors() {
        let e = Cluster::preset("tpu-pod", 8).unwrap_err().to_string();
        assert!(e.contains("tpu-pod") && e.contains("a100+v100x8"), "{e}");
        for name in Cluster::PRESET_NAMES {
            assert_eq!(Cluster::preset(name, 16).unwrap().len(), 16);
        }
        assert!(Cluster::preset("a100x8", 0).is_err());
        let bad = LinkClass {
            latency_s: 0.0,
            bandwidth_bytes_per_s: 0.0,
        };
        let e = Cluster::homogeneous("x", DeviceSpec::a100_80gb(), 2, 2, bad, bad).unwrap_err();
        assert!(e.to_string().contains("intra-node link"), "{e}");
    }
}
