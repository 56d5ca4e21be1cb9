//! The `meshrec simulate` entry point: a run described in the trainer's terms ([`SimSpec`],
//! filled in by the trainer from its configuration), simulated on a cluster preset and
//! rendered as text marked SIMULATED ([`SimReport`]), with the timeline as SVG.
//!
//! Also the number formatting shared by the planner's report.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::cost::{CostProfile, ProfileSource};
use crate::error::BalanceError;
use crate::shape::{ActivationPolicy, ModelShape};
use crate::sim::{simulate, Compression, SimConfig, SimResult};
use meshrec_compress::MethodConfig;
use meshrec_pipeline::timeline::write_svg;
use meshrec_pipeline::{DpMode, Mesh, ScheduleSpec, ZeroStage};

/// One run to simulate, in the trainer's terms (its configuration converted field by
/// field, typed). Build it with [`SimSpec::new`] and set what differs from the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimSpec {
    /// The model (`ModelConfig::shape` in the model crate, or [`ModelShape::preset_by_name`]).
    pub shape: ModelShape,
    /// Cluster preset name ([`Cluster::PRESET_NAMES`]), e.g. `cpu` or `a100x8`.
    pub cluster: String,
    /// Devices in the cluster; `None`: exactly the mesh's world size.
    pub devices: Option<usize>,
    /// The layout.
    pub mesh: Mesh,
    /// Micro-batches per step (per replica).
    pub micro_batches: usize,
    /// The pipeline schedule.
    pub schedule: ScheduleSpec,
    /// Sequences per step over the whole job (the trainer's `train.batch_size`).
    pub global_batch: usize,
    /// DP synchronisation.
    pub dp_mode: DpMode,
    /// The DP gradient compressor ([`Compression::of`]).
    pub compressor: MethodConfig,
    /// DP bucket size in MB (10^6 bytes).
    pub bucket_mb: f64,
    /// Adaptive balancing (partitioner and speed-proportional batch split).
    pub balance: bool,
    /// Explicit transformer blocks per (virtual) stage, instead of the partitioner's.
    pub blocks_per_stage: Option<Vec<usize>>,
    /// A measured `tp` 1 profile to use instead of the roofline model.
    pub profile: Option<CostProfile>,
    /// ZeRO stage, recomputation and sequence parallelism (the trainer's `dp.zero`,
    /// `train.recompute`, `parallel.sequence_parallel`).
    #[serde(default)]
    pub zero: ZeroStage,
    #[serde(default)]
    pub activations: ActivationPolicy,
}

impl SimSpec {
    /// `mesh` on `cluster`: 1F1B with one micro-batch, sync DP without compression, 25 MB
    /// buckets, balancing on.
    pub fn new(
        shape: ModelShape,
        cluster: impl Into<String>,
        mesh: Mesh,
        global_batch: usize,
    ) -> Self {
        Self {
            shape,
            cluster: cluster.into(),
            devices: None,
            mesh,
            micro_batches: 1,
            schedule: ScheduleSpec::ONE_F_ONE_B,
            global_batch,
            dp_mode: DpMode::Sync,
            compressor: MethodConfig::Identity,
            bucket_mb: 25.0,
            balance: true,
            blocks_per_stage: None,
            zero: ZeroStage::Off,
            activations: ActivationPolicy::default(),
            profile: None,
        }
    }

    /// The simulator's configuration and cluster; errors name the offending field.
    pub fn to_config(&self) -> Result<(SimConfig, Cluster), BalanceError> {
        let devices = self.devices.unwrap_or(self.mesh.world_size());
        let cluster = Cluster::preset(&self.cluster, devices)?;
        let mut cfg = SimConfig::new(
            self.shape.clone(),
            self.mesh,
            self.schedule,
            self.micro_batches,
            self.global_batch,
        );
        cfg.dp_mode = self.dp_mode;
        cfg.compression = Compression::of(&self.compressor, &self.shape)?;
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return Err(BalanceError::InvalidLayout {
                layout: cfg.label(),
                reason: format!("bucket_mb {} must be positive", self.bucket_mb),
            });
        }
        cfg.bucket_bytes = (self.bucket_mb * 1e6).round() as u64;
        cfg.balance = self.balance;
        cfg.profile = self.profile.clone();
        cfg.zero = self.zero;
        cfg.recompute = self.activations.recompute;
        cfg.sequence_parallel = self.activations.sequence_parallel;
        if let Some(blocks) = &self.blocks_per_stage {
            cfg.partition = Some(crate::partition::Partition::from_blocks_per_stage(blocks)?);
        }
        cfg.validate(&cluster)?;
        Ok((cfg, cluster))
    }
}

/// A simulated step with what it was simulated for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// What was simulated.
    pub config: SimConfig,
    /// On what.
    pub cluster: Cluster,
    /// The simulated step (with its timeline).
    pub result: SimResult,
}

/// Simulates one step of `spec` (see [`SimSpec::to_config`]) with its timeline recorded.
pub fn simulate_spec(spec: &SimSpec) -> Result<SimReport, BalanceError> {
    let (mut config, cluster) = spec.to_config()?;
    config.record_timeline = true;
    simulate_config(config, cluster)
}

/// Simulates one step of an already built configuration.
pub fn simulate_config(config: SimConfig, cluster: Cluster) -> Result<SimReport, BalanceError> {
    let result = simulate(&config, &cluster)?;
    Ok(SimReport {
        config,
        cluster,
        result,
    })
}

impl SimReport {
    /// The report as text; every number in it is simulated and it says so.
    pub fn render(&self) -> String {
        let c = &self.config;
        let r = &self.result;
        let b = &r.breakdown;
        let mut out = String::new();
        let devices = describe_devices(&self.cluster, c.mesh.world_size());
        out.push_str(&format!(
            "SIMULATED training step (nothing here was measured)\n\
             layout          {}\n\
             model           {} ({:.1}M parameters, vocab {}, d {}, {} blocks, seq {})\n\
             cluster         {} ({devices}; {} per node)\n\
             compute model   {}\n\
             global batch    {} sequences, {} micro-batch(es) per replica, sizes per replica {:?}\n",
            r.layout,
            c.shape.name,
            c.shape.params() as f64 / 1e6,
            c.shape.vocab,
            c.shape.d_model,
            c.shape.n_layers,
            c.shape.seq_len,
            self.cluster.name,
            self.cluster.topology.devices_per_node,
            match c.profile.as_ref().map(|p| &p.source) {
                Some(ProfileSource::Measured) =>
                    "measured per-layer profile, scaled to each micro-batch".to_string(),
                Some(ProfileSource::Modelled { device }) =>
                    format!("given profile modelled for {device}"),
                None => "roofline of each device (achieved FLOP/s and bandwidth) + alpha-beta links"
                    .to_string(),
            },
            c.global_batch,
            c.micro_batches,
            r.replica_micro_batch,
        ));
        out.push_str(&format!(
            "step time       {} (simulated)\n\
             throughput      {:.1} samples/s, {:.0} tokens/s (simulated)\n\
             utilization     mean {:.1}%, min {:.1}% (compute-busy / step)\n\
             bubble          {:.1}% mean; per stage of replica 0: {}\n\
             MFU             {:.1}% of peak\n",
            fmt_s(r.step_s),
            r.samples_per_s,
            r.tokens_per_s,
            100.0 * r.utilization_mean,
            100.0 * r.utilization_min,
            100.0 * r.bubble,
            r.bubble_per_stage
                .iter()
                .map(|x| format!("{:.1}%", 100.0 * x))
                .collect::<Vec<_>>()
                .join(" "),
            100.0 * r.mfu,
        ));
        out.push_str(&format!(
            "time per device compute {}, TP all-reduce {}, pipeline idle {}, DP sync/wait {}, optimizer {} (mean over devices)\n",
            fmt_s(b.compute_s),
            fmt_s(b.tp_comm_s),
            fmt_s(b.pipeline_idle_s),
            fmt_s(b.sync_s),
            fmt_s(b.optimizer_s),
        ));
        out.push_str(&format!(
            "bytes per step  by group: dp {}, tp {}, pp {}; by link class: intra-node {}, inter-node {} (all ranks)\n",
            fmt_bytes(r.bytes.dp),
            fmt_bytes(r.bytes.tp),
            fmt_bytes(r.bytes.pp),
            fmt_bytes(r.bytes.intra),
            fmt_bytes(r.bytes.inter),
        ));
        let peak = r.peak_memory_bytes.iter().copied().max().unwrap_or(0);
        let cap = self
            .cluster
            .devices
            .iter()
            .take(c.mesh.world_size())
            .map(|d| d.memory_bytes)
            .min()
            .unwrap_or(0);
        out.push_str(&format!(
            "memory          peak {} per device of {} ({})\n",
            fmt_mem(peak as f64),
            fmt_mem(cap as f64),
            if r.fits { "fits" } else { "DOES NOT FIT" }
        ));
        out.push_str(&format!(
            "partition       blocks per {}stage {:?}\n",
            if c.schedule.virtual_stages > 1 {
                "virtual "
            } else {
                ""
            },
            r.partition.blocks_per_stage()
        ));
        out.push_str("\nper pipeline device (its TP ranks are identical):\n");
        out.push_str("| replica | stage | ranks | device | utilization | bubble | peak memory |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        const MAX_ROWS: usize = 64;
        let (dp, tp, pp) = (c.mesh.dp, c.mesh.tp, c.mesh.pp);
        let mut rows = 0;
        'outer: for d in 0..dp {
            for s in 0..pp {
                if rows == MAX_ROWS {
                    out.push_str(&format!(
                        "| ... {} more | | | | | | |\n",
                        dp * pp - MAX_ROWS
                    ));
                    break 'outer;
                }
                rows += 1;
                let r0 = c.rank(d, 0, s);
                let ranks = if tp > 1 {
                    format!("{r0}..{}", c.rank(d, tp - 1, s))
                } else {
                    r0.to_string()
                };
                let bubble = if d == 0 {
                    format!("{:.1}%", 100.0 * r.bubble_per_stage[s])
                } else {
                    "-".into()
                };
                out.push_str(&format!(
                    "| {d} | {s} | {ranks} | {} | {:.1}% | {bubble} | {} |\n",
                    self.cluster.devices[r0].name,
                    100.0 * r.utilization[r0],
                    fmt_mem(r.peak_memory_bytes[r0] as f64),
                ));
            }
        }
        out
    }

    /// Draws the step's timeline (the pipeline devices of the first four replicas) as an
    /// SVG Gantt chart at `path`, titled as simulated.
    pub fn write_timeline(&self, path: &Path) -> Result<(), BalanceError> {
        let shown: Vec<_> = self
            .result
            .timeline
            .iter()
            .take(4 * self.config.mesh.pp)
            .cloned()
            .collect();
        let title = format!(
            "SIMULATED: {} · step {}",
            self.result.layout,
            fmt_s(self.result.step_s)
        );
        write_svg(path, &title, &shown).map_err(|e| BalanceError::Io {
            path: path.display().to_string(),
            message: e.reason,
        })
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

fn describe_devices(cluster: &Cluster, used: usize) -> String {
    let mut names: Vec<(String, usize)> = Vec::new();
    for d in cluster.devices.iter().take(used) {
        match names.iter_mut().find(|(n, _)| *n == d.name) {
            Some((_, k)) => *k += 1,
            None => names.push((d.name.clone(), 1)),
        }
    }
    names
        .iter()
        .map(|(n, k)| format!("{k} x {n}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Seconds with a unit that fits: `1.234 s`, `12.3 ms`, `45.6 µs`.
pub fn fmt_s(s: f64) -> String {
    let a = s.abs();
    if a >= 1.0 {
        format!("{s:.3} s")
    } else if a >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else if a < 5e-8 {
        // Below the last printed digit (float residue of a subtraction): zero.
        "0 s".into()
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// Bytes in decimal units: `1.23 GB`, `45.6 MB`.
pub fn fmt_bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if a >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if a >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

/// Memory in binary units with one decimal: `3.0 GiB`, `12.5 MiB`, `4.0 KiB`.
pub fn fmt_mem(b: f64) -> String {
    const KIB: f64 = 1024.0;
    let a = b.abs();
    if a >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if a >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if a >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_builds_the_configuration_it_describes() {
        let mut spec = SimSpec::new(
            ModelShape::preset_100m(),
            "a100x8",
            Mesh::new(2, 2, 2).unwrap(),
            64,
        );
        spec.micro_batches = 4;
        spec.schedule = ScheduleSpec::interleaved(2);
        spec.dp_mode = DpMode::LocalSgd { sync_every: 4 };
        spec.compressor = MethodConfig::TopK { ratio: 0.01 };
        spec.bucket_mb = 10.0;
        let (cfg, cluster) = spec.to_config().unwrap();
        assert_eq!(cluster.len(), 8);
        assert_eq!(cfg.schedule, ScheduleSpec::interleaved(2));
        assert_eq!(cfg.compression.name, "topk1%");
        assert_eq!(cfg.bucket_bytes, 10_000_000);
        assert_eq!(
            cfg.label(),
            "dp2·tp2·pp2 interleaved-v2 m4 local-sgd-k4 topk1%"
        );
    }

    #[test]
    fn bad_specs_are_errors_that_name_the_problem() {
        let base = SimSpec::new(
            ModelShape::preset_100m(),
            "a100x8",
            Mesh::new(2, 1, 1).unwrap(),
            64,
        );
        let err = |f: &dyn Fn(&mut SimSpec)| {
            let mut s = base.clone();
            f(&mut s);
            s.to_config().unwrap_err().to_string()
        };
        assert!(err(&|s| s.cluster = "tpu".into()).contains("a100x8"));
        assert!(err(&|s| s.compressor = MethodConfig::TopK { ratio: 2.0 }).contains("ratio = 2"));
        assert!(
            err(&|s| s.compressor = MethodConfig::Threshold { threshold: 0.1 })
                .contains("depends on the gradients")
        );
        assert!(err(&|s| {
            s.micro_batches = 2;
            s.global_batch = 63;
        })
        .contains("multiple of micro_batches"));
        // The executor's own rules: interleaving needs micro-batches in multiples of pp.
        assert!(err(&|s| {
            s.mesh = Mesh::new(1, 1, 2).unwrap();
            s.schedule = ScheduleSpec::interleaved(2);
            s.micro_batches = 3;
            s.global_batch = 63;
        })
        .contains("multiple of pp"));
        assert!(err(&|s| s.mesh = Mesh::new(1, 5, 1).unwrap()).contains("n_heads"));
    }

    #[test]
    fn report_says_simulated_and_has_every_section() {
        let mut spec = SimSpec::new(
            ModelShape::preset_100m(),
            "a100x8",
            Mesh::new(2, 2, 2).unwrap(),
            64,
        );
        spec.micro_batches = 4;
        let rep = simulate_spec(&spec).unwrap();
        let text = rep.to_string();
        for needle in [
            "SIMULATED",
            "step time",
            "samples/s",
            "utilization     mean",
            "bubble",
            "intra-node",
            "inter-node",
            "time per device",
            "| 1 | 1 | 6..7 |",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.svg");
        rep.write_timeline(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("SIMULATED") && svg.contains("dp1 pp1"));
        let b = rep.result.breakdown;
        assert!((b.total_s() - rep.result.step_s).abs() < 1e-9 * rep.result.step_s);
    }

    #[test]
    fn formatting_picks_units() {
        assert_eq!(fmt_s(1.5), "1.500 s");
        assert_eq!(fmt_s(0.0123), "12.30 ms");
        assert_eq!(fmt_s(4.5e-5), "45.0 µs");
        assert_eq!(fmt_bytes(2.5e9), "2.50 GB");
        assert_eq!(fmt_bytes(3.0e6), "3.0 MB");
        assert_eq!(fmt_mem((3u64 << 30) as f64), "3.0 GiB");
        assert_eq!(fmt_mem((5u64 << 19) as f64), "2.5 MiB");
        assert_eq!(fmt_mem(100.0), "100 B");
    }
}
