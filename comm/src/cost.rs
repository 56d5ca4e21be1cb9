//! The link model and closed-form (alpha-beta) cost formulas of every collective: the one
//! place meshrec's simulated engine and the balance crate's cluster simulator take them from.
//!
//! Model: sending `S` bytes over one link of class `L` takes `L.latency_s + S / L.bandwidth_bytes_per_s`
//! (Hockney's alpha-beta model). Collectives are modelled per algorithm as in Thakur, Rabenseifner
//! and Gropp, "Optimization of Collective Communication Operations in MPICH" (2005), with every
//! rank driving one link at a time (one-port model). Reduction arithmetic is not charged (it is
//! memory-bound and overlaps the transfer in pipelined implementations).
//!
//! Sizes: `bytes` is always the size of the *whole* buffer of the operation — for all-reduce the
//! buffer every rank holds; for reduce-scatter the input of one rank (the output is `bytes / n`);
//! for all-gather the output of one rank (the input is `bytes / n`). That is the `S` of the
//! nccl-tests bus-bandwidth definitions, so `busbw = factor * S / t` inverts these formulas.
//!
//! All functions are pure, return seconds as `f64`, and give `0.0` for a group of one rank.

use serde::{Deserialize, Serialize};

/// One NVLink lane group ("link") moves 25 GB/s per direction in generations 2, 3 and 4
/// alike (NVLink 2: 8 lanes × 25 Gb/s; 3: 4 × 50 Gb/s; 4: 2 × 100 Gb/s); generations differ
/// in links per GPU.
const NVLINK_GBPS_PER_LINK: f64 = 25.0;
/// Latency of a small message over NVLink (order of magnitude), µs.
const NVLINK_LATENCY_US: f64 = 2.0;
/// Latency of a small message over InfiniBand between nodes (order of magnitude), µs.
const IB_LATENCY_US: f64 = 5.0;

/// One class of link: a latency (alpha, seconds per message) and a bandwidth (1/beta, bytes
/// per second) for one direction of one link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkClass {
    /// Time to start one message, in seconds (alpha).
    pub latency_s: f64,
    /// Sustained bandwidth of one link in one direction, in bytes per second (1/beta).
    pub bandwidth_bytes_per_s: f64,
}

impl LinkClass {
    /// A link with `latency_us` microseconds of latency and `gbytes_per_s` GB/s (10^9 bytes)
    /// per direction.
    pub const fn new_us_gbps(latency_us: f64, gbytes_per_s: f64) -> Self {
        Self {
            latency_s: latency_us * 1e-6,
            bandwidth_bytes_per_s: gbytes_per_s * 1e9,
        }
    }
}

/// The link table: every link class meshrec's presets use, one constant per kind, each
/// built from the figures below (no preset elsewhere in the workspace writes a link's
/// numbers).
///
/// Convention: `bandwidth_bytes_per_s` is the nominal datasheet data rate of **one
/// direction** of a device's links to its peers (NVLink: all of a GPU's links together;
/// networks: one NIC port per GPU, as on DGX A100/H100), in GB = 10^9 bytes. That is the
/// `B` of the alpha-beta formulas below: in a ring every rank sends `S/n` and receives
/// `S/n` at once, so each step costs `S/(n·B)` with `B` one direction's rate. Datasheets
/// quote NVLink as the sum of both directions (A100 "600 GB/s"): halve it. The rates are
/// peaks, not achieved (measured NCCL bus bandwidth stays below them), so simulated
/// transfer times are optimistic. Latencies (alpha) are orders of magnitude of a small
/// NCCL/MPI message, not datasheet figures.
impl LinkClass {
    /// NVLink 2 (V100 SXM2): 6 links × 25 GB/s = 150 GB/s per direction (datasheet
    /// "300 GB/s" for both directions); 2 µs. DGX-1's hybrid cube-mesh connects each GPU to
    /// only 4 of its 7 peers, so a ring there may see less.
    pub const NVLINK2_V100: Self = Self::new_us_gbps(NVLINK_LATENCY_US, 6.0 * NVLINK_GBPS_PER_LINK);
    /// NVLink 3 (A100 SXM4): 12 links × 25 GB/s = 300 GB/s per direction (datasheet
    /// "600 GB/s"), to any peer through NVSwitch (DGX A100); 2 µs.
    pub const NVLINK3_A100: Self =
        Self::new_us_gbps(NVLINK_LATENCY_US, 12.0 * NVLINK_GBPS_PER_LINK);
    /// NVLink 4 (H100 SXM5): 18 links × 25 GB/s = 450 GB/s per direction (datasheet
    /// "900 GB/s"), through NVSwitch (DGX H100); 2 µs.
    pub const NVLINK4_H100: Self =
        Self::new_us_gbps(NVLINK_LATENCY_US, 18.0 * NVLINK_GBPS_PER_LINK);
    /// PCIe 4.0 x16: 16 lanes × 16 GT/s × 128/130 (line code) / 8 = 31.5 GB/s per
    /// direction; 5 µs.
    pub const PCIE4_X16: Self = Self::new_us_gbps(5.0, 16.0 * 16.0 * 128.0 / 130.0 / 8.0);
    /// InfiniBand EDR 4x: 100 Gb/s = 12.5 GB/s per direction per port; 5 µs.
    pub const IB_EDR: Self = Self::new_us_gbps(IB_LATENCY_US, 100.0 / 8.0);
    /// InfiniBand HDR 4x: 200 Gb/s = 25 GB/s per direction per port; 5 µs.
    pub const IB_HDR: Self = Self::new_us_gbps(IB_LATENCY_US, 200.0 / 8.0);
    /// InfiniBand NDR 4x: 400 Gb/s = 50 GB/s per direction per port; 5 µs.
    pub const IB_NDR: Self = Self::new_us_gbps(IB_LATENCY_US, 400.0 / 8.0);
    /// 10 Gb/s Ethernet: 1.25 GB/s per direction; 30 µs (a TCP stack's latency).
    pub const ETHERNET_10G: Self = Self::new_us_gbps(30.0, 10.0 / 8.0);
    /// Threads of one process on one host exchanging buffers through shared memory: 5 GB/s
    /// and 5 µs. An assumption (a share of a server's memory copy bandwidth), not a datasheet
    /// figure.
    pub const SHARED_MEMORY: Self = Self::new_us_gbps(5.0, 5.0);

    /// The table, named (for reports and tests).
    pub const TABLE: [(&'static str, Self); 9] = [
        ("V100 NVLink 2", Self::NVLINK2_V100),
        ("A100 NVLink 3", Self::NVLINK3_A100),
        ("H100 NVLink 4", Self::NVLINK4_H100),
        ("PCIe 4.0 x16", Self::PCIE4_X16),
        ("InfiniBand EDR", Self::IB_EDR),
        ("InfiniBand HDR", Self::IB_HDR),
        ("InfiniBand NDR", Self::IB_NDR),
        ("10 Gb/s Ethernet", Self::ETHERNET_10G),
        ("shared memory", Self::SHARED_MEMORY),
    ];

    /// `InfiniBand HDR (25 GB/s per direction, 5 µs)`: the table's name (`custom link` when
    /// it is none of them), bandwidth and latency.
    pub fn describe(&self) -> String {
        // Two decimals, trailing zeros dropped: 31.51, 12.5, 300.
        let short = |x: f64| {
            let s = format!("{x:.2}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        };
        format!(
            "{} ({} GB/s per direction, {} µs)",
            self.table_name().unwrap_or("custom link"),
            short(self.bandwidth_bytes_per_s / 1e9),
            short(self.latency_s * 1e6)
        )
    }

    /// The name of this link in [`LinkClass::TABLE`], if it is one of them.
    pub fn table_name(&self) -> Option<&'static str> {
        Self::TABLE
            .iter()
            .find(|(_, l)| l == self)
            .map(|(name, _)| *name)
    }

    /// Time to move `bytes` over this link as one message: `alpha + bytes * beta`.
    pub fn transfer_time(&self, bytes: f64) -> f64 {
        self.latency_s + self.transfer_bandwidth_time(bytes)
    }

    /// The bandwidth term alone: `bytes * beta`.
    pub fn transfer_bandwidth_time(&self, bytes: f64) -> f64 {
        if self.bandwidth_bytes_per_s > 0.0 {
            bytes / self.bandwidth_bytes_per_s
        } else {
            f64::INFINITY
        }
    }

    /// Whether both numbers are finite and the bandwidth positive (a usable link).
    pub fn is_valid(&self) -> bool {
        self.latency_s.is_finite()
            && self.latency_s >= 0.0
            && self.bandwidth_bytes_per_s.is_finite()
            && self.bandwidth_bytes_per_s > 0.0
    }
}

/// Which class a link between two devices belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LinkKind {
    /// Both devices are on the same node.
    Intra,
    /// The devices are on different nodes.
    Inter,
}

/// A homogeneous cluster: nodes of `devices_per_node` devices; device `d` is on node
/// `d / devices_per_node`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// Devices on one node (at least 1).
    pub devices_per_node: usize,
    /// Link between two devices of the same node.
    pub intra: LinkClass,
    /// Link between devices of different nodes (per device: a NIC per device, as on DGX).
    pub inter: LinkClass,
}

impl Topology {
    /// Node that hosts global device `device`.
    pub fn node_of(&self, device: usize) -> usize {
        device / self.devices_per_node.max(1)
    }

    /// The class of the link between two global devices.
    pub fn link_kind(&self, a: usize, b: usize) -> LinkKind {
        if self.node_of(a) == self.node_of(b) {
            LinkKind::Intra
        } else {
            LinkKind::Inter
        }
    }

    /// The link parameters of a class.
    pub fn link(&self, kind: LinkKind) -> LinkClass {
        match kind {
            LinkKind::Intra => self.intra,
            LinkKind::Inter => self.inter,
        }
    }

    /// The bottleneck link of a group of devices: `inter` when the group spans more than one
    /// node (a flat ring or butterfly over the group then crosses a node boundary at every
    /// step of its critical path), else `intra`.
    pub fn group_link_kind(&self, devices: &[usize]) -> LinkKind {
        match devices.first() {
            Some(&first)
                if devices
                    .iter()
                    .any(|&d| self.node_of(d) != self.node_of(first)) =>
            {
                LinkKind::Inter
            }
            _ => LinkKind::Intra,
        }
    }

    /// The bottleneck link parameters of a group (see [`Topology::group_link_kind`]).
    pub fn group_link(&self, devices: &[usize]) -> LinkClass {
        self.link(self.group_link_kind(devices))
    }
}

/// `ceil(log2(n))` for `n >= 1` (0 for `n <= 1`).
pub fn ceil_log2(n: usize) -> u32 {
    if n <= 1 {
        0
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

fn frac(n: usize) -> f64 {
    (n as f64 - 1.0) / n as f64
}

/// Ring all-reduce (reduce-scatter then all-gather around a ring):
/// `2(n-1)/n * S/B + 2(n-1) * alpha`.
pub fn ring_all_reduce_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * frac(n) * link.transfer_bandwidth_time(bytes) + 2.0 * (n as f64 - 1.0) * link.latency_s
}

/// Recursive-doubling all-reduce (butterfly exchanging the whole buffer):
/// `ceil(log2 n) * (alpha + S/B)`, plus two extra steps (fold in, fan out) when `n` is not a
/// power of two.
pub fn recursive_doubling_all_reduce_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let pof2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = if pof2 == n { 0.0 } else { 2.0 };
    (f64::from(pof2.trailing_zeros()) + extra) * link.transfer_time(bytes)
}

/// Best all-reduce of the two algorithms the engines implement (the choice an auto-tuner
/// makes): `min(ring, recursive doubling)`.
pub fn all_reduce_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    ring_all_reduce_time(n, bytes, link).min(recursive_doubling_all_reduce_time(n, bytes, link))
}

/// The algorithm [`all_reduce_time`] picks for these numbers.
pub fn all_reduce_algorithm(n: usize, bytes: f64, link: &LinkClass) -> AllReduceAlgorithm {
    if ring_all_reduce_time(n, bytes, link) <= recursive_doubling_all_reduce_time(n, bytes, link) {
        AllReduceAlgorithm::Ring
    } else {
        AllReduceAlgorithm::RecursiveDoubling
    }
}

/// Bytes at which ring all-reduce becomes cheaper than recursive doubling on `link` for `n`
/// ranks under this model (`None` when one of them always wins, e.g. `n <= 2`).
pub fn ring_crossover_bytes(n: usize, link: &LinkClass) -> Option<f64> {
    if n <= 2 {
        return None;
    }
    // ring: a1 + b1*S, rd: a2 + b2*S; equal at S = (a1 - a2) / (b2 - b1).
    let a1 = ring_all_reduce_time(n, 0.0, link);
    let b1 = ring_all_reduce_time(n, 1.0, link) - a1;
    let a2 = recursive_doubling_all_reduce_time(n, 0.0, link);
    let b2 = recursive_doubling_all_reduce_time(n, 1.0, link) - a2;
    (b2 > b1 && a1 > a2).then(|| (a1 - a2) / (b2 - b1))
}

/// The all-reduce algorithms the engines implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AllReduceAlgorithm {
    /// Reduce-scatter + all-gather around a ring (bandwidth optimal).
    Ring,
    /// Butterfly exchange of the whole buffer (latency optimal).
    RecursiveDoubling,
}

/// Ring reduce-scatter of an input of `bytes` per rank: `(n-1)/n * S/B + (n-1) * alpha`.
pub fn reduce_scatter_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    frac(n) * link.transfer_bandwidth_time(bytes) + (n as f64 - 1.0) * link.latency_s
}

/// Ring all-gather producing `bytes` per rank (input `bytes/n`):
/// `(n-1)/n * S/B + (n-1) * alpha`. Also the cost of a ragged all-gather (`all_gatherv`)
/// whose payloads add up to `bytes`.
pub fn all_gather_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    reduce_scatter_time(n, bytes, link)
}

/// Binomial-tree broadcast: `ceil(log2 n) * (alpha + S/B)` (best for small messages).
pub fn tree_broadcast_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    f64::from(ceil_log2(n)) * link.transfer_time(bytes)
}

/// Scatter + ring all-gather broadcast (van de Geijn):
/// `(ceil(log2 n) + n - 1) * alpha + 2(n-1)/n * S/B` (best for large messages).
pub fn scatter_allgather_broadcast_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    (f64::from(ceil_log2(n)) + n as f64 - 1.0) * link.latency_s
        + 2.0 * frac(n) * link.transfer_bandwidth_time(bytes)
}

/// Best of the two broadcasts.
pub fn broadcast_time(n: usize, bytes: f64, link: &LinkClass) -> f64 {
    tree_broadcast_time(n, bytes, link).min(scatter_allgather_broadcast_time(n, bytes, link))
}

/// One point-to-point message: `alpha + S/B`.
pub fn p2p_time(bytes: f64, link: &LinkClass) -> f64 {
    link.transfer_time(bytes)
}

/// Dissemination barrier: `ceil(log2 n) * alpha`.
pub fn barrier_time(n: usize, link: &LinkClass) -> f64 {
    f64::from(ceil_log2(n)) * link.latency_s
}

/// Bytes one rank sends in a ring all-reduce of `bytes`: `2(n-1)/n * S`.
pub fn ring_all_reduce_bytes_per_rank(n: usize, bytes: f64) -> f64 {
    if n <= 1 {
        0.0
    } else {
        2.0 * frac(n) * bytes
    }
}

/// Bytes one rank sends in a recursive-doubling all-reduce of `bytes` (power-of-two part;
/// fold-in / fan-out ranks send one extra copy): `log2(p) * S`.
pub fn recursive_doubling_all_reduce_bytes_per_rank(n: usize, bytes: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let pof2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
    f64::from(pof2.trailing_zeros()) * bytes
}

/// Bytes one rank sends in a ring reduce-scatter or all-gather of `bytes`: `(n-1)/n * S`.
pub fn ring_gather_scatter_bytes_per_rank(n: usize, bytes: f64) -> f64 {
    if n <= 1 {
        0.0
    } else {
        frac(n) * bytes
    }
}

/// nccl-tests bus bandwidth of an all-reduce of `bytes` that took `seconds`:
/// `2(n-1)/n * S / t`, in bytes per second.
pub fn all_reduce_bus_bandwidth(n: usize, bytes: f64, seconds: f64) -> f64 {
    if n <= 1 || seconds <= 0.0 {
        return 0.0;
    }
    2.0 * frac(n) * bytes / seconds
}

/// nccl-tests bus bandwidth of an all-gather or reduce-scatter of `bytes` (the larger
/// buffer) that took `seconds`: `(n-1)/n * S / t`, in bytes per second.
pub fn gather_scatter_bus_bandwidth(n: usize, bytes: f64, seconds: f64) -> f64 {
    if n <= 1 || seconds <= 0.0 {
        return 0.0;
    }
    frac(n) * bytes / seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> LinkClass {
        LinkClass {
            latency_s: 1e-5,
            bandwidth_bytes_per_s: 1e9,
        }
    }

    #[test]
    fn ring_matches_textbook_formula() {
        let l = link();
        let t = ring_all_reduce_time(4, 1e6, &l);
        assert!((t - (2.0 * 3.0 / 4.0 * 1e-3 + 6.0 * 1e-5)).abs() < 1e-12);
        assert_eq!(ring_all_reduce_time(1, 1e9, &l), 0.0);
    }

    #[test]
    fn recursive_doubling_counts_fold_steps() {
        let l = link();
        let step = l.transfer_time(1e3);
        assert!((recursive_doubling_all_reduce_time(4, 1e3, &l) - 2.0 * step).abs() < 1e-15);
        assert!((recursive_doubling_all_reduce_time(5, 1e3, &l) - 4.0 * step).abs() < 1e-15);
        assert!((recursive_doubling_all_reduce_time(2, 1e3, &l) - step).abs() < 1e-15);
    }

    #[test]
    fn crossover_separates_the_algorithms() {
        let l = link();
        let s = ring_crossover_bytes(8, &l).expect("crossover exists for 8 ranks");
        assert_eq!(
            all_reduce_algorithm(8, s * 0.5, &l),
            AllReduceAlgorithm::RecursiveDoubling
        );
        assert_eq!(
            all_reduce_algorithm(8, s * 2.0, &l),
            AllReduceAlgorithm::Ring
        );
    }

    #[test]
    fn bus_bandwidth_inverts_the_ring_bandwidth_term() {
        let l = LinkClass {
            latency_s: 0.0,
            bandwidth_bytes_per_s: 5e9,
        };
        for n in 2..9 {
            let t = ring_all_reduce_time(n, 1e8, &l);
            assert!((all_reduce_bus_bandwidth(n, 1e8, t) - 5e9).abs() < 1.0);
            let t = all_gather_time(n, 1e8, &l);
            assert!((gather_scatter_bus_bandwidth(n, 1e8, t) - 5e9).abs() < 1.0);
        }
    }

    #[test]
    fn link_table_is_per_direction_datasheet_rates() {
        // Datasheets give NVLink as both directions together: V100 300, A100 600, H100 900 GB/s.
        for (link, both_ways) in [
            (LinkClass::NVLINK2_V100, 300e9),
            (LinkClass::NVLINK3_A100, 600e9),
            (LinkClass::NVLINK4_H100, 900e9),
        ] {
            assert_eq!(2.0 * link.bandwidth_bytes_per_s, both_ways);
        }
        // Networks are quoted per direction in Gb/s.
        for (link, gbit) in [
            (LinkClass::IB_EDR, 100e9),
            (LinkClass::IB_HDR, 200e9),
            (LinkClass::IB_NDR, 400e9),
            (LinkClass::ETHERNET_10G, 10e9),
        ] {
            assert_eq!(8.0 * link.bandwidth_bytes_per_s, gbit);
        }
        // PCIe 4.0 x16: ~31.5 GB/s per direction after 128b/130b coding.
        assert!((LinkClass::PCIE4_X16.bandwidth_bytes_per_s - 31.5e9).abs() < 0.01e9);
        for (i, (name, link)) in LinkClass::TABLE.iter().enumerate() {
            assert!(link.is_valid(), "{name}");
            assert_eq!(link.table_name(), Some(*name));
            assert!(LinkClass::TABLE[..i]
                .iter()
                .all(|(n, l)| n != name && l != link));
        }
        assert_eq!(LinkClass::new_us_gbps(1.0, 1.0).table_name(), None);
        assert_eq!(
            LinkClass::IB_HDR.describe(),
            "InfiniBand HDR (25 GB/s per direction, 5 µs)"
        );
        assert_eq!(
            LinkClass::PCIE4_X16.describe(),
            "PCIe 4.0 x16 (31.51 GB/s per direction, 5 µs)"
        );
    }

    #[test]
    fn topology_classifies_links() {
        let topo = Topology {
            devices_per_node: 4,
            intra: LinkClass::NVLINK3_A100,
            inter: LinkClass::IB_EDR,
        };
        assert_eq!(topo.link_kind(0, 3), LinkKind::Intra);
        assert_eq!(topo.link_kind(3, 4), LinkKind::Inter);
        assert_eq!(topo.group_link_kind(&[0, 1, 2]), LinkKind::Intra);
        assert_eq!(topo.group_link_kind(&[0, 4]), LinkKind::Inter);
        assert_eq!(topo.group_link_kind(&[]), LinkKind::Intra);
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(5), 3);
        assert_eq!(ceil_log2(8), 3);
    }
}
