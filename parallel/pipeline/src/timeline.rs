//! What each pipeline stage did and when: the events of a step (measured on the monotonic
//! clock by the executor, or modelled by the simulator), the utilization and bubble
//! computed from them, and a Gantt chart in SVG. One vocabulary for both.

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
    /// A pipeline activation or gradient leaving (the executor: posting the send; the
    /// simulator: the transfer on the link).
    Send,
    /// Waiting for a pipeline activation or gradient to arrive.
    Recv,
    /// Blocking tensor-parallel all-reduces inside a forward or backward.
    TpAllReduce,
    /// Completing gradients inside the model-parallel group after backward: partial TP
    /// gradients of replicated parameters, the tied item table between first and last stage.
    GradAllReduce,
    /// Data-parallel gradient (or local SGD parameter) synchronisation.
    DpAllReduce,
    Optimizer,
    Other,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        Self::Forward,
        Self::Backward,
        Self::Optimizer,
        Self::Send,
        Self::Recv,
        Self::TpAllReduce,
        Self::GradAllReduce,
        Self::DpAllReduce,
        Self::Other,
    ];
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

/// Records events in seconds since one origin, on the monotonic clock.
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

    /// Seconds since the origin, monotonic.
    pub fn now_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Runs `f` and records an event of `kind` spanning it.
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

    /// Adds an event timed elsewhere (against the same origin).
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events so far, leaving the recorder empty (same origin).
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

/// Time covered by events of the given kinds, overlapping intervals counted once; empty,
/// reversed or non-finite intervals count nothing.
pub fn busy_s(events: &[Event], kinds: &[EventKind]) -> f64 {
    let mut spans: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| {
            kinds.contains(&e.kind)
                && e.start_s.is_finite()
                && e.end_s.is_finite()
                && e.end_s > e.start_s
        })
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

/// Utilization and bubble of a step of `wall_s` seconds from the stages' events.
/// Utilization of a stage: compute-busy time (forward, backward, optimizer; overlaps
/// counted once) over `wall_s`, capped at 1. Bubble: mean over stages of
/// `1 - (forward + backward busy) / wall_s`, the idle fraction of a pipeline stage inside
/// the step. All zero when there are no stages or `wall_s` is not a positive number.
pub fn step_stats(timelines: &[StageTimeline], wall_s: f64) -> StepStats {
    const COMPUTE: [EventKind; 3] = [
        EventKind::Forward,
        EventKind::Backward,
        EventKind::Optimizer,
    ];
    const PIPELINE: [EventKind; 2] = [EventKind::Forward, EventKind::Backward];
    if timelines.is_empty() || !(wall_s.is_finite() && wall_s > 0.0) {
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

/// How an event kind is drawn: colour, legend name and the vertical extent inside its
/// row (compute as full boxes, communication as thin bars at the bottom).
fn style(kind: EventKind) -> (RGBColor, &'static str, f64, f64) {
    match kind {
        EventKind::Forward => (RGBColor(66, 133, 244), "forward", 0.2, 0.9),
        EventKind::Backward => (RGBColor(52, 168, 83), "backward", 0.2, 0.9),
        EventKind::Optimizer => (RGBColor(120, 120, 120), "optimizer", 0.2, 0.9),
        EventKind::Send => (RGBColor(251, 188, 5), "send", 0.02, 0.14),
        EventKind::Recv => (RGBColor(255, 112, 67), "recv", 0.02, 0.14),
        EventKind::TpAllReduce => (RGBColor(171, 71, 188), "tp all-reduce", 0.02, 0.14),
        EventKind::GradAllReduce => (RGBColor(121, 85, 72), "grad all-reduce", 0.02, 0.14),
        EventKind::DpAllReduce => (RGBColor(234, 67, 53), "dp all-reduce", 0.02, 0.14),
        EventKind::Other => (RGBColor(190, 190, 190), "other", 0.02, 0.14),
    }
}

/// Draws a Gantt chart of one step: one row per stage (top to bottom in the order
/// given), forwards and backwards as coloured boxes labelled with their micro-batch
/// (`mb.chunk` when some event has a chunk above 0), the optimizer as a grey box,
/// sends, receives and all-reduces as thin bars, time in ms. Creates the parent
/// directory if missing.
pub fn write_svg(
    path: &Path,
    title: &str,
    timelines: &[StageTimeline],
) -> Result<(), TimelineError> {
    let fail = |reason: String| TimelineError {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let finite = |e: &&Event| e.start_s.is_finite() && e.end_s.is_finite();
    let end_ms = timelines
        .iter()
        .flat_map(|t| t.events.iter().filter(finite).map(|e| e.end_s * 1e3))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let rows = timelines.len().max(1);
    let height = 110 + 44 * rows as u32;
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    // Rows are ROW units high on an integer axis whose key points are the row centres.
    const ROW: i32 = 100;
    let to_y = |row_from_bottom: usize, at: f64| {
        row_from_bottom as i32 * ROW + (at * f64::from(ROW)).round() as i32
    };
    let rows_i = i32::try_from(rows).map_err(|_| fail(format!("{rows} rows")))?;
    let row_centres: Vec<i32> = (0..rows_i).map(|i| i * ROW + ROW / 2).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d(
            0.0..end_ms * 1.12,
            (0..rows_i * ROW).with_key_points(row_centres),
        )
        .map_err(|e| fail(e.to_string()))?;
    let row_label = |y: &i32| {
        let from_top = rows.saturating_sub(1 + (y / ROW).max(0) as usize);
        timelines
            .get(from_top)
            .map(|t| t.label.clone())
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&row_label)
        .x_desc("time (ms)")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    let interleaved = timelines
        .iter()
        .flat_map(|t| t.events.iter().filter_map(|e| e.chunk))
        .any(|c| c > 0);
    for kind in EventKind::ALL {
        let (color, name, lo, hi) = style(kind);
        let corners: Vec<[(f64, i32); 2]> = timelines
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                let row = rows - 1 - i;
                t.events
                    .iter()
                    .filter(finite)
                    .filter(move |e| e.kind == kind)
                    .map(move |e| {
                        [
                            (e.start_s * 1e3, to_y(row, lo)),
                            (e.end_s * 1e3, to_y(row, hi)),
                        ]
                    })
            })
            .collect();
        if corners.is_empty() {
            continue;
        }
        let boxes = corners.iter().map(|c| Rectangle::new(*c, color.filled()));
        chart
            .draw_series(boxes)
            .map_err(|e| fail(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        // White outlines keep back-to-back boxes of one kind apart.
        chart
            .draw_series(
                corners
                    .iter()
                    .map(|c| Rectangle::new(*c, WHITE.stroke_width(1))),
            )
            .map_err(|e| fail(e.to_string()))?;
    }
    for (i, t) in timelines.iter().enumerate() {
        let row = rows - 1 - i;
        let labels = t
            .events
            .iter()
            .filter(finite)
            .filter(|e| matches!(e.kind, EventKind::Forward | EventKind::Backward))
            .filter_map(|e| {
                let mb = e.micro_batch?;
                let label = match e.chunk {
                    Some(c) if interleaved => format!("{mb}.{c}"),
                    _ => mb.to_string(),
                };
                let x = e.start_s * 1e3 + (e.end_s - e.start_s) * 1e3 * 0.1;
                Some(Text::new(
                    label,
                    (x, to_y(row, 0.68)),
                    ("sans-serif", 11).into_font().color(&WHITE),
                ))
            });
        chart.draw_series(labels).map_err(|e| fail(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(e.to_string()))?;
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

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// The contents of the `<text>` elements of an SVG document.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                t.split_once('>')
                    .and_then(|(_, rest)| rest.split("</text>").next())
            })
            .map(|s| s.trim().to_string())
            .collect()
    }

    #[test]
    fn busy_time_merges_overlaps() {
        let events = [
            ev(EventKind::Forward, 0, 0.0, 1.0),
            ev(EventKind::Backward, 0, 0.5, 2.0),
            ev(EventKind::Forward, 1, 0.2, 0.4), // inside the first
            ev(EventKind::Forward, 1, 3.0, 4.0),
            ev(EventKind::Backward, 1, 4.0, 4.5), // touching
            ev(EventKind::Send, 1, 4.0, 9.0),
            ev(EventKind::Forward, 2, 6.0, 5.0), // reversed: nothing
            ev(EventKind::Forward, 2, f64::NAN, 7.0), // not a number: nothing
        ];
        let fb = [EventKind::Forward, EventKind::Backward];
        assert!(close(busy_s(&events, &fb), 2.0 + 1.5));
        assert!(close(busy_s(&events, &[EventKind::Forward]), 1.0 + 1.0));
        assert!(close(busy_s(&events, &[EventKind::Send]), 5.0));
        assert_eq!(busy_s(&events, &[EventKind::DpAllReduce]), 0.0);
        assert_eq!(busy_s(&[], &fb), 0.0);
        // Order of the events does not matter.
        let mut reversed = events.to_vec();
        reversed.reverse();
        assert!(close(busy_s(&reversed, &fb), 3.5));
    }

    #[test]
    fn stats_of_a_two_stage_step() {
        // Wall 4 s. Stage 0: forward 0–1, backward 2–4, optimizer 3.5–4 (overlaps the
        // backward): compute 3 s, pipeline 3 s. Stage 1: forward 1–2, backward 2–3,
        // optimizer 3–3.5, receive 0–1 (not compute): compute 2.5 s, pipeline 2 s.
        let a = StageTimeline {
            rank: 0,
            label: "s0".into(),
            events: vec![
                ev(EventKind::Forward, 0, 0.0, 1.0),
                ev(EventKind::Backward, 0, 2.0, 4.0),
                ev(EventKind::Optimizer, 0, 3.5, 4.0),
            ],
        };
        let b = StageTimeline {
            rank: 1,
            label: "s1".into(),
            events: vec![
                ev(EventKind::Recv, 0, 0.0, 1.0),
                ev(EventKind::Forward, 0, 1.0, 2.0),
                ev(EventKind::Backward, 0, 2.0, 3.0),
                ev(EventKind::Optimizer, 0, 3.0, 3.5),
            ],
        };
        let s = step_stats(&[a.clone(), b.clone()], 4.0);
        assert!(close(s.wall_s, 4.0));
        assert!(
            close(s.utilization_mean, (3.0 / 4.0 + 2.5 / 4.0) / 2.0),
            "{s:?}"
        );
        assert!(close(s.utilization_min, 2.5 / 4.0), "{s:?}");
        assert!(
            close(s.bubble, ((1.0 - 3.0 / 4.0) + (1.0 - 2.0 / 4.0)) / 2.0),
            "{s:?}"
        );

        let none = step_stats(&[], 4.0);
        assert_eq!((none.utilization_mean, none.bubble), (0.0, 0.0));
        for wall in [0.0, -1.0, f64::NAN] {
            let s = step_stats(&[a.clone(), b.clone()], wall);
            assert_eq!(
                (s.utilization_mean, s.utilization_min, s.bubble),
                (0.0, 0.0, 0.0)
            );
        }
        // Busy beyond the wall time is capped: utilization 1, bubble 0.
        let s = step_stats(&[a], 1.0);
        assert!(
            close(s.utilization_min, 1.0) && close(s.bubble, 0.0),
            "{s:?}"
        );
    }

    #[test]
    fn events_serialize_in_snake_case() {
        let e = Event {
            kind: EventKind::DpAllReduce,
            micro_batch: None,
            chunk: Some(1),
            start_s: 0.5,
            end_s: 0.75,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains("\"kind\":\"dp_all_reduce\""), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        let t = StageTimeline {
            rank: 3,
            label: "stage 3".into(),
            events: vec![e],
        };
        let back: StageTimeline =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn svg_has_a_label_per_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/t.svg");
        // Micro-batches 1..=3 over 1–4 s: the ms axis ticks are never 1, 2 or 3.
        let mut events: Vec<Event> = (1..=3)
            .map(|mb| ev(EventKind::Forward, mb, mb as f64, mb as f64 + 0.5))
            .collect();
        events.push(ev(EventKind::Send, 3, 3.5, 3.6));
        events.push(ev(EventKind::Backward, 7, 3.6, 4.0));
        let t0 = StageTimeline {
            rank: 0,
            label: "stage 0".into(),
            events,
        };
        let t1 = StageTimeline {
            rank: 1,
            label: "stage 1".into(),
            events: vec![ev(EventKind::DpAllReduce, 0, 0.0, 0.5)],
        };
        write_svg(&path, "a <test> & more", &[t0, t1]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg"));
        let labels = texts(&svg);
        for mb in ["1", "2", "3", "7"] {
            let n = labels.iter().filter(|l| *l == mb).count();
            assert_eq!(n, 1, "label {mb}: {labels:?}");
        }
        for want in [
            "stage 0",
            "stage 1",
            "forward",
            "backward",
            "send",
            "dp all-reduce",
            "time (ms)",
        ] {
            assert!(
                labels.iter().any(|l| l == want),
                "{want} missing: {labels:?}"
            );
        }
        assert!(svg.contains("&lt;test&gt; &amp; more"));
    }

    #[test]
    fn svg_labels_chunks_when_interleaved_and_handles_empty_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.svg");
        let t = StageTimeline {
            rank: 0,
            label: "stage 0".into(),
            events: vec![
                Event {
                    chunk: Some(1),
                    ..ev(EventKind::Forward, 4, 0.0, 0.001)
                },
                ev(EventKind::Forward, 5, 0.001, 0.002),
            ],
        };
        write_svg(&path, "interleaved", &[t]).unwrap();
        let labels = texts(&std::fs::read_to_string(&path).unwrap());
        assert!(
            labels.iter().any(|l| l == "4.1") && labels.iter().any(|l| l == "5.0"),
            "{labels:?}"
        );

        let empty = dir.path().join("empty.svg");
        write_svg(&empty, "nothing", &[]).unwrap();
        assert!(std::fs::read_to_string(&empty).unwrap().contains("<svg"));
    }

    #[test]
    fn svg_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "not a directory").unwrap();
        let path = blocker.join("t.svg");
        let err = write_svg(&path, "x", &[]).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
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
        assert!(e.start_s >= 0.0 && r.now_s() >= e.end_s);
        r.push(ev(EventKind::Send, 0, 1.0, 2.0));
        assert_eq!(r.events().len(), 2);
        let taken = r.take();
        assert_eq!(taken.len(), 2);
        assert!(r.events().is_empty());
        r.push(ev(EventKind::Send, 0, 1.0, 2.0));
        r.clear();
        assert!(r.events().is_empty());
        let origin = Instant::now();
        let later = Recorder::starting_at(origin);
        assert_eq!(later.origin(), origin);
    }
}
