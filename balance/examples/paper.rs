//! The paper's comparison, **simulated**: for 8/16/32/64 devices and two model sizes, the
//! best hybrid layout against the best single-mode (DP-only, TP-only, PP-only) layout, with
//! adaptive balancing on and off, on a homogeneous and a heterogeneous cluster.
//!
//! Writes `paper.md` (tables and the reasons), `paper.json` (`{"rows": [...]}`, one
//! [`PaperRow`] per cluster × model × devices × balancing) and `paper.svg` (throughput and
//! utilization ratios hybrid / best single-mode against devices) into the folder named by
//! `--out DIR`, else `$MESHREC_BENCH_DIR`, else `target/bench`; prints the markdown.
//!
//! `cargo xtask bench paper`, or
//! `cargo run --release -p meshrec-balance --example paper -- --out target/bench`

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};

use meshrec_balance::plan::{plan, PaperRow, Plan, PlanRequest};
use meshrec_balance::report::fmt_bytes;
use meshrec_balance::{Candidate, Cluster, ModelShape, StepPart};
use plotters::prelude::*;

const CLUSTERS: [&str; 2] = ["a100x8", "a100+v100x8"];
const MODELS: [&str; 2] = ["100m", "1b"];
const DEVICES: [usize; 4] = [8, 16, 32, 64];
const GLOBAL_BATCH: usize = 1024;
/// The paper's claims: hybrid over single-mode.
const CLAIM_THROUGHPUT: f64 = 1.3;
const CLAIM_UTILIZATION: f64 = 1.2;

fn out_dir() -> Result<PathBuf, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(std::env::var_os("MESHREC_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/bench"))),
        [flag, dir] if flag == "--out" => Ok(PathBuf::from(dir)),
        other => Err(format!("unexpected arguments {other:?} (use --out DIR)").into()),
    }
}

/// A short layout label: the `sync` that every layout here shares dropped.
fn short(label: &str) -> String {
    label.replace(" sync", "")
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

struct Run {
    row: Option<PaperRow>,
    plan: Result<Plan, String>,
}

fn markdown(runs: &[Run]) -> String {
    let mut md = String::new();
    let shapes: Vec<ModelShape> = MODELS
        .iter()
        .filter_map(|m| ModelShape::preset_by_name(m).ok())
        .collect();
    md.push_str("# Hybrid against single-mode parallelism — SIMULATED\n\n");
    md.push_str(
        "Every number on this page is **simulated** by `meshrec-balance` (roofline compute of \
         each device, alpha-beta links shared with `meshrec-comm`, discrete-event pipeline and \
         bucketed DP); nothing was measured. For each cluster, model, device count and \
         adaptive balancing on/off, the planner enumerates every DP×TP×PP mesh, schedule \
         (GPipe, 1F1B, interleaved v2/v4), micro-batch count (1–64) and DP compression (none, \
         top-k 1%) that fits in memory, and the best hybrid layout is compared with the best \
         DP-only, TP-only and PP-only layout (\"best single\" is the fastest of the three). \
         Ratios are hybrid / best single.\n\n",
    );
    md.push_str(&format!("Global batch {GLOBAL_BATCH} sequences. Models: "));
    md.push_str(
        &shapes
            .iter()
            .map(|s| {
                format!(
                    "`{}` = {:.2}B parameters (catalogue {} items, d {}, {} blocks, {} heads, seq {})",
                    s.name,
                    s.params() as f64 / 1e9,
                    s.vocab,
                    s.d_model,
                    s.n_layers,
                    s.n_heads,
                    s.seq_len
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    md.push_str(&format!(
        ". Clusters (modelled links, nominal per-direction rates): {}.\n\n",
        clusters()
    ));
    md.push_str("## Best hybrid against best single-mode (simulated)\n\n");
    md.push_str("| cluster | model | devices | balance | best hybrid | samples/s | util | best DP-only | samples/s | best TP-only | samples/s | best PP-only | samples/s | best single | throughput ratio | utilization ratio |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let score = |s: &Option<meshrec_balance::LayoutScore>| {
        s.as_ref().map_or(("-".to_string(), "-".to_string()), |s| {
            (short(&s.layout), format!("{:.0}", s.samples_per_s))
        })
    };
    for run in runs {
        match (&run.row, &run.plan) {
            (Some(r), _) => {
                let (dl, ds) = score(&r.best_dp);
                let (tl, ts) = score(&r.best_tp);
                let (pl, ps) = score(&r.best_pp);
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {:.0} | {:.1}% | {dl} | {ds} | {tl} | {ts} | {pl} | {ps} | {} | **{:.2}** | **{:.2}** |\n",
                    r.cluster,
                    r.model,
                    r.devices,
                    on_off(r.balance),
                    short(&r.best_hybrid),
                    r.hybrid_samples_per_s,
                    100.0 * r.hybrid_utilization,
                    r.best_single_class,
                    r.throughput_ratio,
                    r.utilization_ratio,
                ));
            }
            (None, Ok(p)) => md.push_str(&format!(
                "| {} | {} | {} | {} | no hybrid or no single-mode layout fits | | | | | | | | | | - | - |\n",
                p.cluster,
                p.model,
                p.devices,
                on_off(p.balance)
            )),
            (None, Err(e)) => md.push_str(&format!("| {e} | | | | | | | | | | | | | | | |\n")),
        }
    }
    md.push_str("\n## Layouts with pipeline parallelism (simulated)\n\n");
    md.push_str(
        "Adaptive balancing (the min–max partitioner with the heavy embedding and \
         catalogue-wide head, and the speed-proportional DP batch split) only changes layouts \
         with `pp > 1` or devices of different speeds, so the best layout that pipelines shows \
         its effect best:\n\n",
    );
    md.push_str("| cluster | model | devices | best with pp>1, balance on | samples/s | bubble | balance off | samples/s | bubble | on / off |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let mut pairs: BTreeMap<(String, String, usize), [Option<&Plan>; 2]> = BTreeMap::new();
    for run in runs {
        if let Ok(p) = &run.plan {
            let e = pairs
                .entry((p.cluster.clone(), p.model.clone(), p.devices))
                .or_default();
            e[usize::from(!p.balance)] = Some(p);
        }
    }
    for cluster in CLUSTERS {
        for model in MODELS {
            for devices in DEVICES {
                let Some([Some(on), Some(off)]) =
                    pairs.get(&(cluster.to_string(), model.to_string(), devices))
                else {
                    continue;
                };
                let (Some(a), Some(b)) = (&on.best_pipelined, &off.best_pipelined) else {
                    continue;
                };
                md.push_str(&format!(
                    "| {cluster} | {model} | {devices} | {} | {:.0} | {:.1}% | {} | {:.0} | {:.1}% | {:.2} |\n",
                    short(&a.config.label()),
                    a.result.samples_per_s,
                    100.0 * a.result.bubble,
                    short(&b.config.label()),
                    b.result.samples_per_s,
                    100.0 * b.result.bubble,
                    a.result.samples_per_s / b.result.samples_per_s,
                ));
            }
        }
    }
    md.push_str(&summary(runs));
    md.push_str("\n## Why, in the planner's words (simulated)\n\n");
    for run in runs {
        let Ok(p) = &run.plan else { continue };
        if p.balance && (p.devices == 8 || p.devices == 64) {
            md.push_str(&format!(
                "- **{} {} {} devices**: {}\n",
                p.cluster, p.model, p.devices, p.explanation
            ));
        }
    }
    md
}

fn summary(runs: &[Run]) -> String {
    let rows: Vec<&PaperRow> = runs.iter().filter_map(|r| r.row.as_ref()).collect();
    let n = rows.len();
    let count = |f: &dyn Fn(&PaperRow) -> bool| rows.iter().filter(|r| f(r)).count();
    let wins = count(&|r| r.throughput_ratio > 1.0);
    let claim_t = count(&|r| r.throughput_ratio >= CLAIM_THROUGHPUT);
    let claim_u = count(&|r| r.utilization_ratio >= CLAIM_UTILIZATION);
    let mut s = String::from("\n## What meshrec gets (simulated)\n\n");
    s.push_str(&format!(
        "The paper claims +30% throughput and +20% utilization for hybrid over single-mode \
         parallelism. In this simulation the best hybrid layout is faster than the best \
         single-mode one in {wins} of {n} rows; it reaches the +30% throughput claim in \
         {claim_t} and the +20% utilization claim in {claim_u}.\n\n"
    ));
    s.push_str("| devices | throughput ratio (min / mean / max) | utilization ratio (min / mean / max) |\n|---|---|---|\n");
    for d in DEVICES {
        let sel: Vec<&&PaperRow> = rows.iter().filter(|r| r.devices == d).collect();
        if sel.is_empty() {
            continue;
        }
        let stats = |f: &dyn Fn(&PaperRow) -> f64| {
            let v: Vec<f64> = sel.iter().map(|r| f(r)).collect();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            format!("{min:.2} / {mean:.2} / {max:.2}")
        };
        s.push_str(&format!(
            "| {d} | {} | {} |\n",
            stats(&|r| r.throughput_ratio),
            stats(&|r| r.utilization_ratio)
        ));
    }
    // Data-driven observations.
    let plans: Vec<&Plan> = runs.iter().filter_map(|r| r.plan.as_ref().ok()).collect();
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *classes.entry(r.best_single_class.as_str()).or_default() += 1;
    }
    s.push_str("\nObservations (computed from the rows above):\n\n");
    s.push_str(&format!(
        "- The best single-mode layout is {} of the {n} rows.\n",
        classes
            .iter()
            .map(|(c, k)| format!("{c} in {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for d in DEVICES {
        let sel: Vec<&&PaperRow> = rows.iter().filter(|r| r.devices == d).collect();
        let won = sel.iter().filter(|r| r.throughput_ratio > 1.0).count();
        // Exposed synchronisation share of the step, best single vs best hybrid.
        let share = |c: &meshrec_balance::Candidate| c.result.breakdown.sync_s / c.result.step_s;
        let mut sync_single = Vec::new();
        let mut sync_hybrid = Vec::new();
        for p in plans.iter().filter(|p| p.devices == d) {
            if let (Some(single), Some(hybrid)) = (p.best_single(), p.best_hybrid.as_ref()) {
                sync_single.push(share(single));
                sync_hybrid.push(share(hybrid));
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        s.push_str(&format!(
            "- {d} devices: hybrid wins in {won} of {} rows; exposed DP synchronisation is {:.0}% of the best single-mode layout's step against {:.0}% of the best hybrid's (mean).\n",
            sel.len(),
            100.0 * mean(&sync_single),
            100.0 * mean(&sync_hybrid),
        ));
    }
    // Per (model, devices) pair of a cluster: best overall samples/s with balancing on over
    // off, and whether the winner with it on pipelines.
    let gain = |cluster: &str| {
        let mut v = Vec::new();
        for on in plans.iter().filter(|p| p.cluster == cluster && p.balance) {
            if let Some(off) = plans.iter().find(|p| {
                p.cluster == cluster && !p.balance && p.model == on.model && p.devices == on.devices
            }) {
                v.push((
                    on.best.result.samples_per_s / off.best.result.samples_per_s,
                    on.best.config.mesh.pp > 1,
                ));
            }
        }
        v
    };
    for cluster in CLUSTERS {
        let v = gain(cluster);
        if v.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = v.iter().map(|g| g.0).collect();
        let same: Vec<&(f64, bool)> = v.iter().filter(|g| (g.0 - 1.0).abs() <= 1e-3).collect();
        let unpipelined = same.iter().filter(|g| !g.1).count();
        s.push_str(&format!(
            "- Adaptive balancing on {cluster}: the best layout overall is {}x as fast with balancing on as with it off; {} of {} (model, devices) pairs differ by more than 0.1%; of the {} that do not, {unpipelined} winners have pp = 1.\n",
            span(&ratios),
            v.len() - same.len(),
            v.len(),
            same.len(),
        ));
    }
    s.push_str(&why(runs));
    s
}

/// The clusters as their presets define them: devices, devices per node and the two link
/// classes (from `meshrec_comm`'s link table).
fn clusters() -> String {
    let n = DEVICES[DEVICES.len() - 1];
    CLUSTERS
        .iter()
        .filter_map(|name| Cluster::preset(name, n).ok())
        .map(|c| {
            let mut kinds: Vec<&str> = Vec::new();
            for d in &c.devices {
                if !kinds.contains(&d.name.as_str()) {
                    kinds.push(&d.name);
                }
            }
            format!(
                "`{}` ({} per node, {}; inside a node {}, between nodes {} per GPU)",
                c.name,
                c.topology.devices_per_node,
                kinds.join(" and "),
                c.topology.intra.describe(),
                c.topology.inter.describe()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `a–b` of the values, or `a` when they are equal at two decimals.
fn span(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if format!("{lo:.2}") == format!("{hi:.2}") {
        format!("{lo:.2}")
    } else {
        format!("{lo:.2}–{hi:.2}")
    }
}

/// Which part of the step accounts for most of the faster layout's lead, tallied over
/// `rows`: `pipeline idle in 3 (on average 12% of the slower layout's step), ...`.
fn dominant_parts(rows: &[&PaperRow]) -> String {
    // Per part: rows it dominates, and what it saves as a share of the slower layout's step.
    let mut parts: BTreeMap<StepPart, (usize, f64)> = BTreeMap::new();
    let mut hidden = 0;
    for r in rows {
        let c = &r.comparison;
        match c.dominant {
            Some(p) => {
                let e = parts.entry(p).or_default();
                e.0 += 1;
                e.1 += c.gap(p) / c.slower_step_s;
            }
            None => hidden += 1,
        }
    }
    let mut by_count: Vec<(StepPart, (usize, f64))> = parts.into_iter().collect();
    by_count.sort_by_key(|b| std::cmp::Reverse(b.1 .0));
    let mut out: Vec<String> = by_count
        .iter()
        .map(|(p, (k, share))| {
            format!(
                "{p} in {k} (saving on average {:.0}% of the slower layout's step)",
                100.0 * share / *k as f64
            )
        })
        .collect();
    if hidden > 0 {
        out.push(format!(
            "in {hidden} no part of the mean device's step (the breakdown does not show where)"
        ));
    }
    out.join(", ")
}

/// Bytes per link class: `a intra-node / b inter-node`, mean over the plans' layouts.
fn mean_bytes(cands: &[&Candidate]) -> String {
    let n = cands.len().max(1) as f64;
    let intra = cands.iter().map(|c| c.result.bytes.intra).sum::<f64>() / n;
    let inter = cands.iter().map(|c| c.result.bytes.inter).sum::<f64>() / n;
    format!(
        "{} intra-node / {} inter-node",
        fmt_bytes(intra),
        fmt_bytes(inter)
    )
}

/// Why the hybrid wins or loses, per device count, written from the rows' comparisons
/// (which layout is faster, by what ratio, which part of the step makes the difference)
/// and the plans' bytes per link class.
fn why(runs: &[Run]) -> String {
    let mut s = String::from(
        "\nWhy (SIMULATED; every statement below is counted from the rows above: a row's \
         faster layout, its lead, and the part of the mean device's step — compute, TP \
         all-reduce, pipeline idle, DP sync/wait, optimizer — where the faster layout saves \
         the most time, as a share of the slower layout's mean step by the breakdown):\n\n",
    );
    for d in DEVICES {
        let sel: Vec<&Run> = runs
            .iter()
            .filter(|r| r.row.as_ref().is_some_and(|row| row.devices == d))
            .collect();
        if sel.is_empty() {
            continue;
        }
        let rows: Vec<&PaperRow> = sel.iter().filter_map(|r| r.row.as_ref()).collect();
        let won: Vec<&PaperRow> = rows
            .iter()
            .copied()
            .filter(|r| r.comparison.first_faster && r.comparison.speedup > 1.0)
            .collect();
        let lost: Vec<&PaperRow> = rows
            .iter()
            .copied()
            .filter(|r| !r.comparison.first_faster)
            .collect();
        let tied = rows.len() - won.len() - lost.len();
        let mut line = format!("- {d} devices: the best hybrid layout is ");
        let mut clauses = Vec::new();
        if !won.is_empty() {
            let v: Vec<f64> = won.iter().map(|r| r.comparison.speedup).collect();
            clauses.push(format!(
                "faster in {} of {} rows ({}x the best single-mode layout's samples/s; most of its lead is {})",
                won.len(),
                rows.len(),
                span(&v),
                dominant_parts(&won)
            ));
        }
        if !lost.is_empty() {
            let v: Vec<f64> = lost.iter().map(|r| r.comparison.speedup).collect();
            let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &lost {
                *classes.entry(r.best_single_class.as_str()).or_default() += 1;
            }
            clauses.push(format!(
                "slower in {} of {} rows (the best single-mode layout — {} — reaches {}x its samples/s; most of that lead is {})",
                lost.len(),
                rows.len(),
                classes
                    .iter()
                    .map(|(c, k)| format!("{c} in {k}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                span(&v),
                dominant_parts(&lost)
            ));
        }
        if tied > 0 {
            clauses.push(format!("as fast in {tied} of {} rows", rows.len()));
        }
        line.push_str(&clauses.join("; and "));
        let plans: Vec<&Plan> = sel.iter().filter_map(|r| r.plan.as_ref().ok()).collect();
        let hybrids: Vec<&Candidate> = plans
            .iter()
            .filter_map(|p| p.best_hybrid.as_ref())
            .collect();
        let singles: Vec<&Candidate> = plans.iter().filter_map(|p| p.best_single()).collect();
        line.push_str(&format!(
            ". Bytes per step (mean): best hybrid {}, best single-mode {}.\n",
            mean_bytes(&hybrids),
            mean_bytes(&singles)
        ));
        s.push_str(&line);
    }
    s
}

/// The plot's x coordinate of `devices`: `100 · log2(devices)`.
fn log_x(devices: usize) -> i32 {
    ((devices as f64).log2() * 100.0).round() as i32
}

fn plot(runs: &[Run], path: &Path) -> Result<(), Box<dyn Error>> {
    let rows: Vec<&PaperRow> = runs.iter().filter_map(|r| r.row.as_ref()).collect();
    let root = SVGBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(40);
    top.titled(
        "SIMULATED: best hybrid / best single-mode layout (meshrec-balance, nothing measured)",
        ("sans-serif", 20),
    )?;
    let panels = body.split_evenly((1, 2));
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    let ymax = rows
        .iter()
        .map(|r| r.throughput_ratio.max(r.utilization_ratio))
        .fold(1.5f64, f64::max)
        * 1.1;
    let ymin = rows
        .iter()
        .map(|r| r.throughput_ratio.min(r.utilization_ratio))
        .fold(1.0f64, f64::min)
        * 0.9;
    type Metric = fn(&PaperRow) -> f64;
    let metrics: [(&str, f64, Metric); 2] = [
        (
            "throughput ratio (samples/s)",
            CLAIM_THROUGHPUT,
            |r: &PaperRow| r.throughput_ratio,
        ),
        (
            "utilization ratio (mean compute-busy fraction)",
            CLAIM_UTILIZATION,
            |r: &PaperRow| r.utilization_ratio,
        ),
    ];
    for (panel, (title, claim, value)) in panels.iter().zip(metrics) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(
                // log2(devices) in hundredths, labelled at 8, 16, 32, 64.
                (280i32..620).with_key_points(vec![300, 400, 500, 600]),
                ymin..ymax,
            )?;
        chart
            .configure_mesh()
            .x_desc("devices")
            .y_desc("hybrid / best single-mode")
            .x_label_formatter(&|x| format!("{}", 2f64.powf(f64::from(*x) / 100.0).round()))
            .draw()?;
        for (level, label) in [
            (1.0, "parity".to_string()),
            (claim, format!("paper claim {claim:.1}x")),
        ] {
            let grey = RGBColor(120, 120, 120);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(280, level), (620, level)],
                    6,
                    4,
                    grey.stroke_width(1),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey));
        }
        let mut k = 0;
        for cluster in CLUSTERS {
            for model in MODELS {
                let color = colors[k % colors.len()];
                k += 1;
                for balance in [true, false] {
                    let pts: Vec<(i32, f64)> = DEVICES
                        .iter()
                        .filter_map(|&d| {
                            rows.iter()
                                .find(|r| {
                                    r.cluster == cluster
                                        && r.model == model
                                        && r.devices == d
                                        && r.balance == balance
                                })
                                .map(|r| (log_x(d), value(r)))
                        })
                        .collect();
                    if pts.is_empty() {
                        continue;
                    }
                    let name = format!("{model} on {cluster}, balance {}", on_off(balance));
                    if balance {
                        chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                            .label(name)
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                            });
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                    } else {
                        chart
                            .draw_series(DashedLineSeries::new(
                                pts.clone(),
                                4,
                                3,
                                color.stroke_width(1),
                            ))?
                            .label(name)
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 16, y)], color)
                            });
                        chart.draw_series(
                            pts.iter()
                                .map(|&p| TriangleMarker::new(p, 5, color.stroke_width(1))),
                        )?;
                    }
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = out_dir()?;
    std::fs::create_dir_all(&dir)?;
    let mut runs = Vec::new();
    for cluster_name in CLUSTERS {
        for model in MODELS {
            for devices in DEVICES {
                for balance in [true, false] {
                    let mut req =
                        PlanRequest::from_names(model, cluster_name, devices, GLOBAL_BATCH)?;
                    req.balance = balance;
                    let plan = plan(&req).map_err(|e| {
                        format!(
                            "{cluster_name} {model} {devices} devices balance {}: {e}",
                            on_off(balance)
                        )
                    });
                    let row = plan.as_ref().ok().and_then(PaperRow::from_plan);
                    runs.push(Run { row, plan });
                }
            }
        }
    }
    let md = markdown(&runs);
    let rows: Vec<&PaperRow> = runs.iter().filter_map(|r| r.row.as_ref()).collect();
    let json = serde_json::json!({
        "simulated": true,
        "note": "SIMULATED by meshrec-balance (roofline compute, alpha-beta links); nothing measured",
        "global_batch": GLOBAL_BATCH,
        "clusters": CLUSTERS,
        "models": MODELS,
        "devices": DEVICES,
        "rows": rows,
    });
    let (md_path, json_path, svg_path) = (
        dir.join("paper.md"),
        dir.join("paper.json"),
        dir.join("paper.svg"),
    );
    std::fs::write(&md_path, &md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    plot(&runs, &svg_path)?;
    print!("{md}");
    eprintln!(
        "SIMULATED paper experiment: wrote {}, {} and {}",
        md_path.display(),
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}
