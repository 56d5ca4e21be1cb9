//! The schedules as data: every GPipe, 1F1B and interleaved schedule is complete and
//! deadlock-free, stashes what Megatron's does, orders its actions as Megatron does,
//! rejects bad ones naming the stuck stages, and its simulated bubble is the theory's.

use meshrec_pipeline::schedule::*;

use proptest::prelude::*;

fn f(micro_batch: usize, chunk: usize) -> Action {
    Action::Forward { micro_batch, chunk }
}

fn b(micro_batch: usize, chunk: usize) -> Action {
    Action::Backward { micro_batch, chunk }
}

fn hand_built(pp: usize, m: usize, per_device: Vec<Vec<Action>>) -> Schedule {
    Schedule {
        kind: ScheduleKind::OneFOneB,
        pp,
        micro_batches: m,
        virtual_stages: 1,
        per_device,
    }
}

#[test]
fn every_schedule_is_complete_and_deadlock_free_up_to_pp_16_and_v_4() {
    for pp in 1..=16 {
        for m in [1, 2, 3, 4, 8, 16] {
            for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                let s = Schedule::new(kind, pp, m, 1).unwrap();
                s.check().unwrap();
            }
        }
        for v in 1..=4 {
            for m in [pp, 2 * pp, 4 * pp] {
                let s = Schedule::new(ScheduleKind::Interleaved, pp, m, v).unwrap();
                s.check().unwrap();
                assert!(s.per_device.iter().all(|l| l.len() == 2 * m * v));
            }
        }
    }
}

#[test]
fn one_f_one_b_stashes_pp_minus_d_and_gpipe_all() {
    for pp in 1..=8 {
        for m in [1, 2, 3, 4, 8, 16] {
            let s = Schedule::new(ScheduleKind::OneFOneB, pp, m, 1).unwrap();
            for (d, peak) in s.peak_in_flight().into_iter().enumerate() {
                assert_eq!(peak, (pp - d).min(m), "pp {pp} m {m} stage {d}");
                assert!(peak <= pp);
            }
            let g = Schedule::new(ScheduleKind::GPipe, pp, m, 1).unwrap();
            assert_eq!(g.peak_in_flight(), vec![m; pp]);
        }
    }
}

#[test]
fn interleaved_stashes_its_warmup_plus_one() {
    for pp in 1..=6 {
        for v in 1..=4 {
            for m in [pp, 2 * pp, 4 * pp] {
                let s = Schedule::new(ScheduleKind::Interleaved, pp, m, v).unwrap();
                for (d, peak) in s.peak_in_flight().into_iter().enumerate() {
                    let warmup = 2 * (pp - d - 1) + (v - 1) * pp;
                    assert_eq!(
                        peak,
                        (warmup + 1).min(m * v),
                        "pp {pp} v {v} m {m} stage {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn interleaved_with_v_1_keeps_the_1f1b_order() {
    for pp in 1..=8 {
        for m in [pp, 2 * pp, 3 * pp] {
            let i = Schedule::new(ScheduleKind::Interleaved, pp, m, 1).unwrap();
            let o = Schedule::new(ScheduleKind::OneFOneB, pp, m, 1).unwrap();
            // Megatron's interleaved warm-up with v = 1 is 2(p - d - 1), deeper than
            // 1F1B's p - d - 1; both are valid, so compare the order of each kind of
            // action only.
            for d in 0..pp {
                let order = |s: &Schedule, fwd: bool| -> Vec<usize> {
                    s.per_device[d]
                        .iter()
                        .filter(|a| a.is_forward() == fwd)
                        .map(Action::micro_batch)
                        .collect()
                };
                assert_eq!(order(&i, true), order(&o, true));
                assert_eq!(order(&i, false), order(&o, false));
            }
        }
    }
}

#[test]
fn interleaved_matches_megatron_by_hand() {
    // pp 2, v 2, m 4: forwards run chunk 0 on micro-batches 0 1, chunk 1 on 0 1,
    // chunk 0 on 2 3, chunk 1 on 2 3; backwards mirror the chunks. Warm-up: stage 0
    // 2·1 + 1·2 = 4, stage 1 0 + 2 = 2.
    let s = Schedule::new(ScheduleKind::Interleaved, 2, 4, 2).unwrap();
    let text = s.to_string();
    let expected = "\
stage 0: F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0
stage 1: F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0
";
    assert_eq!(text, expected);
}

#[test]
fn one_f_one_b_and_gpipe_orders() {
    let s = Schedule::new(ScheduleKind::OneFOneB, 3, 4, 1).unwrap();
    assert_eq!(
        s.to_string(),
        "stage 0: F0 F1 F2 B0 F3 B1 B2 B3\n\
         stage 1: F0 F1 B0 F2 B1 F3 B2 B3\n\
         stage 2: F0 B0 F1 B1 F2 B2 F3 B3\n"
    );
    let g = Schedule::new(ScheduleKind::GPipe, 2, 3, 1).unwrap();
    assert_eq!(
        g.to_string(),
        "stage 0: F0 F1 F2 B0 B1 B2\nstage 1: F0 F1 F2 B0 B1 B2\n"
    );
}

#[test]
fn a_deadlocking_schedule_is_rejected_naming_the_stuck_stages() {
    // Stage 0 waits for B0's gradient before sending F1; stage 1 waits for F1 before
    // running B0.
    let s = hand_built(
        2,
        2,
        vec![
            vec![f(0, 0), b(0, 0), f(1, 0), b(1, 0)],
            vec![f(0, 0), f(1, 0), b(0, 0), b(1, 0)],
        ],
    );
    let err = s.check().unwrap_err();
    let ScheduleError::Deadlock { stuck } = &err else {
        panic!("expected a deadlock, got {err}");
    };
    assert_eq!(
        stuck,
        &vec![
            Stuck {
                device: 0,
                action: b(0, 0),
                model_chunk: 0,
                waits_for: Wait::Gradient {
                    device: 1,
                    model_chunk: 1
                },
            },
            Stuck {
                device: 1,
                action: f(1, 0),
                model_chunk: 1,
                waits_for: Wait::Activation {
                    device: 0,
                    model_chunk: 0
                },
            },
        ]
    );
    let text = err.to_string();
    assert!(
        text.contains("stage 0 at B0.0") && text.contains("stage 1 at F1.0"),
        "{text}"
    );
    assert!(matches!(
        s.simulate(1.0, 1.0),
        Err(ScheduleError::Deadlock { .. })
    ));

    // A backward listed before its own forward.
    let s = hand_built(
        2,
        2,
        vec![
            vec![b(0, 0), f(0, 0), f(1, 0), b(1, 0)],
            vec![f(0, 0), b(0, 0), f(1, 0), b(1, 0)],
        ],
    );
    let Err(ScheduleError::Deadlock { stuck }) = s.check() else {
        panic!("expected a deadlock");
    };
    assert_eq!(stuck[0].waits_for, Wait::OwnForward);
    assert_eq!(stuck.len(), 2);
}

#[test]
fn incomplete_schedules_are_rejected() {
    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.per_device[1].pop();
    let err = s.check().unwrap_err();
    assert!(
        matches!(err, ScheduleError::Incomplete { device: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing B1"), "{err}");

    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.per_device[0][3] = b(0, 0);
    assert!(s.check().unwrap_err().to_string().contains("appears twice"));

    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.per_device[0][0] = f(0, 1);
    assert!(s.check().unwrap_err().to_string().contains("out of range"));

    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.per_device.pop();
    assert_eq!(
        s.check(),
        Err(ScheduleError::StageCount { listed: 1, pp: 2 })
    );
    assert!(s.simulate(1.0, 1.0).is_err());

    // Absurd sizes are an error, not an allocation failure.
    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.micro_batches = usize::MAX;
    s.virtual_stages = usize::MAX;
    assert!(matches!(
        s.check(),
        Err(ScheduleError::Incomplete { device: 0, .. })
    ));
    assert!(s.simulate(1.0, 1.0).is_err());

    let mut s = Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.pp = 0;
    assert_eq!(s.check(), Err(ScheduleError::Zero { what: "pp" }));
}

#[test]
fn bad_parameters_are_rejected() {
    for (pp, m, v, what) in [
        (0, 4, 1, "pp"),
        (2, 0, 1, "micro_batches"),
        (2, 4, 0, "virtual_stages"),
    ] {
        for kind in ScheduleKind::ALL {
            assert_eq!(
                Schedule::new(kind, pp, m, v),
                Err(ScheduleError::Zero { what })
            );
        }
    }
    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
        assert!(matches!(
            Schedule::new(kind, 2, 4, 2),
            Err(ScheduleError::VirtualStagesNeedInterleaved { .. })
        ));
    }
    let err = Schedule::new(ScheduleKind::Interleaved, 4, 6, 2).unwrap_err();
    assert_eq!(
        err,
        ScheduleError::InterleavedMicroBatches {
            micro_batches: 6,
            pp: 4
        }
    );
    let text = err.to_string();
    assert!(text.contains("multiple of pp") && text.contains('6') && text.contains('4'));
}

#[test]
fn kinds_parse_print_and_serialize() {
    for kind in ScheduleKind::ALL {
        assert_eq!(kind.to_string().parse::<ScheduleKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
        assert_eq!(serde_json::from_str::<ScheduleKind>(&json).unwrap(), kind);
    }
    assert_eq!(" 1F1B ".parse::<ScheduleKind>(), Ok(ScheduleKind::OneFOneB));
    let err = "zigzag".parse::<ScheduleKind>().unwrap_err().to_string();
    for name in ["zigzag", "gpipe", "1f1b", "interleaved"] {
        assert!(err.contains(name), "{err}");
    }
    let s = Schedule::new(ScheduleKind::Interleaved, 2, 4, 2).unwrap();
    let back: Schedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn simulated_bubble_of_gpipe_and_1f1b_is_p_minus_1_over_m_plus_p_minus_1() {
    // Exact for any forward/backward ratio: both schedules take (m + p - 1)(F + B).
    for pp in [1, 2, 3, 4, 8] {
        for m in [1, 2, 3, 4, 8, 16] {
            for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                let s = Schedule::new(kind, pp, m, 1).unwrap();
                for (fw, bw) in [(1.0, 1.0), (1.0, 2.0), (0.3, 0.7)] {
                    let sim = s.simulate(fw, bw).unwrap();
                    let p = pp as f64;
                    let mf = m as f64;
                    assert!(
                        (sim.makespan_s - (mf + p - 1.0) * (fw + bw)).abs() < 1e-9,
                        "{kind} pp {pp} m {m}: makespan {}",
                        sim.makespan_s
                    );
                    assert!(
                        (sim.bubble - s.bubble_theory()).abs() < 1e-9,
                        "{kind} pp {pp} m {m} f {fw} b {bw}: {} vs {}",
                        sim.bubble,
                        s.bubble_theory()
                    );
                    for idle in &sim.idle_fraction {
                        assert!((idle - s.bubble_theory()).abs() < 1e-9);
                    }
                }
            }
        }
    }
}

#[test]
fn simulated_bubble_of_interleaved_is_p_minus_1_over_vm_plus_p_minus_1() {
    for pp in [1, 2, 3, 4, 8] {
        for v in 1..=4 {
            for m in [pp, 2 * pp, 4 * pp] {
                let s = Schedule::new(ScheduleKind::Interleaved, pp, m, v).unwrap();
                for (fw, bw) in [(1.0, 1.0), (1.0, 2.0)] {
                    let sim = s.simulate(fw, bw).unwrap();
                    assert!(
                        (sim.bubble - s.bubble_theory()).abs() < 1e-9,
                        "pp {pp} v {v} m {m} f {fw} b {bw}: {} vs {}",
                        sim.bubble,
                        s.bubble_theory()
                    );
                }
                if pp > 1 && v > 1 {
                    // Same total work per rank (chunks v times smaller), smaller bubble.
                    let flat = Schedule::new(ScheduleKind::OneFOneB, pp, m, 1)
                        .unwrap()
                        .simulate(v as f64, 2.0 * v as f64)
                        .unwrap();
                    let sim = s.simulate(1.0, 2.0).unwrap();
                    assert!(sim.bubble < flat.bubble);
                    assert!(sim.makespan_s < flat.makespan_s);
                }
            }
        }
    }
}

#[test]
fn simulation_respects_dependencies_and_rejects_bad_durations() {
    let s = Schedule::new(ScheduleKind::Interleaved, 4, 8, 2).unwrap();
    let sim = s.simulate(1.0, 2.0).unwrap();
    for (d, spans) in sim.spans.iter().enumerate() {
        assert_eq!(spans.len(), s.per_device[d].len());
        for w in spans.windows(2) {
            assert!(w[0].2 <= w[1].1, "stage {d} overlaps");
        }
    }
    let timelines = sim.timelines();
    assert_eq!(timelines.len(), 4);
    assert!(timelines.iter().all(|t| t.events.len() == 32));
    for (fw, bw) in [(-1.0, 1.0), (1.0, f64::NAN), (f64::INFINITY, 1.0)] {
        assert!(matches!(
            s.simulate(fw, bw),
            Err(ScheduleError::Duration(_))
        ));
    }
    let zero = s.simulate(0.0, 0.0).unwrap();
    assert_eq!(zero.makespan_s, 0.0);
    assert_eq!(zero.bubble, 0.0);
}

#[test]
fn a_simulated_step_draws_as_a_gantt_chart() {
    let s = Schedule::new(ScheduleKind::Interleaved, 4, 8, 2).unwrap();
    let sim = s.simulate(0.001, 0.002).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("interleaved.svg");
    meshrec_pipeline::timeline::write_svg(
        &path,
        &format!("{} pp 4 m 8 v 2 (model)", s.kind),
        &sim.timelines(),
    )
    .unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.contains("<svg") && svg.contains("1.1"));
}

proptest! {
    #[test]
    fn any_valid_parameters_give_a_runnable_schedule(
        kind in 0usize..3,
        pp in 1usize..10,
        m in 1usize..24,
        v in 1usize..5,
    ) {
        let kind = ScheduleKind::ALL[kind];
        let (m, v) = if kind == ScheduleKind::Interleaved {
            (m.div_ceil(pp) * pp, v)
        } else {
            (m, 1)
        };
        let s = Schedule::new(kind, pp, m, v).unwrap();
        prop_assert!(s.check().is_ok());
        prop_assert_eq!(s.per_device.iter().map(Vec::len).sum::<usize>(), 2 * m * v * pp);
        let sim = s.simulate(1.0, 2.0).unwrap();
        prop_assert!((sim.bubble - s.bubble_theory()).abs() < 1e-9);
    }
}

#[test]
fn uneven_stages_are_played_with_their_own_costs() {
    // pp 2, one micro-batch: stage 1 twice as slow. F0 on 0 [0,1], F0 on 1 [1,3], B0 on 1
    // [3,7], B0 on 0 [7,9]: busy 3 and 6 of 9, bubble (6/9 + 3/9) / 2.
    let s = Schedule::new(ScheduleKind::GPipe, 2, 1, 1).unwrap();
    let step = s
        .simulate_costs(|d, a| {
            let slow = if d == 1 { 2.0 } else { 1.0 };
            slow * if a.is_forward() { 1.0 } else { 2.0 }
        })
        .unwrap();
    assert!((step.makespan_s - 9.0).abs() < 1e-12, "{}", step.makespan_s);
    assert!((step.bubble - 0.5).abs() < 1e-12, "{}", step.bubble);
    // Equal costs give what `simulate` gives.
    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
        let s = Schedule::new(kind, 4, 8, 1).unwrap();
        let even = s.simulate(1.0, 2.0).unwrap();
        let same = s
            .simulate_costs(|_, a| if a.is_forward() { 1.0 } else { 2.0 })
            .unwrap();
        assert_eq!(even.bubble, same.bubble);
    }
    assert!(s_err(&Schedule::new(ScheduleKind::GPipe, 2, 2, 1).unwrap()));
}

/// A negative cost is refused, naming the action.
fn s_err(s: &Schedule) -> bool {
    s.simulate_costs(|_, _| -1.0)
        .is_err_and(|e| e.to_string().contains("costs -1"))
}
