//! `cargo xtask bench memory`: the memory savers measured on the shipped ml-100k recipe
//! (20 steps of `meshrec train` each for bytes and parameters, `meshrec bench` in 3
//! alternating rounds for step time, one invocation):
//!
//! * ZeRO 0, 1, 2 at dp 2 and 4: the bytes every rank counted from its buffers against
//!   `balance::shape`'s formulas, the step time, and the parameters after the 20 steps
//!   against plain DP's (`meshrec diff`);
//! * recomputation selective and full at dp 2, and sequence parallelism at tp 2, against
//!   neither: the step time and the heap the step allocates above its start (measured by
//!   the binary's counting allocator) against the activation formula.
//!
//! Writes `target/bench/memory.{json,md}`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use meshrec_balance::{ActivationPolicy, ModelShape};
use meshrec_pipeline::{Recompute, ZeroStage};
use serde_json::{json, Value};

use crate::cmd::{bench_dir, meshrec_release};
use crate::recipe::train_ml100k;
use crate::workspace::root;

const STEPS: u64 = 20;
/// Times every case is benchmarked (alternating); step times are medians over them.
const ROUNDS: usize = 3;
/// Steps each `meshrec bench` times.
const BENCH_STEPS: u64 = 30;
/// `configs/ml100k.toml`'s seed.
const SEED: u64 = 42;
/// Steps left out of the step time (allocation, first touch, thread start).
const WARMUP: usize = 3;
const KINDS: [&str; 3] = ["param_bytes", "grad_bytes", "optimizer_bytes"];

/// One run of the bench.
struct Row {
    case: Case,
    /// Per kind, the most any rank held after an update (counted).
    counted: [f64; 3],
    /// `None` where `balance::shape` has no per-rank formula (TP shares).
    formula: Option<[f64; 3]>,
    /// The most the process's heap grew within a step (measured), and the activations the
    /// formula says one micro-batch keeps.
    heap_step_bytes: f64,
    activation_formula_bytes: f64,
    step_ms: f64,
    /// Against the row with zero 0 and no recomputation of the same dp, after 20 steps.
    max_param_rel_diff_vs_plain: f64,
}

/// One configuration of the bench.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Case {
    dp: usize,
    tp: usize,
    zero: ZeroStage,
    activations: ActivationPolicy,
}

impl Case {
    fn layout(&self) -> String {
        format!("dp{}·tp{}", self.dp, self.tp)
    }

    fn name(&self) -> String {
        format!(
            "dp{}-tp{}-{}-recompute-{}{}",
            self.dp,
            self.tp,
            self.zero,
            self.activations.recompute,
            if self.activations.sequence_parallel {
                "-sp"
            } else {
                ""
            }
        )
    }

    /// The same layout with nothing saved: what this case is measured against.
    fn plain(&self) -> Self {
        Self {
            zero: ZeroStage::Off,
            activations: ActivationPolicy::default(),
            ..*self
        }
    }

    fn sets(&self) -> Vec<String> {
        vec![
            format!("parallel.dp={}", self.dp),
            format!("parallel.tp={}", self.tp),
            format!("dp.zero={}", self.zero.number()),
            format!("train.recompute=\"{}\"", self.activations.recompute),
            format!(
                "parallel.sequence_parallel={}",
                self.activations.sequence_parallel
            ),
        ]
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The step lines of a run's `metrics.jsonl`.
fn step_lines(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        if v["kind"] == "step" {
            lines.push(v);
        }
    }
    if lines.len() <= WARMUP {
        bail!(
            "{}: {} step lines, want more than {WARMUP}",
            path.display(),
            lines.len()
        );
    }
    Ok(lines)
}

/// Median over the steps after the warm-up of `f(line)`.
fn median_after_warmup(
    lines: &[Value],
    what: &str,
    f: impl Fn(&Value) -> Option<f64>,
) -> Result<f64> {
    let xs = lines[WARMUP..]
        .iter()
        .map(|l| f(l).with_context(|| format!("a step line has no {what}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(median(xs))
}

/// Per kind, the most any rank held (`memory_peak` of `summary.json`).
fn counted(summary: &Value, what: &str) -> Result<[f64; 3]> {
    let ranks = summary["memory_peak"]
        .as_array()
        .with_context(|| format!("{what}: summary.json has no memory_peak"))?;
    let mut out = [0.0f64; 3];
    for r in ranks {
        for (o, k) in out.iter_mut().zip(KINDS) {
            *o = o.max(r[k].as_f64().with_context(|| format!("{what}: no {k}"))?);
        }
    }
    Ok(out)
}

fn diff(a: &Path, b: &Path) -> Result<f64> {
    let mut cmd = meshrec_release();
    cmd.current_dir(root()).arg("diff").arg(a).arg(b);
    let out = cmd.output().context("running meshrec diff")?;
    if !out.status.success() {
        bail!(
            "meshrec diff {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("meshrec diff printed no JSON")?;
    v["max_rel_diff"]
        .as_f64()
        .context("meshrec diff printed no max_rel_diff")
}

/// Trains 20 steps of the shipped recipe (its seed) with `sets`, into `runs/name`.
fn train(runs: &Path, name: &str, sets: &[String]) -> Result<(Value, Vec<Value>)> {
    let sets: Vec<String> = sets
        .iter()
        .cloned()
        .chain([format!("train.max_steps={STEPS}")])
        .collect();
    let summary = train_ml100k(name, SEED, &sets, runs)?;
    Ok((summary, step_lines(&runs.join(name))?))
}

pub fn bench() -> Result<()> {
    let runs = bench_dir().join("memory-runs");
    let case = |dp, tp, zero, recompute, sequence_parallel| Case {
        dp,
        tp,
        zero,
        activations: ActivationPolicy {
            recompute,
            sequence_parallel,
        },
    };
    let mut cases = Vec::new();
    for dp in [2usize, 4] {
        for zero in [ZeroStage::Off, ZeroStage::Optimizer, ZeroStage::Gradients] {
            cases.push(case(dp, 1, zero, Recompute::None, false));
        }
    }
    // Recomputation against the dp 2 row that keeps everything (the mesh executor, as
    // recomputation needs); sequence parallelism against tp 2 without it.
    for recompute in [Recompute::Selective, Recompute::Full] {
        cases.push(case(2, 1, ZeroStage::Off, recompute, false));
    }
    cases.push(case(1, 2, ZeroStage::Off, Recompute::None, false));
    cases.push(case(1, 2, ZeroStage::Off, Recompute::None, true));
    // Bytes, heap and parameters from one 20-step training run per case.
    let mut first: Vec<Value> = Vec::with_capacity(cases.len());
    let mut heap: Vec<f64> = Vec::with_capacity(cases.len());
    for case in &cases {
        let name = case.name();
        let (summary, lines) = train(&runs, &name, &case.sets())?;
        heap.push(median_after_warmup(&lines, "heap_step_peak_bytes", |l| {
            l["heap_step_peak_bytes"].as_f64()
        })?);
        first.push(summary);
    }
    // Step time from `meshrec bench` (steady-state steps after a warm-up), every case once
    // per round, rounds one after the other, so that a slow stretch of this shared machine
    // falls on all cases alike; the median over the rounds.
    let mut step_ms: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        for (i, case) in cases.iter().enumerate() {
            step_ms[i].push(bench_step_ms(&runs, case, round)?);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        let name = case.name();
        let summary = std::mem::take(&mut first[i]);
        let shape: ModelShape = serde_json::from_value(summary["shape"].clone())
            .with_context(|| format!("{name}: summary.json has no model shape"))?;
        let params = summary["params"]
            .as_u64()
            .with_context(|| format!("{name}: summary.json has no params"))?;
        // The formulas hold a DP rank's whole replica; a TP rank holds a share that
        // `balance::shape` does not split per parameter, so TP rows report counts only.
        let state = shape.precision.rank_state_bytes(params, case.dp, case.zero);
        let formula = (case.tp == 1).then_some([state.param, state.grad, state.optimizer]);
        let batch = batch_size(&runs.join(&name))?;
        let tokens = batch / case.dp as f64 * shape.seq_len as f64;
        let plain = case.plain();
        let diff = if plain == case {
            0.0
        } else {
            diff(&runs.join(plain.name()), &runs.join(&name))?
        };
        rows.push(Row {
            case,
            counted: counted(&summary, &name)?,
            formula,
            heap_step_bytes: heap[i],
            activation_formula_bytes: shape.model_activation_bytes(
                case.tp as u32,
                case.activations,
                tokens,
            ) * (case.dp * case.tp) as f64,
            step_ms: median(step_ms[i].clone()),
            max_param_rel_diff_vs_plain: diff,
        });
    }
    report(&rows)
}

/// One `meshrec bench` of `case`: milliseconds per step of the shipped batch.
fn bench_step_ms(runs: &Path, case: &Case, round: usize) -> Result<f64> {
    let json = runs.join(format!("{}-bench{round}.json", case.name()));
    let v = crate::cmd::meshrec_bench(meshrec_release(), &case.sets(), BENCH_STEPS, &json)?;
    let (batch, sps) = (v["batch"].as_f64(), v["samples_per_s"].as_f64());
    match (batch, sps) {
        (Some(b), Some(s)) if s > 0.0 => Ok(1000.0 * b / s),
        _ => bail!("{}: no batch or samples_per_s", json.display()),
    }
}

/// `train.batch_size` of a run (its `config.toml`).
fn batch_size(run_dir: &Path) -> Result<f64> {
    let path = run_dir.join("config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
    value
        .get("train")
        .and_then(|t| t.get("batch_size"))
        .and_then(toml::Value::as_integer)
        .map(|n| n as f64)
        .with_context(|| format!("{}: no train.batch_size", path.display()))
}

fn report(rows: &[Row]) -> Result<()> {
    let dir = bench_dir();
    let mut md = String::from(
        "# Memory savers on the shipped recipe (configs/ml100k.toml, 20 steps, local engine, this machine)\n\n\
         State bytes are the most any rank held after an update, counted from its buffers; formulas are \
         `balance::shape`'s (fp32 AdamW: 4 + 4 + 8 bytes per parameter; ZeRO-1 divides the 8 by dp, ZeRO-2 \
         the gradient's 4 too). Heap per step is measured by the binary's counting allocator: the most the \
         process allocated above the step's start (activations, autodiff graphs, loss chunks, buffers of every \
         rank in the process), median over the steps after 3 warm-up steps; the activation formula counts \
         only the stash the paper counts. Step time: `meshrec bench` (30 steps after 3 warm-up \
         steps), the median over 3 rounds that bench every case in turn. All rows come from one \
         invocation.\n\n\
         | layout | zero | recompute | sequence parallel | params MB (counted / formula) | grads MB | AdamW MB | heap per step MB | activation formula MB (all ranks) | step ms | step cost | max param rel diff vs plain | targets |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json_rows = Vec::new();
    for r in rows {
        let c = &r.case;
        let plain = rows.iter().find(|p| p.case == c.plain());
        let cost = plain.map_or(f64::NAN, |p| r.step_ms / p.step_ms - 1.0);
        let heap_saved = plain.map_or(f64::NAN, |p| 1.0 - r.heap_step_bytes / p.heap_step_bytes);
        let within = r.formula.map(|f| {
            r.counted
                .iter()
                .zip(&f)
                .all(|(c, f)| (c - f).abs() / f <= 0.01)
        });
        let exact = r.max_param_rel_diff_vs_plain <= 1e-6;
        let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
        let mut targets = Vec::new();
        if let Some(within) = within {
            targets.push(format!("bytes within 1%: {}", verdict(within)));
        }
        // The bar for ZeRO; recomputation and sequence parallelism reorder float
        // sums (their gradients match to rounding, which AdamW's first step can amplify).
        if c.zero != ZeroStage::Off {
            targets.push(format!("params within 1e-6: {}", verdict(exact)));
        }
        let bar = match (c.zero, c.activations.recompute) {
            (ZeroStage::Off, Recompute::None) => None,
            (_, Recompute::None) => Some(0.05),
            (_, Recompute::Selective) => Some(0.10),
            (_, Recompute::Full) => Some(0.35),
        };
        if let Some(bar) = bar {
            targets.push(format!(
                "step cost <= {:.0}%: {}",
                100.0 * bar,
                verdict(cost <= bar)
            ));
        }
        if c.activations != ActivationPolicy::default() {
            targets.push(format!(
                "heap per step {:.0}% below the plain row",
                100.0 * heap_saved
            ));
        }
        let mb = |i: usize| match r.formula {
            Some(f) => format!("{:.3} / {:.3}", r.counted[i] / 1e6, f[i] / 1e6),
            None => format!("{:.3} / n/a", r.counted[i] / 1e6),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:+.1}% | {:.1e} | {} |\n",
            c.layout(),
            c.zero.number(),
            c.activations.recompute,
            if c.activations.sequence_parallel { "on" } else { "off" },
            mb(0),
            mb(1),
            mb(2),
            r.heap_step_bytes / 1e6,
            r.activation_formula_bytes / 1e6,
            r.step_ms,
            100.0 * cost,
            r.max_param_rel_diff_vs_plain,
            targets.join("; "),
        ));
        let by_kind = |v: &[f64; 3]| {
            KINDS
                .iter()
                .zip(v)
                .map(|(k, x)| (k.to_string(), json!(x)))
                .collect::<serde_json::Map<_, _>>()
        };
        json_rows.push(json!({
            "layout": c.layout(),
            "zero": c.zero.number(),
            "recompute": c.activations.recompute.name(),
            "sequence_parallel": c.activations.sequence_parallel,
            "counted_bytes": by_kind(&r.counted),
            "formula_bytes": r.formula.as_ref().map(by_kind),
            "heap_step_peak_bytes": r.heap_step_bytes,
            "activation_formula_bytes": r.activation_formula_bytes,
            "step_ms": r.step_ms,
            "step_cost_vs_plain": cost,
            "max_param_rel_diff_vs_plain": r.max_param_rel_diff_vs_plain,
            "bytes_within_1pct": within,
        }));
    }
    md.push_str(
        "\nA row is measured against the same layout without memory savers (`step cost`, `vs \
         plain`). The activation formula is one micro-batch's stash per rank times the ranks in the \
         process (the heap counts them all).\n",
    );
    std::fs::write(dir.join("memory.md"), &md)?;
    std::fs::write(
        dir.join("memory.json"),
        serde_json::to_string_pretty(&json!({ "steps": STEPS, "rows": json_rows }))?,
    )?;
    print!("{md}");
    Ok(())
}
