//! Liveness kept apart from progress. A rank's [`RankHealth`] holds its heartbeat (beaten
//! by a thread of its own, [`Heartbeat`]: alive while the rank's thread or process is) and
//! its progress (ticks from the loop's phases, each finished communicator call and each
//! computed pipeline action, and whether its main thread is waiting on peers right now).
//! [`judge`] is the rule over one snapshot of it: silent (no heartbeat within the timeout:
//! dead or frozen), hung (beating but no progress within its phase's budget, and not
//! waiting on a peer: the peers are waiting on it), or healthy. A phase's budget scales
//! with its measured durations, so a slow but live rank (two busy cores, a checkpoint
//! write) is not reported as hung.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshrec_comm::WaitProbe;
use serde::{Deserialize, Serialize};

use crate::elastic::phase::{Budgets, Phase, PHASES};
use crate::train::LoopHooks;

/// Loop hooks that report the loop's phases to a rank's health.
pub struct PhaseHooks(pub Arc<RankHealth>);

impl LoopHooks for PhaseHooks {
    fn phase(&mut self, phase: Phase, step: u64) {
        self.0.enter(phase, step);
    }
}

/// Milliseconds since the Unix epoch: comparable across processes (the supervisor reads
/// the ranks' files).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One rank's heartbeat and progress, shared by its threads and the watchdog.
pub struct RankHealth {
    world_rank: AtomicUsize,
    beat_ms: AtomicU64,
    tick_ms: AtomicU64,
    phase: AtomicU8,
    phase_ms: AtomicU64,
    step: AtomicU64,
    budget_ms: AtomicU64,
    /// Calls of any of the rank's threads waiting on peers now: the main thread's, or the
    /// DP engine's thread's (which the main thread then waits for).
    waiting: AtomicUsize,
    /// Longest duration of each phase kind in recent instances (decays by 10% each time).
    longest_ms: [AtomicU64; PHASES.len()],
    measured: [AtomicBool; PHASES.len()],
    budgets: Budgets,
    /// Set when the rank's thread has ended (an exited process, on MPI).
    exited: AtomicBool,
}

impl RankHealth {
    pub fn new(world_rank: usize, budgets: Budgets) -> Arc<Self> {
        let now = now_ms();
        Arc::new(Self {
            world_rank: AtomicUsize::new(world_rank),
            beat_ms: AtomicU64::new(now),
            tick_ms: AtomicU64::new(now),
            phase: AtomicU8::new(Phase::Setup.index() as u8),
            phase_ms: AtomicU64::new(now),
            step: AtomicU64::new(0),
            budget_ms: AtomicU64::new(budgets.first.as_millis() as u64),
            waiting: AtomicUsize::new(0),
            longest_ms: Default::default(),
            measured: Default::default(),
            budgets,
            exited: AtomicBool::new(false),
        })
    }

    pub fn set_world_rank(&self, rank: usize) {
        self.world_rank.store(rank, Ordering::Release);
    }

    pub fn world_rank(&self) -> usize {
        self.world_rank.load(Ordering::Acquire)
    }

    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Release);
    }

    /// Progress: something got done.
    pub fn tick(&self) {
        self.tick_ms.store(now_ms(), Ordering::Release);
    }

    pub fn mark_exited(&self) {
        self.exited.store(true, Ordering::Release);
    }

    /// The rank enters `phase` at `step`: the phase it leaves is measured, the new one's
    /// budget set from its own kind's measurements.
    pub fn enter(&self, phase: Phase, step: u64) {
        let now = now_ms();
        let old = PHASES[self.phase.load(Ordering::Acquire) as usize % PHASES.len()];
        let took = now.saturating_sub(self.phase_ms.load(Ordering::Acquire));
        let i = old.index();
        let decayed = self.longest_ms[i].load(Ordering::Acquire) * 9 / 10;
        self.longest_ms[i].store(decayed.max(took), Ordering::Release);
        self.measured[i].store(true, Ordering::Release);
        let j = phase.index();
        let budget = if self.measured[j].load(Ordering::Acquire) {
            let scaled = self.longest_ms[j].load(Ordering::Acquire) as f64 * self.budgets.factor;
            (scaled as u64).max(self.budgets.floor.as_millis() as u64)
        } else {
            self.budgets.first.as_millis() as u64
        };
        self.budget_ms.store(budget, Ordering::Release);
        self.phase.store(j as u8, Ordering::Release);
        self.phase_ms.store(now, Ordering::Release);
        self.step.store(step, Ordering::Release);
        self.tick_ms.store(now, Ordering::Release);
    }

    /// What the watchdog judges.
    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            world_rank: self.world_rank(),
            pid: std::process::id(),
            beat_ms: self.beat_ms.load(Ordering::Acquire),
            tick_ms: self.tick_ms.load(Ordering::Acquire),
            budget_ms: self.budget_ms.load(Ordering::Acquire),
            waiting: self.waiting.load(Ordering::Acquire) > 0,
            phase: PHASES[self.phase.load(Ordering::Acquire) as usize % PHASES.len()],
            step: self.step.load(Ordering::Acquire),
            exited: self.exited.load(Ordering::Acquire),
        }
    }
}

impl WaitProbe for RankHealth {
    fn enter(&self) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        self.tick();
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
    }
}

/// One reading of a rank's health (also the line a rank writes to its health file under
/// MPI, for the supervisor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    pub world_rank: usize,
    pub pid: u32,
    pub beat_ms: u64,
    pub tick_ms: u64,
    pub budget_ms: u64,
    pub waiting: bool,
    pub phase: Phase,
    pub step: u64,
    pub exited: bool,
}

/// What [`judge`] finds.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    /// No heartbeat for `silent_s`: the rank (its process) is dead or frozen.
    Silent {
        silent_s: f64,
    },
    /// Beating, but no progress for `stalled_s` in `phase` (budget `budget_s`), and not
    /// waiting on a peer.
    Hung {
        phase: Phase,
        step: u64,
        stalled_s: f64,
        budget_s: f64,
    },
}

impl Verdict {
    /// Why a rank judged so is evicted, for the survivors' report.
    pub fn reason(&self) -> String {
        match self {
            Self::Healthy => "healthy".into(),
            Self::Silent { silent_s } => format!("no heartbeat for {silent_s:.1} s"),
            Self::Hung {
                phase,
                step,
                stalled_s,
                budget_s,
            } => format!(
                "hung: no progress for {stalled_s:.1} s in {phase:?} of step {step} (budget {budget_s:.1} s) while not waiting on any peer"
            ),
        }
    }
}

/// The watchdog's rule over one snapshot taken at `now_ms`; `heartbeat_timeout`: silence
/// longer than this is death.
pub fn judge(s: &HealthSnapshot, now_ms: u64, heartbeat_timeout: Duration) -> Verdict {
    let silent = now_ms.saturating_sub(s.beat_ms);
    if silent > heartbeat_timeout.as_millis() as u64 {
        return Verdict::Silent {
            silent_s: silent as f64 / 1e3,
        };
    }
    let stalled = now_ms.saturating_sub(s.tick_ms);
    if !s.waiting && !s.exited && stalled > s.budget_ms {
        return Verdict::Hung {
            phase: s.phase,
            step: s.step,
            stalled_s: stalled as f64 / 1e3,
            budget_s: s.budget_ms as f64 / 1e3,
        };
    }
    Verdict::Healthy
}

/// Beats a rank's heart every `interval` until dropped (and, under MPI, writes the rank's
/// health file each time, for the supervisor).
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(health: Arc<RankHealth>, interval: Duration, file: Option<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("heartbeat-{}", health.world_rank()))
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    health.beat();
                    if let Some(path) = &file {
                        // A lost write only delays the next reading by one beat.
                        let _ = write_health_file(path, &health.snapshot());
                    }
                    std::thread::sleep(interval);
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `rank{r}.json` in the health folder.
pub fn health_file(dir: &Path, world_rank: usize) -> PathBuf {
    dir.join(format!("rank{world_rank}.json"))
}

/// Writes a snapshot atomically (a reader never sees half a file).
fn write_health_file(path: &Path, s: &HealthSnapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(s).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Reads a rank's health file.
pub fn read_health_file(path: &Path) -> Option<HealthSnapshot> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(beat: u64, tick: u64, budget: u64, waiting: bool) -> HealthSnapshot {
        HealthSnapshot {
            world_rank: 1,
            pid: 1,
            beat_ms: beat,
            tick_ms: tick,
            budget_ms: budget,
            waiting,
            phase: Phase::Step,
            step: 7,
            exited: false,
        }
    }

    #[test]
    fn liveness_and_progress_are_judged_apart() {
        let hb = Duration::from_millis(2_000);
        // Beating, progressing.
        assert_eq!(
            judge(&snap(9_900, 9_500, 1_000, false), 10_000, hb),
            Verdict::Healthy
        );
        // Beating but stalled past the budget, not waiting: hung.
        assert!(matches!(
            judge(&snap(9_900, 8_000, 1_000, false), 10_000, hb),
            Verdict::Hung { step: 7, .. }
        ));
        // Stalled as long, but waiting on a peer: the peer is the one to blame.
        assert_eq!(
            judge(&snap(9_900, 8_000, 1_000, true), 10_000, hb),
            Verdict::Healthy
        );
        // A slow phase within a budget scaled to it (a checkpoint write): healthy.
        assert_eq!(
            judge(&snap(9_900, 4_000, 8_000, false), 10_000, hb),
            Verdict::Healthy
        );
        // Silent: dead or frozen, whatever the progress says.
        assert!(matches!(
            judge(&snap(7_000, 9_999, 1_000, true), 10_000, hb),
            Verdict::Silent { .. }
        ));
    }

    #[test]
    fn a_phase_budget_follows_its_measured_durations() {
        let budgets = Budgets {
            floor: Duration::from_millis(100),
            factor: 4.0,
            first: Duration::from_secs(30),
        };
        let h = RankHealth::new(0, budgets);
        h.enter(Phase::Step, 0);
        assert_eq!(
            h.snapshot().budget_ms,
            30_000,
            "never measured: the first budget"
        );
        std::thread::sleep(Duration::from_millis(50));
        h.enter(Phase::Eval, 1);
        h.enter(Phase::Step, 1);
        let budget = h.snapshot().budget_ms;
        assert!((200..=400).contains(&budget), "4 × ~50 ms: {budget}");
        h.enter(Phase::Eval, 2);
        h.enter(Phase::Step, 2);
        assert!(h.snapshot().budget_ms >= 100, "never below the floor");
    }

    #[test]
    fn a_wait_on_any_thread_of_the_rank_counts_until_it_ends() {
        let h = RankHealth::new(
            0,
            Budgets {
                floor: Duration::from_millis(1),
                factor: 1.0,
                first: Duration::from_secs(1),
            },
        );
        let before = h.snapshot().tick_ms;
        let other = Arc::clone(&h);
        std::thread::spawn(move || WaitProbe::enter(other.as_ref()))
            .join()
            .unwrap();
        assert!(h.snapshot().waiting, "the DP thread's wait is the rank's");
        std::thread::sleep(Duration::from_millis(5));
        WaitProbe::leave(h.as_ref());
        let after = h.snapshot();
        assert!(!after.waiting);
        assert!(after.tick_ms > before, "a finished call is progress");
    }
}
