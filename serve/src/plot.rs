//! SVG figures: latency against throughput (one line per series, a point per load level)
//! and the autoscaler's load step (workers and p95 over time).

use std::path::Path;

use plotters::prelude::*;

use crate::error::ServeError;
use crate::loadgen::StepSample;

/// One line of a latency-throughput figure: `(throughput rps, latency ms)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn range(values: impl Iterator<Item = f64> + Clone, from_zero: bool) -> std::ops::Range<f64> {
    let finite = values.filter(|v| v.is_finite());
    let lo = if from_zero {
        0.0
    } else {
        finite.clone().fold(f64::INFINITY, f64::min)
    };
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return 0.0..1.0;
    }
    lo..hi * 1.08
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Latency (ms) against throughput (requests/s), one line per series.
pub fn latency_throughput(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), ServeError> {
    let draw = || -> DrawResult {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(range(xs, true), range(ys, true))?;
        chart
            .configure_mesh()
            .x_desc("throughput (requests/s)")
            .y_desc(y_label)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| ServeError::io(path, e))
}

/// The load step: client concurrency and active workers (left axis) and p95 latency (right
/// panel) over time.
pub fn load_step(path: &Path, title: &str, samples: &[StepSample]) -> Result<(), ServeError> {
    let draw = || -> DrawResult {
        let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let (left, right) = root.split_horizontally(550);
        let ts = samples.iter().map(|s| s.t_s);
        let workers_max = samples.iter().map(|s| s.active_workers).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&left)
            .caption("active workers (and clients / 16)", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(range(ts.clone(), true), 0.0..(workers_max.max(4.0) + 0.5))?;
        chart.configure_mesh().x_desc("time (s)").draw()?;
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t_s, s.active_workers)),
                COLORS[0].stroke_width(2),
            ))?
            .label("active workers")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], COLORS[0].stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t_s, s.concurrency as f64 / 16.0)),
                COLORS[1].stroke_width(1),
            ))?
            .label("clients / 16")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], COLORS[1].stroke_width(1)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        let p95 = samples.iter().map(|s| s.p95_ms);
        let mut chart = ChartBuilder::on(&right)
            .caption("p95 latency (ms)", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(range(ts, true), range(p95, true))?;
        chart.configure_mesh().x_desc("time (s)").draw()?;
        chart.draw_series(LineSeries::new(
            samples
                .iter()
                .filter(|s| s.p95_ms.is_finite())
                .map(|s| (s.t_s, s.p95_ms)),
            COLORS[3].stroke_width(2),
        ))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| ServeError::io(path, e))
}
