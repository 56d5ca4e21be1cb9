//! Pipeline schedules as data: GPipe, 1F1B (PipeDream-flush) and Megatron's interleaved
//! 1F1B, each a list of forward and backward actions per pipeline rank that can be
//! printed, checked for completeness and deadlock freedom, walked in dependency order (the
//! cluster simulator), and executed (`meshrec-parallel`'s executor).
//!
//! Model chunks: with `pp` pipeline ranks and `v` virtual stages there are `pp · v` model
//! chunks; local chunk `c` of rank `d` is model chunk `c · pp + d` (Megatron's interleaved
//! assignment), so model chunk `k` lives on rank `k mod pp`. A forward of chunk `k` sends
//! its output to the rank holding chunk `k + 1`; a backward of chunk `k` sends its input
//! gradient to the rank holding chunk `k - 1`.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::timeline::{Event, EventKind, StageTimeline};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// All forwards, then all backwards (Huang et al. 2019).
    #[serde(rename = "gpipe")]
    GPipe,
    /// PipeDream-flush / Megatron's non-interleaved 1F1B: at most `pp - d` micro-batches
    /// in flight on rank `d`.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Megatron's interleaved 1F1B: `v` model chunks per rank, bubble divided by `v`.
    #[serde(rename = "interleaved")]
    Interleaved,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 3] = [Self::GPipe, Self::OneFOneB, Self::Interleaved];

    /// The name used in configuration files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::GPipe => "gpipe",
            Self::OneFOneB => "1f1b",
            Self::Interleaved => "interleaved",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = ScheduleError;
    /// Accepts the names `gpipe`, `1f1b` and `interleaved`, ignoring case and surrounding
    /// blanks.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| ScheduleError::UnknownKind(s.to_string()))
    }
}

/// A schedule before it meets a pipeline: its kind and the model chunks per pipeline rank.
/// What a config names, the planner enumerates and reports label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub kind: ScheduleKind,
    /// Model chunks per pipeline rank (`v`); above 1 only for [`ScheduleKind::Interleaved`].
    pub virtual_stages: usize,
}

impl ScheduleSpec {
    pub const GPIPE: Self = Self {
        kind: ScheduleKind::GPipe,
        virtual_stages: 1,
    };
    pub const ONE_F_ONE_B: Self = Self {
        kind: ScheduleKind::OneFOneB,
        virtual_stages: 1,
    };

    /// Megatron's interleaved 1F1B with `v` model chunks per rank.
    pub fn interleaved(v: usize) -> Self {
        Self {
            kind: ScheduleKind::Interleaved,
            virtual_stages: v,
        }
    }

    /// The schedule for `pp` pipeline ranks and `micro_batches` micro-batches, checked.
    pub fn build(&self, pp: usize, micro_batches: usize) -> Result<Schedule, ScheduleError> {
        Schedule::new(self.kind, pp, micro_batches, self.virtual_stages)
    }

    /// Model chunks over `pp` pipeline ranks.
    pub fn chunks(&self, pp: usize) -> usize {
        pp * self.virtual_stages
    }
}

impl fmt::Display for ScheduleSpec {
    /// `gpipe`, `1f1b`, `interleaved-v2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScheduleKind::Interleaved => write!(f, "interleaved-v{}", self.virtual_stages),
            kind => write!(f, "{kind}"),
        }
    }
}

/// One step of a pipeline rank. `chunk` is the local chunk index (0 unless interleaved);
/// local chunk `c` of pipeline rank `d` is model chunk `c * pp + d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Forward { micro_batch: usize, chunk: usize },
    Backward { micro_batch: usize, chunk: usize },
}

impl Action {
    pub fn micro_batch(&self) -> usize {
        match *self {
            Action::Forward { micro_batch, .. } | Action::Backward { micro_batch, .. } => {
                micro_batch
            }
        }
    }

    /// The local chunk index.
    pub fn chunk(&self) -> usize {
        match *self {
            Action::Forward { chunk, .. } | Action::Backward { chunk, .. } => chunk,
        }
    }

    pub fn is_forward(&self) -> bool {
        matches!(self, Action::Forward { .. })
    }

    /// `F3` / `B3`, with `.chunk` appended when `with_chunk` (interleaved schedules).
    pub fn label(&self, with_chunk: bool) -> String {
        let letter = if self.is_forward() { 'F' } else { 'B' };
        if with_chunk {
            format!("{letter}{}.{}", self.micro_batch(), self.chunk())
        } else {
            format!("{letter}{}", self.micro_batch())
        }
    }
}

impl fmt::Display for Action {
    /// `F<micro-batch>.<local chunk>`, e.g. `B3.1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label(true))
    }
}

/// What a blocked action waits for (see [`Schedule::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wait {
    /// The forward output of `model_chunk` (on `device`) for the same micro-batch.
    Activation { device: usize, model_chunk: usize },
    /// The input gradient from the backward of `model_chunk` (on `device`).
    Gradient { device: usize, model_chunk: usize },
    /// The forward of the same micro-batch and chunk, which comes later in this rank's
    /// own list.
    OwnForward,
}

/// A rank that cannot progress: its next action and what that action waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stuck {
    pub device: usize,
    pub action: Action,
    pub model_chunk: usize,
    pub waits_for: Wait,
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = self.action.micro_batch();
        write!(
            f,
            "stage {} at {} (model chunk {}) waits for ",
            self.device, self.action, self.model_chunk
        )?;
        match self.waits_for {
            Wait::Activation {
                device,
                model_chunk,
            } => write!(
                f,
                "the activation of micro-batch {mb} from model chunk {model_chunk} on stage {device}"
            ),
            Wait::Gradient {
                device,
                model_chunk,
            } => write!(
                f,
                "the gradient of micro-batch {mb} from model chunk {model_chunk} on stage {device}"
            ),
            Wait::OwnForward => write!(f, "its own forward, listed later"),
        }
    }
}

fn describe_stuck(stuck: &[Stuck]) -> String {
    stuck
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A schedule that cannot be built, would not run, or cannot be simulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown schedule `{0}` (accepted: gpipe, 1f1b, interleaved)")]
    UnknownKind(String),
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("virtual_stages {virtual_stages} > 1 needs the interleaved schedule, not {kind}")]
    VirtualStagesNeedInterleaved {
        kind: ScheduleKind,
        virtual_stages: usize,
    },
    #[error(
        "the interleaved schedule needs micro_batches to be a multiple of pp (Megatron's rule): \
         micro_batches {micro_batches}, pp {pp}"
    )]
    InterleavedMicroBatches { micro_batches: usize, pp: usize },
    #[error("the schedule lists {listed} stages for pp {pp}")]
    StageCount { listed: usize, pp: usize },
    #[error("stage {device}: {problem}")]
    Incomplete { device: usize, problem: String },
    #[error("deadlock, no stage can progress: {}", describe_stuck(stuck))]
    Deadlock { stuck: Vec<Stuck> },
    #[error("simulated durations must be finite and non-negative: {0}")]
    Duration(String),
}

/// A complete schedule: `per_device[d]` is what pipeline rank `d` runs, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub pp: usize,
    pub micro_batches: usize,
    pub virtual_stages: usize,
    pub per_device: Vec<Vec<Action>>,
}

/// The outcome of [`Schedule::simulate`]: a *model* of one step with fixed per-chunk
/// action durations and free communication, not a measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedStep {
    /// End of the last action.
    pub makespan_s: f64,
    /// Per device, the time spent in forwards and backwards.
    pub busy_s: Vec<f64>,
    /// Per device, `1 - busy / makespan`.
    pub idle_fraction: Vec<f64>,
    /// Mean of `idle_fraction` over devices: the modelled bubble.
    pub bubble: f64,
    /// Per device, each action with its modelled start and end, in list order.
    pub spans: Vec<Vec<(Action, f64, f64)>>,
}

impl SimulatedStep {
    /// The modelled step as timelines, one per device, for [`crate::timeline::write_svg`].
    pub fn timelines(&self) -> Vec<StageTimeline> {
        self.spans
            .iter()
            .enumerate()
            .map(|(d, spans)| StageTimeline {
                rank: d,
                label: format!("stage {d}"),
                events: spans
                    .iter()
                    .map(|&(a, start_s, end_s)| Event {
                        kind: if a.is_forward() {
                            EventKind::Forward
                        } else {
                            EventKind::Backward
                        },
                        micro_batch: Some(a.micro_batch()),
                        chunk: Some(a.chunk()),
                        start_s,
                        end_s,
                    })
                    .collect(),
            })
            .collect()
    }
}

impl Schedule {
    /// Builds and checks a schedule.
    pub fn new(
        kind: ScheduleKind,
        pp: usize,
        micro_batches: usize,
        virtual_stages: usize,
    ) -> Result<Self, ScheduleError> {
        check_sizes(pp, micro_batches, virtual_stages)?;
        if virtual_stages > 1 && kind != ScheduleKind::Interleaved {
            return Err(ScheduleError::VirtualStagesNeedInterleaved {
                kind,
                virtual_stages,
            });
        }
        if kind == ScheduleKind::Interleaved && !micro_batches.is_multiple_of(pp) {
            return Err(ScheduleError::InterleavedMicroBatches { micro_batches, pp });
        }
        let per_device = (0..pp)
            .map(|d| match kind {
                ScheduleKind::GPipe => gpipe(micro_batches),
                ScheduleKind::OneFOneB => one_f_one_b(pp, d, micro_batches),
                ScheduleKind::Interleaved => interleaved(pp, d, micro_batches, virtual_stages),
            })
            .collect();
        let schedule = Self {
            kind,
            pp,
            micro_batches,
            virtual_stages,
            per_device,
        };
        schedule.check()?;
        Ok(schedule)
    }

    /// Number of model chunks, `pp · virtual_stages`.
    pub fn chunks(&self) -> usize {
        self.pp * self.virtual_stages
    }

    /// The model chunk that local chunk `local` of pipeline rank `device` runs.
    pub fn model_chunk(&self, device: usize, local: usize) -> usize {
        local * self.pp + device
    }

    /// The pipeline rank holding model chunk `k`.
    pub fn device_of_chunk(&self, k: usize) -> usize {
        k % self.pp.max(1)
    }

    /// Checks that every (micro-batch, model chunk) runs forward and backward exactly once
    /// on its device, and that the lists run to the end under the executor's model: each
    /// rank runs its list in order; sends are asynchronous and buffered; a forward of model
    /// chunk `k > 0` waits for chunk `k - 1`'s forward of the same micro-batch; a backward
    /// of chunk `k` waits for its own forward and, unless `k` is the last chunk, for chunk
    /// `k + 1`'s backward. Plays the lists in rounds until all are done or none can move
    /// ([`ScheduleError::Deadlock`] names the stuck ranks and what they wait for).
    pub fn check(&self) -> Result<(), ScheduleError> {
        self.walk(|_, _, _| {})
    }

    /// The list part of [`Schedule::check`]: sizes, and every action exactly once per rank.
    fn check_lists(&self) -> Result<(), ScheduleError> {
        check_sizes(self.pp, self.micro_batches, self.virtual_stages)?;
        if self.per_device.len() != self.pp {
            return Err(ScheduleError::StageCount {
                listed: self.per_device.len(),
                pp: self.pp,
            });
        }
        let (m, v) = (self.micro_batches, self.virtual_stages);
        let with_chunk = v > 1;
        let expected = m.checked_mul(v).and_then(|n| n.checked_mul(2));
        for (d, actions) in self.per_device.iter().enumerate() {
            let mut seen = HashSet::with_capacity(actions.len());
            for a in actions {
                if a.chunk() >= v || a.micro_batch() >= m {
                    return Err(ScheduleError::Incomplete {
                        device: d,
                        problem: format!(
                            "{} is out of range ({m} micro-batches, {v} local chunks)",
                            a.label(true)
                        ),
                    });
                }
                if !seen.insert(*a) {
                    return Err(ScheduleError::Incomplete {
                        device: d,
                        problem: format!("{} appears twice", a.label(with_chunk)),
                    });
                }
            }
            if Some(seen.len()) != expected {
                // Name the first few missing actions; the search stops as soon as it has
                // them, so it is bounded by the length of the list.
                const SHOWN: usize = 8;
                let missing: Vec<String> = (0..m)
                    .flat_map(|mb| {
                        (0..v).flat_map(move |chunk| {
                            [
                                Action::Forward {
                                    micro_batch: mb,
                                    chunk,
                                },
                                Action::Backward {
                                    micro_batch: mb,
                                    chunk,
                                },
                            ]
                        })
                    })
                    .filter(|a| !seen.contains(a))
                    .take(SHOWN)
                    .map(|a| a.label(with_chunk))
                    .collect();
                let total = expected.map_or_else(|| "too many".to_string(), |e| e.to_string());
                return Err(ScheduleError::Incomplete {
                    device: d,
                    problem: format!(
                        "{} of {total} actions listed, missing {}{}",
                        seen.len(),
                        missing.join(" "),
                        if missing.len() == SHOWN { " …" } else { "" }
                    ),
                });
            }
        }
        Ok(())
    }

    /// Visits every action once, as `visit(pipeline rank, action, model chunk)`, in an order
    /// the executor could run them: each rank's actions in list order, every action after
    /// the actions it waits for (see [`Schedule::check`]). This is how the cluster simulator
    /// plays the schedule the executor runs. Fails like [`Schedule::check`], before visiting
    /// anything when the lists are incomplete, and with [`ScheduleError::Deadlock`] when the
    /// walk gets stuck.
    pub fn walk(&self, mut visit: impl FnMut(usize, Action, usize)) -> Result<(), ScheduleError> {
        self.check_lists()?;
        let mut run = Run::new(self);
        while run.round(self, &mut visit) {}
        if run.finished(self) {
            Ok(())
        } else {
            Err(ScheduleError::Deadlock {
                stuck: run.stuck(self),
            })
        }
    }

    /// Per device, the most (micro-batch, chunk) pairs whose forward has run and whose
    /// backward has not: the activation stash the schedule needs.
    pub fn peak_in_flight(&self) -> Vec<usize> {
        self.per_device
            .iter()
            .map(|actions| {
                let mut live = HashSet::new();
                let mut peak = 0;
                for a in actions {
                    let key = (a.micro_batch(), a.chunk());
                    if a.is_forward() {
                        live.insert(key);
                        peak = peak.max(live.len());
                    } else {
                        live.remove(&key);
                    }
                }
                peak
            })
            .collect()
    }

    /// The idle fraction of a step with balanced stages and free communication:
    /// `(p - 1) / (m + p - 1)` for GPipe and 1F1B and `(p - 1) / (v·m + p - 1)` for
    /// interleaved. (Megatron's paper states the bubble relative to the ideal time,
    /// `(p - 1) / m` and `(p - 1) / (v·m)`; `b / (1 + b)` turns that into a fraction of the
    /// step.)
    pub fn bubble_theory(&self) -> f64 {
        let p = self.pp as f64;
        let m = self.micro_batches as f64;
        let v = self.virtual_stages as f64;
        if p <= 1.0 {
            return 0.0;
        }
        (p - 1.0) / (v * m + p - 1.0)
    }

    /// A model, not a measurement: plays the schedule with every model chunk taking
    /// `forward_s` per forward and `backward_s` per backward and communication free. An
    /// action starts when its rank has finished the previous action in its list and its
    /// inputs (see [`Schedule::check`]) are ready. Deterministic.
    pub fn simulate(
        &self,
        forward_s: f64,
        backward_s: f64,
    ) -> Result<SimulatedStep, ScheduleError> {
        self.simulate_costs(|_, a| {
            if a.is_forward() {
                forward_s
            } else {
                backward_s
            }
        })
    }

    /// [`Schedule::simulate`] with each action's cost given by `cost(pipeline rank,
    /// action)`: the ideal step for stages of unequal speed (a bench plays the schedule with
    /// each stage's measured forward and backward times, to tell the executor's own waits
    /// from the stages' imbalance).
    pub fn simulate_costs(
        &self,
        cost: impl Fn(usize, Action) -> f64,
    ) -> Result<SimulatedStep, ScheduleError> {
        for (d, actions) in self.per_device.iter().enumerate() {
            for a in actions {
                let c = cost(d, *a);
                if !(c.is_finite() && c >= 0.0) {
                    return Err(ScheduleError::Duration(format!(
                        "{} on rank {d} costs {c} s",
                        a.label(true)
                    )));
                }
            }
        }
        // Complete lists bound the sizes before anything is allocated from them.
        self.check_lists()?;
        let mut clock = vec![0.0f64; self.pp];
        let mut busy = vec![0.0f64; self.pp];
        let mut spans: Vec<Vec<(Action, f64, f64)>> = self
            .per_device
            .iter()
            .map(|l| Vec::with_capacity(l.len()))
            .collect();
        let chunks = self.chunks();
        let slots = self.micro_batches * chunks;
        let (mut f_end, mut b_end) = (vec![0.0f64; slots], vec![0.0f64; slots]);
        self.walk(|d, a, k| {
            let mb = a.micro_batch();
            let i = mb * chunks + k;
            let ready = if a.is_forward() {
                if k > 0 {
                    f_end[i - 1]
                } else {
                    0.0
                }
            } else if k + 1 < chunks {
                f_end[i].max(b_end[i + 1])
            } else {
                f_end[i]
            };
            let cost = cost(d, a);
            let start = clock[d].max(ready);
            let end = start + cost;
            clock[d] = end;
            busy[d] += cost;
            if a.is_forward() {
                f_end[i] = end;
            } else {
                b_end[i] = end;
            }
            spans[d].push((a, start, end));
        })?;
        let makespan = clock.iter().copied().fold(0.0, f64::max);
        let idle: Vec<f64> = busy
            .iter()
            .map(|b| {
                if makespan > 0.0 {
                    1.0 - b / makespan
                } else {
                    0.0
                }
            })
            .collect();
        let bubble = idle.iter().sum::<f64>() / self.pp as f64;
        Ok(SimulatedStep {
            makespan_s: makespan,
            busy_s: busy,
            idle_fraction: idle,
            bubble,
            spans,
        })
    }
}

fn check_sizes(
    pp: usize,
    micro_batches: usize,
    virtual_stages: usize,
) -> Result<(), ScheduleError> {
    for (what, n) in [
        ("pp", pp),
        ("micro_batches", micro_batches),
        ("virtual_stages", virtual_stages),
    ] {
        if n == 0 {
            return Err(ScheduleError::Zero { what });
        }
    }
    Ok(())
}

/// Plays a schedule whose lists are known complete and in range (see `check`), in rounds.
struct Run {
    next: Vec<usize>,
    /// Indexed by `micro_batch * chunks + model chunk`.
    f_done: Vec<bool>,
    b_done: Vec<bool>,
}

impl Run {
    fn new(s: &Schedule) -> Self {
        let n = s.micro_batches * s.chunks();
        Self {
            next: vec![0; s.per_device.len()],
            f_done: vec![false; n],
            b_done: vec![false; n],
        }
    }

    /// What `a` (model chunk `k`) still waits for, if anything.
    fn waits_for(&self, s: &Schedule, a: &Action, k: usize) -> Option<Wait> {
        let chunks = s.chunks();
        let i = a.micro_batch() * chunks + k;
        if a.is_forward() {
            (k > 0 && !self.f_done[i - 1]).then(|| Wait::Activation {
                device: s.device_of_chunk(k - 1),
                model_chunk: k - 1,
            })
        } else if !self.f_done[i] {
            Some(Wait::OwnForward)
        } else {
            (k + 1 < chunks && !self.b_done[i + 1]).then(|| Wait::Gradient {
                device: s.device_of_chunk(k + 1),
                model_chunk: k + 1,
            })
        }
    }

    /// One round: every rank runs as many of its next actions as are ready, calling
    /// `on_run(device, action, model chunk)` for each. Returns whether anything ran.
    fn round(&mut self, s: &Schedule, mut on_run: impl FnMut(usize, Action, usize)) -> bool {
        let chunks = s.chunks();
        let mut progressed = false;
        for (d, actions) in s.per_device.iter().enumerate() {
            while let Some(a) = actions.get(self.next[d]) {
                let k = s.model_chunk(d, a.chunk());
                if self.waits_for(s, a, k).is_some() {
                    break;
                }
                on_run(d, *a, k);
                let i = a.micro_batch() * chunks + k;
                if a.is_forward() {
                    self.f_done[i] = true;
                } else {
                    self.b_done[i] = true;
                }
                self.next[d] += 1;
                progressed = true;
            }
        }
        progressed
    }

    fn finished(&self, s: &Schedule) -> bool {
        self.next
            .iter()
            .zip(&s.per_device)
            .all(|(n, l)| *n == l.len())
    }

    fn stuck(&self, s: &Schedule) -> Vec<Stuck> {
        s.per_device
            .iter()
            .enumerate()
            .filter_map(|(d, actions)| {
                let a = actions.get(self.next[d])?;
                let k = s.model_chunk(d, a.chunk());
                Some(Stuck {
                    device: d,
                    action: *a,
                    model_chunk: k,
                    waits_for: self.waits_for(s, a, k)?,
                })
            })
            .collect()
    }
}

fn gpipe(m: usize) -> Vec<Action> {
    (0..m)
        .map(|mb| Action::Forward {
            micro_batch: mb,
            chunk: 0,
        })
        .chain((0..m).map(|mb| Action::Backward {
            micro_batch: mb,
            chunk: 0,
        }))
        .collect()
}

/// PipeDream-flush as in Megatron's `forward_backward_pipelining_without_interleaving`:
/// `min(pp - d - 1, m)` warm-up forwards, then one forward and one backward in turn, then
/// the remaining backwards.
fn one_f_one_b(pp: usize, d: usize, m: usize) -> Vec<Action> {
    let warmup = (pp - d - 1).min(m);
    let mut out = Vec::with_capacity(2 * m);
    out.extend((0..warmup).map(|mb| Action::Forward {
        micro_batch: mb,
        chunk: 0,
    }));
    for i in 0..m - warmup {
        out.push(Action::Forward {
            micro_batch: warmup + i,
            chunk: 0,
        });
        out.push(Action::Backward {
            micro_batch: i,
            chunk: 0,
        });
    }
    out.extend((m - warmup..m).map(|mb| Action::Backward {
        micro_batch: mb,
        chunk: 0,
    }));
    out
}

/// Megatron-LM's `forward_backward_pipelining_with_interleaving` (micro-batch group size
/// `pp`, the default): the `k`-th forward of a rank runs local chunk `(k mod p·v) / p` on
/// micro-batch `(k / p·v)·p + k mod p`, the `k`-th backward the mirrored chunk
/// `v - 1 - (k mod p·v) / p` on the same micro-batch; rank `d` does
/// `min(2·(p - d - 1) + (v - 1)·p, m·v)` warm-up forwards, then one forward and one
/// backward in turn, then the remaining backwards.
fn interleaved(pp: usize, d: usize, m: usize, v: usize) -> Vec<Action> {
    let total = m * v;
    let group = pp * v;
    let chunk_of = |k: usize, forward: bool| {
        let c = (k % group) / pp;
        if forward {
            c
        } else {
            v - 1 - c
        }
    };
    let mb_of = |k: usize| (k / group) * pp + k % pp;
    let warmup = ((pp - d - 1) * 2 + (v - 1) * pp).min(total);
    let fwd = |k: usize| Action::Forward {
        micro_batch: mb_of(k),
        chunk: chunk_of(k, true),
    };
    let bwd = |k: usize| Action::Backward {
        micro_batch: mb_of(k),
        chunk: chunk_of(k, false),
    };
    let mut out = Vec::with_capacity(2 * total);
    out.extend((0..warmup).map(fwd));
    for k in 0..total - warmup {
        out.push(fwd(k + warmup));
        out.push(bwd(k));
    }
    out.extend((total - warmup..total).map(bwd));
    out
}

impl fmt::Display for Schedule {
    /// One line per pipeline rank: `stage 0: F0 F1 B0 B1`, with `.chunk` suffixes
    /// (`F0.1`) when there are several virtual stages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_chunk = self.virtual_stages > 1;
        for (d, actions) in self.per_device.iter().enumerate() {
            write!(f, "stage {d}:")?;
            for a in actions {
                write!(f, " {}", a.label(with_chunk))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
