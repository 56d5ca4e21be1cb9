//! The membership of an elastic run on the local engine, agreed in one place as
//! torchelastic's rendezvous agrees it in its store: which replicas are in, why one left,
//! and the new world the survivors continue in. A failure reported by a rank (an error, a
//! panic, the watchdog's eviction) ends the current generation: its whole replica (TP and PP
//! peers with it) is evicted, the world is aborted so that no survivor waits for the dead,
//! and the survivors meet here. Once every survivor has arrived (or the timeout evicts those
//! that did not), the step to continue from is the least any survivor recorded; a survivor
//! that applied that step's update rolls it back. A join ends a generation at a step
//! boundary the same way, without an abort.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use meshrec_comm::{AbortHandle, CommError, LocalCluster, LocalCommunicator, LocalConfig};
use meshrec_pipeline::Mesh;

use crate::checkpoint::Progress;
use crate::elastic::health::RankHealth;
use crate::faults::FaultWitness;
use crate::metrics::MembershipEvent;

/// What a rank brings to the rendezvous.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Where its loop stood (steps recorded).
    pub progress: Progress,
    /// Updates its model has applied.
    pub applied: u64,
    /// Its pipeline partition (a joining replica takes it).
    pub partition: Vec<usize>,
}

/// A rank's place in the next generation.
pub struct Assignment {
    pub generation: u64,
    pub comm: LocalCommunicator,
    pub mesh: Mesh,
    pub world_rank: usize,
    /// Where training continues.
    pub progress: Progress,
    /// Updates every member has applied then (a survivor ahead rolls back to it).
    pub applied: u64,
    /// A replica joins: DP groups share their state from DP rank 0.
    pub joined: bool,
    /// The new membership is below `min_dp`: save a checkpoint and stop with this.
    pub below_min: Option<String>,
    /// The pipeline partition in use (what a joiner builds).
    pub partition: Vec<usize>,
}

/// What the rendezvous tells a rank.
pub enum Arrived {
    Continue(Box<Assignment>),
    /// This rank's replica is out.
    Leave(String),
    /// The survivors cannot continue (no replica left, or they disagree beyond repair).
    Stop(String),
}

/// The rendezvous' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub timeout: Duration,
    pub min_dp: usize,
    pub max_dp: usize,
    pub local: LocalConfig,
}

/// A rank's handles the rendezvous and the watchdog need.
struct Enlisted {
    health: Arc<RankHealth>,
    witness: FaultWitness,
}

/// Why the current generation ends.
struct Break {
    at: Instant,
    causes: Vec<String>,
    fault_at: Option<Instant>,
}

struct State {
    generation: u64,
    mesh: Mesh,
    abort: Option<AbortHandle>,
    broken: Option<Break>,
    join_requested: bool,
    /// DP replicas of the current generation that are out.
    evicted: BTreeSet<usize>,
    arrivals: BTreeMap<usize, Arrival>,
    enlisted: BTreeMap<usize, Enlisted>,
    /// Assignments of a finished rendezvous, by the old world rank, until taken.
    assigned: BTreeMap<(u64, usize), Arrived>,
    events: Vec<MembershipEvent>,
    /// The new generation's start, for the recovery time its leader reports.
    recovering: Option<(u64, Instant)>,
}

/// The membership of a local elastic run (shared by every rank thread and the watchdog).
pub struct Membership {
    state: Mutex<State>,
    changed: Condvar,
    settings: Settings,
    /// Ranks of joining replicas, for the driver to start threads for.
    joiners: Sender<Assignment>,
}

impl Membership {
    pub fn new(
        mesh: Mesh,
        abort: AbortHandle,
        settings: Settings,
        joiners: Sender<Assignment>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                generation: 0,
                mesh,
                abort: Some(abort),
                broken: None,
                join_requested: false,
                evicted: BTreeSet::new(),
                arrivals: BTreeMap::new(),
                enlisted: BTreeMap::new(),
                assigned: BTreeMap::new(),
                events: Vec::new(),
                recovering: None,
            }),
            changed: Condvar::new(),
            settings,
            joiners,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a rank of generation `generation` as `world_rank`, for the watchdog.
    pub fn enlist(
        &self,
        generation: u64,
        world_rank: usize,
        health: Arc<RankHealth>,
        witness: FaultWitness,
    ) {
        let mut st = self.lock();
        if st.generation == generation {
            st.enlisted.insert(world_rank, Enlisted { health, witness });
        }
    }

    /// The health of every rank of the current generation still running, unless a
    /// rendezvous is under way (the watchdog's reading).
    pub fn watched(&self) -> Option<(u64, Vec<Arc<RankHealth>>)> {
        let st = self.lock();
        if st.broken.is_some() {
            return None;
        }
        Some((
            st.generation,
            st.enlisted
                .values()
                .map(|e| Arc::clone(&e.health))
                .collect(),
        ))
    }

    /// Rank `world_rank` of `generation` failed with `reason` (its step returned an error,
    /// or it panicked). The first failure of a generation names its culprit: this rank,
    /// unless the world was already poisoned on another rank's account (a panic poisons it
    /// as it unwinds). Returns whether this rank's replica is out.
    pub fn fail(&self, generation: u64, world_rank: usize, reason: &str) -> Option<String> {
        let mut st = self.lock();
        if st.generation != generation {
            return Some(format!("generation {generation} is over"));
        }
        if st.broken.is_none() {
            let culprit = match st.abort.as_ref().and_then(AbortHandle::aborted) {
                Some(CommError::Poisoned {
                    world_rank: other,
                    message,
                }) if other != world_rank && other < st.mesh.world_size() => {
                    self.break_generation(&mut st, other, &message);
                    None
                }
                _ => Some(world_rank),
            };
            if let Some(me) = culprit {
                self.break_generation(&mut st, me, reason);
            }
        }
        let replica = st.mesh.coord(world_rank).dp;
        st.evicted
            .contains(&replica)
            .then(|| format!("world rank {world_rank}'s replica {replica} is out: {reason}"))
    }

    /// The watchdog evicts `world_rank` of `generation` (hung or silent).
    pub fn evict(&self, generation: u64, world_rank: usize, reason: &str) {
        let mut st = self.lock();
        if st.generation == generation {
            self.break_generation(&mut st, world_rank, reason);
        }
    }

    /// Every rank calls this at the step boundary where a replica joins.
    pub fn request_join(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation && !st.join_requested {
            st.join_requested = true;
            if st.broken.is_none() {
                st.broken = Some(Break {
                    at: Instant::now(),
                    causes: Vec::new(),
                    fault_at: None,
                });
            }
            self.changed.notify_all();
        }
    }

    fn break_generation(&self, st: &mut State, culprit: usize, reason: &str) {
        let replica = st.mesh.coord(culprit).dp;
        if !st.evicted.insert(replica) {
            return;
        }
        let cause = format!(
            "world rank {culprit} ({}) failed: {reason}",
            st.mesh.coord(culprit)
        );
        let fault_at = st
            .enlisted
            .get(&culprit)
            .and_then(|e| *e.witness.struck.lock().unwrap_or_else(|p| p.into_inner()));
        // The replica's hung ranks, if any, may go now.
        for (rank, e) in &st.enlisted {
            if st.mesh.coord(*rank).dp == replica {
                e.witness
                    .released
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        match &mut st.broken {
            Some(b) => {
                b.causes.push(cause.clone());
                b.fault_at = b.fault_at.or(fault_at);
            }
            None => {
                st.broken = Some(Break {
                    at: Instant::now(),
                    causes: vec![cause.clone()],
                    fault_at,
                })
            }
        }
        tracing::warn!(generation = st.generation, "elastic: {cause}");
        if let Some(abort) = &st.abort {
            abort.abort(culprit, cause);
        }
        self.changed.notify_all();
    }

    /// Rank `world_rank` of `generation` arrives with its state and waits for the new
    /// membership.
    pub fn arrive(&self, generation: u64, world_rank: usize, arrival: Arrival) -> Arrived {
        let mut st = self.lock();
        if st.generation == generation {
            st.arrivals.insert(world_rank, arrival);
            self.changed.notify_all();
        }
        loop {
            if let Some(a) = st.assigned.remove(&(generation, world_rank)) {
                return a;
            }
            if st.generation != generation {
                return Arrived::Leave(format!(
                    "world rank {world_rank} reached the rendezvous of generation {generation} after it was over"
                ));
            }
            let replica = st.mesh.coord(world_rank).dp;
            if st.evicted.contains(&replica) {
                st.arrivals.remove(&world_rank);
                return Arrived::Leave(format!(
                    "world rank {world_rank}'s replica {replica} is out"
                ));
            }
            let started = st.broken.as_ref().map_or_else(Instant::now, |b| b.at);
            let deadline = started + self.settings.timeout;
            let missing: Vec<usize> = (0..st.mesh.world_size())
                .filter(|r| !st.evicted.contains(&st.mesh.coord(*r).dp))
                .filter(|r| !st.arrivals.contains_key(r))
                .collect();
            if missing.is_empty() {
                self.complete(&mut st);
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                for r in missing {
                    let reason = format!(
                        "did not reach the rendezvous within {:.1} s",
                        self.settings.timeout.as_secs_f64()
                    );
                    self.break_generation(&mut st, r, &reason);
                }
                continue;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Every survivor has arrived: agree on the step, build the new world, hand out places.
    fn complete(&self, st: &mut State) {
        let generation = st.generation;
        let old = st.mesh;
        let survivors: Vec<usize> = (0..old.dp).filter(|d| !st.evicted.contains(d)).collect();
        let arrivals = std::mem::take(&mut st.arrivals);
        let joining = usize::from(st.join_requested && survivors.len() < self.settings.max_dp);
        let new_dp = survivors.len() + joining;
        let broken = st.broken.take();
        let causes = broken
            .as_ref()
            .map(|b| b.causes.clone())
            .unwrap_or_default();
        let stop = |st: &mut State, msg: String| {
            for r in arrivals.keys() {
                st.assigned
                    .insert((generation, *r), Arrived::Stop(msg.clone()));
            }
        };
        // The least step any survivor recorded (the lowest such rank's progress: the
        // leader's, early stopping included, where the leader survived).
        let Some((_, chosen)) = arrivals.iter().min_by_key(|(r, a)| (a.progress.step, **r)) else {
            st.generation += 1;
            return;
        };
        let agreed = chosen.progress.step;
        let progress = chosen.progress.clone();
        let partition = chosen.partition.clone();
        if let Some((r, a)) = arrivals
            .iter()
            .find(|(_, a)| a.applied < agreed || a.applied > agreed + 1)
        {
            stop(
                st,
                format!(
                    "the survivors cannot agree on a step: world rank {r} applied {} updates where the others recorded {agreed} steps",
                    a.applied
                ),
            );
            st.generation += 1;
            return;
        }
        let mesh = match Mesh::new(new_dp.max(1), old.tp, old.pp) {
            Ok(m) if new_dp > 0 => m,
            _ => {
                stop(st, format!("every replica is lost ({})", causes.join("; ")));
                st.generation += 1;
                return;
            }
        };
        let below_min = (new_dp < self.settings.min_dp).then(|| {
            format!(
                "elastic: {new_dp} replica(s) left, below elastic.min_dp {} ({})",
                self.settings.min_dp,
                causes.join("; ")
            )
        });
        let mut comms: Vec<Option<LocalCommunicator>> =
            match LocalCluster::with_config(mesh.world_size(), self.settings.local.clone()) {
                Ok(c) => c.into_communicators().into_iter().map(Some).collect(),
                Err(e) => {
                    stop(st, format!("cannot build the new world: {e}"));
                    st.generation += 1;
                    return;
                }
            };
        let abort = comms
            .first()
            .and_then(|c| c.as_ref())
            .map(LocalCommunicator::abort_handle);
        let rolled_back = arrivals.values().any(|a| a.applied > agreed);
        let place = |comm: LocalCommunicator, world_rank: usize, joined: bool| Assignment {
            generation: generation + 1,
            comm,
            mesh,
            world_rank,
            progress: progress.clone(),
            applied: agreed,
            joined,
            below_min: below_min.clone(),
            partition: partition.clone(),
        };
        let joined = joining > 0;
        for (new_d, old_d) in survivors.iter().enumerate() {
            for tp in 0..old.tp {
                for pp in 0..old.pp {
                    let old_rank = old.rank(coord(*old_d, tp, pp));
                    let new_rank = mesh.rank(coord(new_d, tp, pp));
                    if let Some(comm) = comms[new_rank].take() {
                        st.assigned.insert(
                            (generation, old_rank),
                            Arrived::Continue(Box::new(place(comm, new_rank, joined))),
                        );
                    }
                }
            }
        }
        for tp in 0..old.tp {
            for pp in 0..old.pp {
                let new_rank = mesh.rank(coord(new_dp - 1, tp, pp));
                if joined {
                    if let Some(comm) = comms[new_rank].take() {
                        // The driver starts the joiner's thread; a closed channel means the
                        // run is ending anyway.
                        let _ = self.joiners.send(place(comm, new_rank, true));
                    }
                }
            }
        }
        let now = Instant::now();
        st.events.push(MembershipEvent {
            kind: if causes.is_empty() { "join" } else { "loss" }.into(),
            step: agreed,
            dp_before: old.dp,
            dp_after: new_dp,
            causes,
            detect_s: broken.as_ref().and_then(|b| {
                b.fault_at
                    .map(|f| b.at.saturating_duration_since(f).as_secs_f64())
            }),
            agree_s: broken
                .as_ref()
                .map_or(0.0, |b| now.saturating_duration_since(b.at).as_secs_f64()),
            recovery_s: None,
            rolled_back,
        });
        st.recovering = broken.map(|b| (generation + 1, b.at));
        st.generation += 1;
        st.mesh = mesh;
        st.abort = abort;
        st.join_requested = false;
        st.evicted.clear();
        st.enlisted.clear();
        self.changed.notify_all();
    }

    /// The new leader has its ranks rebuilt: training resumes now (the recovery time).
    pub fn resumed(&self, generation: u64) {
        let mut st = self.lock();
        if let Some((g, at)) = st.recovering {
            if g == generation {
                let took = at.elapsed().as_secs_f64();
                if let Some(e) = st.events.last_mut() {
                    e.recovery_s = Some(took);
                }
                st.recovering = None;
            }
        }
    }

    /// The membership changes so far.
    pub fn events(&self) -> Vec<MembershipEvent> {
        self.lock().events.clone()
    }
}

fn coord(dp: usize, tp: usize, pp: usize) -> meshrec_pipeline::Coord {
    meshrec_pipeline::Coord { dp, tp, pp }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(dp: usize, min_dp: usize) -> (Membership, Vec<LocalCommunicator>) {
        let comms = LocalCluster::new(dp).unwrap().into_communicators();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let m = Membership::new(
            Mesh::new(dp, 1, 1).unwrap(),
            comms[0].abort_handle(),
            Settings {
                timeout: Duration::from_secs(5),
                min_dp,
                max_dp: dp,
                local: LocalConfig::default(),
            },
            tx,
        );
        (m, comms)
    }

    fn arrival(step: u64, applied: u64) -> Arrival {
        Arrival {
            progress: Progress {
                step,
                ..Progress::default()
            },
            applied,
            partition: vec![2],
        }
    }

    #[test]
    fn the_culprit_leaves_and_a_survivor_ahead_rolls_back_to_the_least_step() {
        let (m, comms) = membership(3, 1);
        assert!(
            m.fail(0, 1, "boom").is_some(),
            "the culprit's replica is out"
        );
        assert!(
            comms[0].abort_handle().aborted().is_some(),
            "the old world is aborted so that nobody waits for the dead"
        );
        assert!(m.fail(0, 0, "poisoned").is_none(), "a victim survives");
        std::thread::scope(|s| {
            let ahead = s.spawn(|| m.arrive(0, 2, arrival(6, 7)));
            let Arrived::Continue(a) = m.arrive(0, 0, arrival(6, 6)) else {
                panic!("rank 0 survives");
            };
            assert_eq!(
                (a.applied, a.progress.step, a.mesh.dp, a.world_rank),
                (6, 6, 2, 0)
            );
            let Ok(Arrived::Continue(b)) = ahead.join() else {
                panic!("rank 2 survives");
            };
            assert_eq!(
                (b.applied, b.world_rank),
                (6, 1),
                "rank 2 rolls back and is renumbered"
            );
        });
        let events = m.events();
        assert!(events[0].rolled_back && events[0].causes[0].contains("world rank 1"));
    }

    #[test]
    fn survivors_that_disagree_by_more_than_a_step_stop() {
        let (m, _comms) = membership(3, 1);
        m.fail(0, 1, "boom");
        std::thread::scope(|s| {
            let far = s.spawn(|| m.arrive(0, 2, arrival(6, 8)));
            assert!(matches!(m.arrive(0, 0, arrival(6, 6)), Arrived::Stop(_)));
            assert!(matches!(far.join(), Ok(Arrived::Stop(_))));
        });
    }

    #[test]
    fn a_rank_that_never_arrives_is_evicted_after_the_timeout() {
        let (m, _comms) = membership(3, 1);
        let m = Membership {
            settings: Settings {
                timeout: Duration::from_millis(200),
                ..m.settings.clone()
            },
            ..m
        };
        m.fail(0, 1, "boom");
        let start = Instant::now();
        let Arrived::Continue(a) = m.arrive(0, 0, arrival(3, 3)) else {
            panic!("rank 0 survives");
        };
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(a.mesh.dp, 1, "rank 2's replica was evicted too");
        assert!(m.events()[0]
            .causes
            .iter()
            .any(|c| c.contains("world rank 2") && c.contains("rendezvous")));
        assert!(
            matches!(m.arrive(0, 2, arrival(3, 3)), Arrived::Leave(_)),
            "too late"
        );
    }
}
