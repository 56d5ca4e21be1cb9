//! `meshrec report runs/X`: a finished (or running) run's curves and summary, read back from
//! its `metrics.jsonl` and `summary.json`: the training loss per step and per epoch, and the
//! validation metrics per epoch, drawn as SVG and PNG.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::error::RunError;

/// The curves of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// (step, loss) of every step line.
    pub step_loss: Vec<(f64, f64)>,
    /// (step at the epoch's end, the epoch's mean loss).
    pub epoch_loss: Vec<(f64, f64)>,
    /// (epoch, valid NDCG@10, valid HR@10) of every evaluated epoch.
    pub valid: Vec<(f64, f64, f64)>,
}

/// Reads a run's `metrics.jsonl`; a malformed line is an error naming the file and line.
pub fn read_curves(run_dir: &Path) -> Result<Curves, RunError> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| RunError::io(&path, e))?;
    let mut curves = Curves::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| RunError::Io {
            path: path.clone(),
            message: format!("line {}: {what}", i + 1),
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let num = |key: &str| v.get(key).and_then(Value::as_f64);
        let field = |key: &str| num(key).ok_or_else(|| bad(&format!("no number `{key}`")));
        match v.get("kind").and_then(Value::as_str) {
            Some("step") => curves.step_loss.push((field("step")?, field("loss")?)),
            Some("epoch") => {
                curves.epoch_loss.push((field("step")?, field("loss")?));
                let valid = v.get("valid").ok_or_else(|| bad("no `valid`"))?;
                let metric = |key: &str| valid.get(key).and_then(Value::as_f64);
                if let (Some(ndcg), Some(hr)) = (metric("ndcg@10"), metric("hr@10")) {
                    curves.valid.push((field("epoch")?, ndcg, hr));
                }
            }
            other => return Err(bad(&format!("unknown kind {other:?}"))),
        }
    }
    Ok(curves)
}

/// What `meshrec report` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub svg: PathBuf,
    pub png: PathBuf,
    /// Whether a system font was found for the PNG's text (without one it has none).
    pub png_has_text: bool,
}

/// Draws `curves` into `run_dir/curves.svg`, and rasterises that into `curves.png`.
pub fn draw(run_dir: &Path, title: &str, curves: &Curves) -> Result<Written, RunError> {
    let svg = run_dir.join("curves.svg");
    {
        let root = SVGBackend::new(&svg, (1200, 480)).into_drawing_area();
        plot(&root, title, curves).map_err(|e| RunError::io(&svg, e))?;
    }
    let png = run_dir.join("curves.png");
    let png_has_text = rasterise(&svg, &png)?;
    Ok(Written {
        svg,
        png,
        png_has_text,
    })
}

/// Renders the SVG at `svg` into a PNG at `png` on white; returns whether a sans-serif
/// system font was there for its text.
fn rasterise(svg: &Path, png: &Path) -> Result<bool, RunError> {
    use resvg::{tiny_skia, usvg};
    let text = std::fs::read_to_string(svg).map_err(|e| RunError::io(svg, e))?;
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    let family = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"]
        .into_iter()
        .find(|name| {
            fonts
                .faces()
                .any(|f| f.families.iter().any(|(n, _)| n == name))
        });
    if let Some(name) = family {
        fonts.set_sans_serif_family(name);
    }
    let tree = usvg::Tree::from_str(&text, &options).map_err(|e| RunError::io(svg, e))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| RunError::io(png, "empty picture"))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.save_png(png).map_err(|e| RunError::io(png, e))?;
    Ok(family.is_some())
}

fn range(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad)..(hi + pad)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn plot<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, c: &Curves) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(600);

    let steps = c.step_loss.iter().chain(&c.epoch_loss).map(|p| p.0);
    let losses = c.step_loss.iter().chain(&c.epoch_loss).map(|p| p.1);
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(range(steps), range(losses))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    chart
        .draw_series(LineSeries::new(c.step_loss.iter().copied(), BLUE.mix(0.35)))?
        .label("per step")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.mix(0.35)));
    chart
        .draw_series(LineSeries::new(
            c.epoch_loss.iter().copied(),
            BLUE.stroke_width(2),
        ))?
        .label("epoch mean")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let epochs = c.valid.iter().map(|v| v.0);
    let metrics = c.valid.iter().flat_map(|v| [v.1, v.2]);
    let mut chart = ChartBuilder::on(&right)
        .caption("validation (full ranking)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(range(epochs), range(metrics))?;
    chart.configure_mesh().x_desc("epoch").draw()?;
    for (name, color, pick) in [("NDCG@10", RED, 1usize), ("HR@10", GREEN, 2usize)] {
        let points: Vec<(f64, f64)> = c
            .valid
            .iter()
            .map(|v| (v.0, if pick == 1 { v.1 } else { v.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The run's `summary.json` as text: what was trained, its throughput, the valid and test
/// metrics.
pub fn summary_text(run_dir: &Path) -> Result<String, RunError> {
    let path = run_dir.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(|e| RunError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| RunError::io(&path, e))?;
    let s = |key: &str| {
        v.get(key)
            .map(|x| x.to_string())
            .unwrap_or_else(|| "?".into())
    };
    let mut out =
        format!(
        "{} ({} on {}, {} parameters, device {}): best epoch {} of {}, {:.0} samples/s, {:.0} s\n",
        s("name").trim_matches('"'),
        s("preset").trim_matches('"'),
        s("dataset").trim_matches('"'),
        s("params"),
        s("device").trim_matches('"'),
        s("best_epoch"),
        s("epochs_run"),
        v.get("samples_per_s").and_then(Value::as_f64).unwrap_or(f64::NAN),
        v.get("wall_seconds").and_then(Value::as_f64).unwrap_or(f64::NAN),
    );
    out.push_str(
        "| split | HR@10 | NDCG@10 | MRR@10 | HR@20 | NDCG@20 |\n|---|---|---|---|---|---|\n",
    );
    for split in ["valid", "test"] {
        let m = |k: &str| {
            v.get(split)
                .and_then(|t| t.get(k))
                .and_then(Value::as_f64)
                .map_or("-".to_string(), |x| format!("{x:.4}"))
        };
        out.push_str(&format!(
            "| {split} | {} | {} | {} | {} | {} |\n",
            m("hr@10"),
            m("ndcg@10"),
            m("mrr@10"),
            m("hr@20"),
            m("ndcg@20")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_read_back_and_drawn_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"kind":"step","step":1,"epoch":1,"loss":3.5,"lr":0.001,"samples_per_s":10,"tokens_per_s":100,"skipped":false}"#,
            r#"{"kind":"step","step":2,"epoch":1,"loss":3.0,"lr":0.001,"samples_per_s":10,"tokens_per_s":100,"skipped":false}"#,
            r#"{"kind":"epoch","epoch":1,"step":2,"loss":3.25,"lr":0.001,"samples_per_s":10,"tokens_per_s":100,"skipped_steps":0,"valid":{"ndcg@10":0.05,"hr@10":0.1}}"#,
        ];
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let c = read_curves(dir.path()).unwrap();
        assert_eq!(c.step_loss, vec![(1.0, 3.5), (2.0, 3.0)]);
        assert_eq!(c.epoch_loss, vec![(2.0, 3.25)]);
        assert_eq!(c.valid, vec![(1.0, 0.05, 0.1)]);
        let written = draw(dir.path(), "test run", &c).unwrap();
        let svg = std::fs::read_to_string(&written.svg).unwrap();
        assert!(svg.contains("NDCG@10") && svg.contains("training loss"));
        let bytes = std::fs::read(&written.png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            format!("{}\n{{\"kind\":\"step\",\"step\":3}}\n", lines[0]),
        )
        .unwrap();
        let err = read_curves(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("line 2") && err.contains("loss"),
            "{err}"
        );
    }
}
