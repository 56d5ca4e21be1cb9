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
    /// A link with `latency_us` microseconds of latency and `gbytes_per_s` GB/s (10^9 bytes).
    pub fn new_us_gbps(latency_us: f64, gbytes_per_s: f64) -> Self {
        Self {
            latency_s: latency_us * 1e-6,
            bandwidth_bytes_per_s: gbytes_per_s * 1e9,
        }
    }

    /// NVLink 3 (A100) order of magnitude: 2 us, 150 GB/s per direction. A modelled preset.
    pub fn nvlink() -> Self {
        Self::new_us_gbps(2.0, 150.0)
    }

    /// PCIe 4.0 x16 order of magnitude: 5 us, 20 GB/s. A modelled preset.
    pub fn pcie4() -> Self {
        Self::new_us_gbps(5.0, 20.0)
    }

    /// 100 Gb/s InfiniBand / RoCE order of magnitude: 5 us, 12 GB/s. A modelled preset.
    pub fn infiniband_100g() -> Self {
        Self::new_us_gbps(5.0, 12.0)
    }

    /// 10 Gb/s Ethernet with TCP order of magnitude: 30 us, 1.2 GB/s. A modelled preset.
    pub fn ethernet_10g() -> Self {
        Self::new_us_gbps(30.0, 1.2)
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
    fn topology_classifies_links() {
        let topo = Topology {
            devices_per_node: 4,
            intra: LinkClass::nvlink(),
            inter: LinkClass::infiniband_100g(),
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
