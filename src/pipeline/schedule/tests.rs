use super::*;
use proptest::prelude::*;

const KINDS: [ScheduleKind; 2] = [ScheduleKind::OneFOneB, ScheduleKind::GPipe];

fn build(kind: ScheduleKind, p: u32, m: u32) -> Vec<Vec<Action>> {
    actions(kind, p, m).expect("sizes in range")
}

fn labels(list: &[&str]) -> Vec<Action> {
    list.iter()
        .map(|l| Action::parse(l).expect("label"))
        .collect()
}

fn err_text(actions: &[Vec<Action>], m: u32) -> String {
    check(actions, m)
        .expect_err("the schedule is refused")
        .to_string()
}

/// Per direction, the sends of one stage's list.
fn sends(list: &[Action], want: Dir) -> usize {
    list.iter()
        .filter(|a| match a {
            Action::Send { dir, .. } | Action::SendRecv { send: (dir, _), .. } => *dir == want,
            _ => false,
        })
        .count()
}

fn expected_peak(kind: ScheduleKind, p: u32, s: u32, m: u32) -> u32 {
    match kind {
        ScheduleKind::OneFOneB => (p - s).min(m),
        ScheduleKind::GPipe => m,
    }
}

#[test]
fn every_small_schedule_checks_with_its_peak_and_messages() {
    for kind in KINDS {
        for p in 1..=12u32 {
            for m in 1..=24u32 {
                let plan = build(kind, p, m);
                check(&plan, m).unwrap_or_else(|e| panic!("{kind} p={p} M={m}: {e}"));
                let peaks = peak_in_flight(&plan);
                let mut total = 0;
                for (s, list) in plan.iter().enumerate() {
                    let s32 = s as u32;
                    assert_eq!(
                        peaks[s],
                        expected_peak(kind, p, s32, m),
                        "{kind} p={p} M={m} s={s}"
                    );
                    let forward = if s32 + 1 < p { m as usize } else { 0 };
                    let backward = if s > 0 { m as usize } else { 0 };
                    assert_eq!(sends(list, Dir::Forward), forward);
                    assert_eq!(sends(list, Dir::Backward), backward);
                    total += forward + backward;
                }
                assert_eq!(total, 2 * (p as usize - 1) * m as usize);
            }
        }
    }
}

#[test]
fn one_f_one_b_p2_m2_is_megatrons_order() {
    let plan = build(ScheduleKind::OneFOneB, 2, 2);
    assert_eq!(
        plan[0],
        labels(&["F0", "SF0", "F1", "SF1+RB0", "B0", "RB1", "B1"])
    );
    assert_eq!(
        plan[1],
        labels(&["RF0", "F0", "B0", "SB0+RF1", "F1", "B1", "SB1"])
    );
}

#[test]
fn fewer_microbatches_than_stages_skip_the_steady_state() {
    let plan = build(ScheduleKind::OneFOneB, 4, 2);
    assert_eq!(
        plan[0],
        labels(&["F0", "SF0", "F1", "SF1", "RB0", "B0", "RB1", "B1"])
    );
    assert_eq!(
        plan[3],
        labels(&["RF0", "F0", "B0", "SB0+RF1", "F1", "B1", "SB1"])
    );
}

#[test]
fn backwards_run_in_microbatch_order_in_both_schedules() {
    for kind in KINDS {
        for list in build(kind, 5, 7) {
            let order: Vec<u32> = list
                .iter()
                .filter_map(|a| match a {
                    Action::Backward(m) => Some(*m),
                    _ => None,
                })
                .collect();
            assert_eq!(order, (0..7).collect::<Vec<_>>());
        }
    }
}

/// 1F1B with every SendRecv split into its send, then its receive.
fn unfused(plan: &[Vec<Action>]) -> Vec<Vec<Action>> {
    let split = |a: &Action| match *a {
        Action::SendRecv { send, recv } => vec![
            Action::Send {
                dir: send.0,
                mb: send.1,
            },
            Action::Recv {
                dir: recv.0,
                mb: recv.1,
            },
        ],
        other => vec![other],
    };
    plan.iter()
        .map(|list| list.iter().flat_map(split).collect())
        .collect()
}

#[test]
fn unfused_one_f_one_b_deadlocks() {
    let plan = unfused(&build(ScheduleKind::OneFOneB, 2, 2));
    assert_eq!(
        err_text(&plan, 2),
        "the schedule deadlocks: stage 0 waits at action 3 (SF1); stage 1 waits at action 3 (SB0)"
    );
}

#[test]
fn a_compute_action_out_of_order_is_refused() {
    let mut plan = build(ScheduleKind::GPipe, 1, 2);
    plan[0].swap(0, 2);
    assert_eq!(
        err_text(&plan, 2),
        "stage 0, action 0 (B0): B0 comes before F0, which it needs"
    );
}

#[test]
fn a_missing_action_is_refused() {
    let mut plan = build(ScheduleKind::GPipe, 1, 2);
    plan[0].pop();
    assert_eq!(err_text(&plan, 2), "stage 0 has no B1");
}

#[test]
fn a_duplicate_or_out_of_range_action_is_refused() {
    let plan = vec![labels(&["F0", "F0", "B0"])];
    assert_eq!(
        err_text(&plan, 1),
        "stage 0, action 1 (F0): F0 appears twice"
    );
    let plan = vec![labels(&["F0", "B0", "F1"])];
    assert_eq!(
        err_text(&plan, 1),
        "stage 0, action 2 (F1): microbatch 1 is out of range (the schedule has 1)"
    );
}

#[test]
fn a_missing_receive_is_refused() {
    let mut plan = build(ScheduleKind::GPipe, 2, 2);
    assert_eq!(
        plan[1][2],
        Action::Recv {
            dir: Dir::Forward,
            mb: 1
        }
    );
    plan[1].remove(2);
    assert_eq!(
        err_text(&plan, 2),
        "stage 1, action 2 (F1): F1 comes before RF1, which it needs"
    );
}

#[test]
fn a_send_before_its_data_is_refused() {
    let plan = vec![
        labels(&["SF0", "F0", "RB0", "B0"]),
        labels(&["RF0", "F0", "B0", "SB0"]),
    ];
    assert_eq!(
        err_text(&plan, 1),
        "stage 0, action 0 (SF0): SF0 comes before F0, which it needs"
    );
}

#[test]
fn a_send_to_a_missing_stage_is_refused() {
    let plan = vec![labels(&["F0", "SF0", "B0"])];
    assert_eq!(
        err_text(&plan, 1),
        "stage 0, action 1 (SF0): SF0 needs a stage after stage 0, and there is none"
    );
    let plan = vec![labels(&["F0", "B0", "SB0"])];
    assert_eq!(
        err_text(&plan, 1),
        "stage 0, action 2 (SB0): SB0 needs a stage before stage 0, and there is none"
    );
}

#[test]
fn a_wrong_tag_is_refused() {
    let mut plan = build(ScheduleKind::GPipe, 2, 3);
    assert_eq!(
        plan[1][..6],
        labels(&["RF0", "F0", "RF1", "F1", "RF2", "F2"])[..]
    );
    plan[1][2..6].copy_from_slice(&labels(&["RF2", "RF1", "F1", "F2"]));
    assert_eq!(
        err_text(&plan, 3),
        "stage 1 receives forward microbatch 2 but stage 0 sends microbatch 1 \
         (stage 1 action 2, stage 0 action 3)"
    );
}

#[test]
fn sizes_out_of_range_are_refused() {
    for kind in KINDS {
        assert!(matches!(
            actions(kind, 0, 4),
            Err(ScheduleError::Empty { what: "stage" })
        ));
        assert!(matches!(
            actions(kind, 4, 0),
            Err(ScheduleError::Empty { what: "microbatch" })
        ));
        assert!(matches!(
            actions(kind, u32::MAX, 4),
            Err(ScheduleError::TooLarge { .. })
        ));
        assert!(matches!(
            actions(kind, 4, u32::MAX),
            Err(ScheduleError::TooLarge { .. })
        ));
        assert!(matches!(
            actions(kind, 4096, 4096),
            Err(ScheduleError::TooLarge { .. })
        ));
    }
    assert!(matches!(
        check(&[], 1),
        Err(ScheduleError::Empty { what: "stage" })
    ));
    assert!(matches!(
        check(&[vec![]], 0),
        Err(ScheduleError::Empty { .. })
    ));
    let absurd = vec![labels(&["F4294967295", "B4294967295"])];
    assert!(check(&absurd, 1).is_err());
    assert!(simulate(&absurd, &Durations::uniform(1, 1.0, 1.0, 0.0)).is_err());
}

#[test]
fn bubble_is_exact_for_uniform_stages() {
    for kind in KINDS {
        for p in 1..=8u32 {
            for m in 1..=16u32 {
                for (f, b) in [
                    (1.0, 2.0),
                    (1.0, 1.0),
                    (0.3, 0.7),
                    (2.5, 1.0),
                    (1e-3, 3.7e-3),
                ] {
                    let line = simulate(
                        &build(kind, p, m),
                        &Durations::uniform(p as usize, f, b, 0.0),
                    );
                    let line = line.expect("valid schedule");
                    let want = f64::from(p - 1) / f64::from(m + p - 1);
                    let got = bubble_fraction(&line);
                    assert!(
                        (got - want).abs() < 1e-12,
                        "{kind} p={p} M={m} f={f} b={b}: {got}"
                    );
                }
            }
        }
    }
}

#[test]
fn one_stage_has_no_bubble() {
    for kind in KINDS {
        let line = simulate(&build(kind, 1, 5), &Durations::uniform(1, 1.0, 2.0, 0.5)).unwrap();
        assert_eq!(bubble_fraction(&line), 0.0);
        assert_eq!(line.makespan, 15.0);
        assert!(line.arrows.is_empty());
    }
}

#[test]
fn uneven_stages_take_at_least_the_slowest_stage() {
    let d = Durations {
        forward: vec![1.0, 3.0, 0.5],
        backward: vec![2.0, 1.5, 4.0],
        p2p: 0.25,
    };
    for kind in KINDS {
        let line = simulate(&build(kind, 3, 6), &d).unwrap();
        for slots in &line.stages {
            let busy: f64 = slots.iter().map(|s| s.end - s.start).sum();
            assert!(line.makespan >= busy);
        }
        assert_eq!(line.arrows.len(), 2 * 2 * 6);
        for arrow in &line.arrows {
            assert!(arrow.received >= arrow.sent + d.p2p);
        }
    }
}

#[test]
fn a_message_arrives_p2p_after_its_send() {
    let d = Durations {
        forward: vec![1.0, 2.0],
        backward: vec![3.0, 4.0],
        p2p: 0.5,
    };
    let line = simulate(&build(ScheduleKind::OneFOneB, 2, 1), &d).unwrap();
    let spans = |s: usize| {
        line.stages[s]
            .iter()
            .map(|x| (x.action, x.start, x.end))
            .collect::<Vec<_>>()
    };
    assert_eq!(spans(0), vec![(0, 0.0, 1.0), (3, 8.0, 11.0)]);
    assert_eq!(spans(1), vec![(1, 1.5, 3.5), (2, 3.5, 7.5)]);
    assert_eq!(line.makespan, 11.0);
    let arrow = |from_stage, to_stage, dir, sent, received| Arrow {
        from_stage,
        to_stage,
        dir,
        mb: 0,
        sent,
        received,
    };
    assert_eq!(
        line.arrows,
        vec![
            arrow(0, 1, Dir::Forward, 1.0, 1.5),
            arrow(1, 0, Dir::Backward, 7.5, 8.0)
        ]
    );
}

#[test]
fn bad_durations_are_refused() {
    let plan = build(ScheduleKind::GPipe, 2, 2);
    let short = Durations {
        forward: vec![1.0],
        backward: vec![1.0, 1.0],
        p2p: 0.0,
    };
    let text = simulate(&plan, &short).unwrap_err().to_string();
    assert_eq!(
        text,
        "bad stage durations: forward has 1 entries for 2 stages"
    );
    let nan = Durations {
        forward: vec![1.0, 1.0],
        backward: vec![1.0, f64::NAN],
        p2p: 0.0,
    };
    assert!(simulate(&plan, &nan).is_err());
    assert!(simulate(&plan, &Durations::uniform(2, 1.0, 1.0, -1.0)).is_err());
    assert!(simulate(
        &unfused(&build(ScheduleKind::OneFOneB, 2, 2)),
        &Durations::uniform(2, 1.0, 1.0, 0.0)
    )
    .is_err());
}

#[test]
fn labels_round_trip() {
    let all = [
        Action::Forward(0),
        Action::Backward(17),
        Action::Send {
            dir: Dir::Forward,
            mb: 3,
        },
        Action::Send {
            dir: Dir::Backward,
            mb: 4,
        },
        Action::Recv {
            dir: Dir::Forward,
            mb: 5,
        },
        Action::Recv {
            dir: Dir::Backward,
            mb: u32::MAX,
        },
        Action::SendRecv {
            send: (Dir::Forward, 3),
            recv: (Dir::Backward, 1),
        },
        Action::SendRecv {
            send: (Dir::Backward, 0),
            recv: (Dir::Forward, 10),
        },
    ];
    for a in all {
        assert_eq!(Action::parse(&a.to_string()), Ok(a));
    }
    assert_eq!(all[6].to_string(), "SF3+RB1");
    for bad in [
        "",
        "F",
        "X1",
        "1",
        "F-1",
        "F+1",
        "F01",
        "f1",
        "F1 ",
        "F4294967296",
        "SF1+SF2",
        "F1+RB1",
        "SF1+RB1+RF2",
        "RF1+SB0",
    ] {
        assert!(
            matches!(Action::parse(bad), Err(ScheduleError::BadLabel { .. })),
            "`{bad}` parsed"
        );
    }
}

#[test]
fn kinds_round_trip() {
    for kind in KINDS {
        assert_eq!(kind.to_string().parse::<ScheduleKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
    }
    assert!("2f2b".parse::<ScheduleKind>().is_err());
}

#[test]
fn schedules_round_trip_through_json() {
    let plan = build(ScheduleKind::OneFOneB, 3, 4);
    let json = serde_json::to_string(&plan).unwrap();
    assert!(
        json.starts_with(r#"[["F0","SF0","F1","SF1","F2","SF2+RB0","B0""#),
        "{json}"
    );
    let back: Vec<Vec<Action>> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert!(serde_json::from_str::<Vec<Action>>(r#"["F0","Q1"]"#).is_err());
    let line = simulate(&plan, &Durations::uniform(3, 1.0, 2.0, 0.1)).unwrap();
    let again: Timeline = serde_json::from_str(&serde_json::to_string(&line).unwrap()).unwrap();
    assert_eq!(again, line);
}

#[test]
fn table_of_one_f_one_b_p2_m3() {
    let text = table(&build(ScheduleKind::OneFOneB, 2, 3)).unwrap();
    assert_eq!(
        text,
        "stage 0 | F0 F1 ·  ·  B0 -- F2 B1 -- ·  B2 --\n\
         stage 1 | ·  F0 B0 -- F1 B1 -- F2 B2 -- ·  ·\n"
    );
}

#[test]
fn table_widens_cells_for_long_labels() {
    let text = table(&build(ScheduleKind::GPipe, 1, 11)).unwrap();
    assert!(text.starts_with("stage 0 | F0  F1  F2 "), "{text}");
    assert!(text.ends_with("B10 ---\n"), "{text}");
}

proptest! {
    #[test]
    fn random_schedules_check(p in 1u32..=16, m in 1u32..=32, gpipe in any::<bool>()) {
        let kind = if gpipe { ScheduleKind::GPipe } else { ScheduleKind::OneFOneB };
        let plan = build(kind, p, m);
        prop_assert!(check(&plan, m).is_ok());
        for (s, (list, peak)) in plan.iter().zip(peak_in_flight(&plan)).enumerate() {
            prop_assert_eq!(peak, expected_peak(kind, p, s as u32, m));
            prop_assert!(peak <= m && peak >= 1);
            for mb in 0..m {
                let f = list.iter().position(|a| *a == Action::Forward(mb));
                let b = list.iter().position(|a| *a == Action::Backward(mb));
                prop_assert!(matches!((f, b), (Some(f), Some(b)) if f < b));
            }
        }
    }
}

#[test]
fn a_send_recv_can_wait_on_work_its_send_starts() {
    let plan = vec![
        labels(&["F0", "SF0+RB0", "B0"]),
        labels(&["RF0", "F0", "B0", "SB0"]),
    ];
    assert_eq!(check(&plan, 1), Ok(()));
    let line = simulate(&plan, &Durations::uniform(2, 1.0, 2.0, 0.0)).unwrap();
    assert_eq!(line.makespan, 6.0);
}

#[test]
fn the_largest_stage_count_builds_and_checks() {
    for kind in KINDS {
        let plan = build(kind, MAX_STAGES, 64);
        assert_eq!(check(&plan, 64), Ok(()));
        assert_eq!(peak_in_flight(&plan)[0], 64);
    }
}
