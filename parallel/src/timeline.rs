//! What each pipeline stage did and when (monotonic clock): the events of a step, the
//! utilization and bubble computed from them, and a Gantt chart in SVG.

use std::path::Path;
use std::time::Instant;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// What a stage was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Forward,
    Backward,
    Send,
    Recv,
    AllReduce,
    Optimizer,
    Other,
}

impl EventKind {
    /// Compute, as opposed to communication or waiting.
    pub fn is_compute(self) -> bool {
        matches!(self, Self::Forward | Self::Backward | Self::Optimizer)
    }
}

/// One interval, in seconds since the recorder's origin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub micro_batch: Option<usize>,
    pub chunk: Option<usize>,
    pub start_s: f64,
    pub end_s: f64,
}

/// Records events against one origin.
#[derive(Debug, Clone)]
pub struct Recorder {
    origin: Instant,
    events: Vec<Event>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A recorder whose times count from `origin` (a step's start, shared by the stages of
    /// one process).
    pub fn starting_at(origin: Instant) -> Self {
        Self {
            origin,
            events: Vec::new(),
        }
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn now_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Runs `f` and records how long it took.
    pub fn record<T>(
        &mut self,
        kind: EventKind,
        micro_batch: Option<usize>,
        chunk: Option<usize>,
        f: impl FnOnce() -> T,
    ) -> T {
        let start_s = self.now_s();
        let out = f();
        let end_s = self.now_s();
        self.events.push(Event {
            kind,
            micro_batch,
            chunk,
            start_s,
            end_s,
        });
        out
    }

    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn clear(&mut self) {
        self.events.clear();
    }
}

/// One stage's events of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTimeline {
    pub rank: usize,
    pub label: String,
    pub events: Vec<Event>,
}

/// Time covered by events of the given kinds, overlapping intervals counted once.
pub fn busy_s(events: &[Event], kinds: &[EventKind]) -> f64 {
    let mut spans: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| kinds.contains(&e.kind) && e.end_s > e.start_s)
        .map(|e| (e.start_s, e.end_s))
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        total += ce - cs;
    }
    total
}

/// Utilization and bubble of one step (DESIGN.md's definitions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub wall_s: f64,
    /// Per stage compute-busy / wall: mean and min.
    pub utilization_mean: f64,
    pub utilization_min: f64,
    /// Mean over stages of the idle fraction: `1 - (forward + backward) / wall`.
    pub bubble: f64,
}

pub fn step_stats(timelines: &[StageTimeline], wall_s: f64) -> StepStats {
    const COMPUTE: [EventKind; 3] = [
        EventKind::Forward,
        EventKind::Backward,
        EventKind::Optimizer,
    ];
    const PIPELINE: [EventKind; 2] = [EventKind::Forward, EventKind::Backward];
    if timelines.is_empty() || wall_s <= 0.0 {
        return StepStats {
            wall_s,
            utilization_mean: 0.0,
            utilization_min: 0.0,
            bubble: 0.0,
        };
    }
    let n = timelines.len() as f64;
    let util: Vec<f64> = timelines
        .iter()
        .map(|t| (busy_s(&t.events, &COMPUTE) / wall_s).min(1.0))
        .collect();
    let bubble = timelines
        .iter()
        .map(|t| 1.0 - (busy_s(&t.events, &PIPELINE) / wall_s).min(1.0))
        .sum::<f64>()
        / n;
    StepStats {
        wall_s,
        utilization_mean: util.iter().sum::<f64>() / n,
        utilization_min: util.iter().copied().fold(f64::INFINITY, f64::min),
        bubble,
    }
}

/// Why a picture could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the timeline {path}: {reason}")]
pub struct TimelineError {
    pub path: String,
    pub reason: String,
}

/// Draws a Gantt chart: one row per stage, forwards and backwards as labelled boxes
/// (micro-batch number, `.chunk` when interleaved), communication as thin bars.
pub fn write_svg(
    path: &Path,
    title: &str,
    timelines: &[StageTimeline],
) -> Result<(), TimelineError> {
    let fail = |reason: String| TimelineError {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let end_ms = timelines
        .iter()
        .flat_map(|t| t.events.iter().map(|e| e.end_s * 1e3))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let rows = timelines.len().max(1);
    let height = 80 + 44 * rows as u32;
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..end_ms, 0.0..rows as f64)
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|y| {
            let i = rows.saturating_sub(1 + y.floor() as usize);
            timelines
                .get(i)
                .map(|t| t.label.clone())
                .unwrap_or_default()
        })
        .x_desc("ms")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    let chunks = timelines
        .iter()
        .flat_map(|t| t.events.iter().filter_map(|e| e.chunk))
        .max()
        .unwrap_or(0);
    for (i, t) in timelines.iter().enumerate() {
        let y0 = (rows - 1 - i) as f64;
        for e in &t.events {
            let (x0, x1) = (e.start_s * 1e3, e.end_s * 1e3);
            let (color, lo, hi) = match e.kind {
                EventKind::Forward => (RGBColor(66, 133, 244), 0.15, 0.85),
                EventKind::Backward => (RGBColor(52, 168, 83), 0.15, 0.85),
                EventKind::Optimizer => (RGBColor(150, 150, 150), 0.15, 0.85),
                EventKind::AllReduce => (RGBColor(234, 67, 53), 0.02, 0.12),
                EventKind::Send | EventKind::Recv => (RGBColor(251, 188, 5), 0.02, 0.12),
                EventKind::Other => (RGBColor(200, 200, 200), 0.02, 0.12),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, y0 + lo), (x1, y0 + hi)],
                    color.filled(),
                )))
                .map_err(|e| fail(e.to_string()))?;
            if matches!(e.kind, EventKind::Forward | EventKind::Backward) {
                let label = match (e.micro_batch, e.chunk) {
                    (Some(mb), Some(c)) if chunks > 0 => format!("{mb}.{c}"),
                    (Some(mb), _) => mb.to_string(),
                    _ => String::new(),
                };
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (x0 + (x1 - x0) * 0.1, y0 + 0.6),
                        ("sans-serif", 11).into_font().color(&WHITE),
                    )))
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, mb: usize, start_s: f64, end_s: f64) -> Event {
        Event {
            kind,
            micro_batch: Some(mb),
            chunk: Some(0),
            start_s,
            end_s,
        }
    }

    #[test]
    fn busy_time_merges_overlaps() {
        let events = [
            ev(EventKind::Forward, 0, 0.0, 1.0),
            ev(EventKind::Backward, 0, 0.5, 2.0),
            ev(EventKind::Forward, 1, 3.0, 4.0),
            ev(EventKind::Send, 1, 4.0, 9.0),
        ];
        assert!((busy_s(&events, &[EventKind::Forward, EventKind::Backward]) - 3.0).abs() < 1e-12);
        assert!((busy_s(&events, &[EventKind::Send]) - 5.0).abs() < 1e-12);
    }

    #[test]
    fn stats_of_a_two_stage_step() {
        // Stage 0 computes 3 of 4 s, stage 1 computes 2 of 4 s.
        let a = StageTimeline {
            rank: 0,
            label: "s0".into(),
            events: vec![
                ev(EventKind::Forward, 0, 0.0, 1.0),
                ev(EventKind::Backward, 0, 2.0, 4.0),
            ],
        };
        let b = StageTimeline {
            rank: 1,
            label: "s1".into(),
            events: vec![
                ev(EventKind::Forward, 0, 1.0, 2.0),
                ev(EventKind::Backward, 0, 2.0, 3.0),
                ev(EventKind::Recv, 0, 0.0, 1.0),
            ],
        };
        let s = step_stats(&[a, b], 4.0);
        assert!((s.utilization_mean - 0.625).abs() < 1e-12);
        assert!((s.utilization_min - 0.5).abs() < 1e-12);
        assert!((s.bubble - 0.375).abs() < 1e-12);
    }

    #[test]
    fn svg_has_a_label_per_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.svg");
        let t = StageTimeline {
            rank: 0,
            label: "stage 0".into(),
            events: (0..3)
                .map(|mb| ev(EventKind::Forward, mb, mb as f64, mb as f64 + 0.5))
                .collect(),
        };
        write_svg(&path, "test", &[t]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("<svg"));
        let labels: Vec<&str> = text
            .split("<text")
            .skip(1)
            .filter_map(|t| {
                t.split_once('>')
                    .and_then(|(_, rest)| rest.split("</text>").next())
            })
            .map(str::trim)
            .collect();
        for mb in 0..3 {
            assert!(
                labels.contains(&mb.to_string().as_str()),
                "label {mb} missing: {labels:?}"
            );
        }
    }

    #[test]
    fn recorder_times_what_it_runs() {
        let mut r = Recorder::new();
        let x = r.record(EventKind::Other, None, None, || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            7
        });
        assert_eq!(x, 7);
        let e = r.events()[0];
        assert!(e.end_s - e.start_s >= 0.005);
    }
}
