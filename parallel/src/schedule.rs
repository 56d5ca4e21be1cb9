//! Pipeline schedules as data: GPipe, 1F1B (PipeDream-flush) and Megatron's interleaved
//! 1F1B, each a list of forward and backward actions per pipeline rank that can be
//! printed, checked for completeness and deadlock freedom, simulated, and executed by
//! [`crate::exec`].

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    #[serde(rename = "gpipe")]
    GPipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    #[serde(rename = "interleaved")]
    Interleaved,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 3] = [Self::GPipe, Self::OneFOneB, Self::Interleaved];

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
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ScheduleError::UnknownKind(s.to_string()))
    }
}

/// A schedule that cannot be built or would not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown schedule `{0}` (known: gpipe, 1f1b, interleaved)")]
    UnknownKind(String),
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("virtual_stages {virtual_stages} > 1 needs the interleaved schedule, not {kind}")]
    VirtualStagesNeedInterleaved {
        kind: ScheduleKind,
        virtual_stages: usize,
    },
    #[error("the interleaved schedule needs micro_batches ({micro_batches}) to be a multiple of pp ({pp}) (Megatron's rule)")]
    InterleavedMicroBatches { micro_batches: usize, pp: usize },
    #[error("stage {device}: {problem}")]
    Incomplete { device: usize, problem: String },
    #[error("deadlock: {0}")]
    Deadlock(String),
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

    pub fn chunk(&self) -> usize {
        match *self {
            Action::Forward { chunk, .. } | Action::Backward { chunk, .. } => chunk,
        }
    }

    pub fn is_forward(&self) -> bool {
        matches!(self, Action::Forward { .. })
    }
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

/// The outcome of [`Schedule::simulate`]: a model of the step with fixed action costs and
/// free communication, not a measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedStep {
    pub makespan_s: f64,
    pub busy_s: Vec<f64>,
    /// Mean over devices of `1 - busy / makespan`.
    pub bubble: f64,
}

impl Schedule {
    /// Builds and checks a schedule.
    pub fn new(
        kind: ScheduleKind,
        pp: usize,
        micro_batches: usize,
        virtual_stages: usize,
    ) -> Result<Self, ScheduleError> {
        for (what, v) in [
            ("pp", pp),
            ("micro_batches", micro_batches),
            ("virtual_stages", virtual_stages),
        ] {
            if v == 0 {
                return Err(ScheduleError::Zero { what });
            }
        }
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

    /// Number of model chunks.
    pub fn chunks(&self) -> usize {
        self.pp * self.virtual_stages
    }

    fn model_chunk(&self, device: usize, local: usize) -> usize {
        local * self.pp + device
    }

    /// Checks that every (micro-batch, model chunk) runs forward and backward exactly once
    /// on its device, and that executing the lists in order with asynchronous sends and
    /// blocking receives terminates: a forward of chunk `k > 0` waits for chunk `k - 1`'s
    /// forward of the same micro-batch, a backward for its own forward and for chunk
    /// `k + 1`'s backward.
    pub fn check(&self) -> Result<(), ScheduleError> {
        let chunks = self.chunks();
        for (d, actions) in self.per_device.iter().enumerate() {
            let mut seen = HashSet::new();
            for a in actions {
                if a.chunk() >= self.virtual_stages || a.micro_batch() >= self.micro_batches {
                    return Err(ScheduleError::Incomplete {
                        device: d,
                        problem: format!("{a:?} is out of range"),
                    });
                }
                if !seen.insert(*a) {
                    return Err(ScheduleError::Incomplete {
                        device: d,
                        problem: format!("{a:?} appears twice"),
                    });
                }
            }
            let expected = 2 * self.micro_batches * self.virtual_stages;
            if seen.len() != expected {
                return Err(ScheduleError::Incomplete {
                    device: d,
                    problem: format!("{} actions, expected {expected}", seen.len()),
                });
            }
        }
        if self.per_device.len() != self.pp {
            return Err(ScheduleError::Incomplete {
                device: self.per_device.len(),
                problem: format!("{} stages listed for pp {}", self.per_device.len(), self.pp),
            });
        }
        // Run the lists in rounds; `done` holds (forward?, micro-batch, model chunk).
        let mut done: HashSet<(bool, usize, usize)> = HashSet::new();
        let mut next = vec![0usize; self.pp];
        loop {
            let mut progressed = false;
            for d in 0..self.pp {
                while let Some(a) = self.per_device[d].get(next[d]) {
                    let k = self.model_chunk(d, a.chunk());
                    let mb = a.micro_batch();
                    let ready = match a {
                        Action::Forward { .. } => k == 0 || done.contains(&(true, mb, k - 1)),
                        Action::Backward { .. } => {
                            done.contains(&(true, mb, k))
                                && (k + 1 == chunks || done.contains(&(false, mb, k + 1)))
                        }
                    };
                    if !ready {
                        break;
                    }
                    done.insert((a.is_forward(), mb, k));
                    next[d] += 1;
                    progressed = true;
                }
            }
            if next
                .iter()
                .zip(&self.per_device)
                .all(|(n, l)| *n == l.len())
            {
                return Ok(());
            }
            if !progressed {
                let stuck: Vec<String> = (0..self.pp)
                    .filter_map(|d| {
                        self.per_device[d]
                            .get(next[d])
                            .map(|a| format!("stage {d} waits at {a:?}"))
                    })
                    .collect();
                return Err(ScheduleError::Deadlock(stuck.join("; ")));
            }
        }
    }

    /// Per device, the most (micro-batch, chunk) forwards whose backward has not run yet:
    /// the activation stash the schedule needs.
    pub fn peak_in_flight(&self) -> Vec<usize> {
        self.per_device
            .iter()
            .map(|actions| {
                let (mut now, mut peak) = (0usize, 0usize);
                for a in actions {
                    if a.is_forward() {
                        now += 1;
                        peak = peak.max(now);
                    } else {
                        now = now.saturating_sub(1);
                    }
                }
                peak
            })
            .collect()
    }

    /// The idle fraction of a step with balanced stages and free communication:
    /// `(p - 1) / (m + p - 1)`, and `(p - 1) / (v·m + p - 1)` interleaved (Megatron's
    /// bubble-to-ideal ratios `(p - 1) / m` and `(p - 1) / (v·m)` as fractions of the step).
    pub fn bubble_theory(&self) -> f64 {
        let p = self.pp as f64;
        let m = self.micro_batches as f64;
        let v = self.virtual_stages as f64;
        (p - 1.0) / (v * m + p - 1.0)
    }

    /// Plays the schedule with every model chunk taking `forward_s` forward and
    /// `backward_s` backward and free communication. A model of the step, not a
    /// measurement.
    pub fn simulate(&self, forward_s: f64, backward_s: f64) -> SimulatedStep {
        let chunks = self.chunks();
        let mut finish: std::collections::HashMap<(bool, usize, usize), f64> =
            std::collections::HashMap::new();
        let mut clock = vec![0.0f64; self.pp];
        let mut next = vec![0usize; self.pp];
        let mut busy = vec![0.0f64; self.pp];
        loop {
            let mut progressed = false;
            for d in 0..self.pp {
                while let Some(a) = self.per_device[d].get(next[d]) {
                    let k = self.model_chunk(d, a.chunk());
                    let mb = a.micro_batch();
                    let deps: Vec<(bool, usize, usize)> = match a {
                        Action::Forward { .. } if k > 0 => vec![(true, mb, k - 1)],
                        Action::Forward { .. } => vec![],
                        Action::Backward { .. } if k + 1 < chunks => {
                            vec![(true, mb, k), (false, mb, k + 1)]
                        }
                        Action::Backward { .. } => vec![(true, mb, k)],
                    };
                    let Some(ready) = deps
                        .iter()
                        .try_fold(0.0f64, |t, dep| finish.get(dep).map(|f| t.max(*f)))
                    else {
                        break;
                    };
                    let cost = if a.is_forward() {
                        forward_s
                    } else {
                        backward_s
                    };
                    let start = clock[d].max(ready);
                    clock[d] = start + cost;
                    busy[d] += cost;
                    finish.insert((a.is_forward(), mb, k), clock[d]);
                    next[d] += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        let makespan = clock.iter().copied().fold(0.0, f64::max);
        let bubble = if makespan > 0.0 {
            busy.iter().map(|b| 1.0 - b / makespan).sum::<f64>() / self.pp as f64
        } else {
            0.0
        };
        SimulatedStep {
            makespan_s: makespan,
            busy_s: busy,
            bubble,
        }
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

/// Megatron-LM's `forward_backward_pipelining_with_interleaving`: virtual micro-batch `k`
/// runs model chunk `(k mod p·v) / p` (backwards mirrored) on micro-batch
/// `(k / p·v)·p + k mod p`.
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
    let warmup = if m == pp {
        total
    } else {
        ((pp - d - 1) * 2 + (v - 1) * pp).min(total)
    };
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} pp {} micro-batches {} virtual stages {}",
            self.kind, self.pp, self.micro_batches, self.virtual_stages
        )?;
        for (d, actions) in self.per_device.iter().enumerate() {
            write!(f, "stage {d}:")?;
            for a in actions {
                let letter = if a.is_forward() { 'F' } else { 'B' };
                if self.virtual_stages > 1 {
                    write!(f, " {letter}{}.{}", a.micro_batch(), a.chunk())?;
                } else {
                    write!(f, " {letter}{}", a.micro_batch())?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_schedule_is_complete_and_deadlock_free_up_to_pp_16_and_v_4() {
        for pp in 1..=16 {
            for m in [1, 2, 3, 4, 8, 16] {
                for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                    Schedule::new(kind, pp, m, 1).unwrap();
                }
            }
            for v in 1..=4 {
                for m in [pp, 2 * pp, 4 * pp] {
                    Schedule::new(ScheduleKind::Interleaved, pp, m, v).unwrap();
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_stashes_at_most_pp_and_gpipe_all() {
        for pp in 1..=8 {
            for m in [1, 4, 16] {
                let s = Schedule::new(ScheduleKind::OneFOneB, pp, m, 1).unwrap();
                for (d, peak) in s.peak_in_flight().into_iter().enumerate() {
                    assert!(
                        peak <= pp - d && peak <= m,
                        "pp {pp} m {m} stage {d}: {peak}"
                    );
                }
                let g = Schedule::new(ScheduleKind::GPipe, pp, m, 1).unwrap();
                assert!(g.peak_in_flight().iter().all(|&p| p == m));
            }
        }
    }

    #[test]
    fn simulated_bubble_matches_the_formulas() {
        for pp in [2, 4, 8] {
            for m in [pp, 2 * pp, 4 * pp] {
                for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                    let s = Schedule::new(kind, pp, m, 1).unwrap();
                    for ratio in [1.0, 2.0] {
                        let sim = s.simulate(1.0, ratio);
                        assert!(
                            (sim.bubble - s.bubble_theory()).abs() < 1e-9,
                            "{kind} pp {pp} m {m}: {} vs {}",
                            sim.bubble,
                            s.bubble_theory()
                        );
                    }
                }
                let flat = Schedule::new(ScheduleKind::OneFOneB, pp, m, 1)
                    .unwrap()
                    .simulate(2.0, 4.0)
                    .bubble;
                let s = Schedule::new(ScheduleKind::Interleaved, pp, m, 2).unwrap();
                let sim = s.simulate(1.0, 2.0);
                assert!(
                    (sim.bubble - s.bubble_theory()).abs() < 1e-9,
                    "interleaved pp {pp} m {m}: {} vs {}",
                    sim.bubble,
                    s.bubble_theory()
                );
                assert!(sim.bubble < flat);
            }
        }
    }

    #[test]
    fn broken_schedules_are_rejected() {
        let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
        // Stage 0 runs backward 0 before anything arrives from stage 1, then forwards.
        s.per_device[0] = vec![
            Action::Backward {
                micro_batch: 0,
                chunk: 0,
            },
            Action::Forward {
                micro_batch: 0,
                chunk: 0,
            },
            Action::Forward {
                micro_batch: 1,
                chunk: 0,
            },
            Action::Backward {
                micro_batch: 1,
                chunk: 0,
            },
        ];
        assert!(matches!(s.check(), Err(ScheduleError::Deadlock(_))));
        let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
        s.per_device[1].pop();
        assert!(matches!(
            s.check(),
            Err(ScheduleError::Incomplete { device: 1, .. })
        ));
        assert!(matches!(
            Schedule::new(ScheduleKind::Interleaved, 4, 6, 2),
            Err(ScheduleError::InterleavedMicroBatches { .. })
        ));
        assert!(Schedule::new(ScheduleKind::OneFOneB, 2, 4, 2).is_err());
        assert!("zigzag"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string()
            .contains("gpipe"));
    }

    #[test]
    fn display_lists_each_stage() {
        let s = Schedule::new(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
        let text = s.to_string();
        assert!(text.contains("stage 0: F0 F1 B0 B1"), "{text}");
        assert!(text.contains("stage 1: F0 B0 F1 B1"), "{text}");
    }

    proptest! {
        #[test]
        fn any_valid_parameters_give_a_runnable_schedule(pp in 1usize..10, groups in 1usize..5, v in 1usize..4, kind in 0usize..3) {
            let kind = ScheduleKind::ALL[kind];
            let v = if kind == ScheduleKind::Interleaved { v } else { 1 };
            let m = groups * pp;
            let s = Schedule::new(kind, pp, m, v).unwrap();
            prop_assert!(s.check().is_ok());
            prop_assert_eq!(s.per_device.iter().map(Vec::len).sum::<usize>(), 2 * m * v * pp);
        }
    }
}
