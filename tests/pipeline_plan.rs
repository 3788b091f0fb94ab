//! Pipelined plans (`repeat(...) @ pp`): the stages cut the instances into contiguous balanced
//! runs, the schedule holds what 1F1B and GPipe promise (in-flight microbatches, messages per
//! step), the summary's memory follows the schedule, the plan document keeps the schedule and
//! refuses a tampered one, and impossible pipelines are clear errors.

mod cli_support;

use cli_support::{assert_exit, assert_stderr_has, scratch, stdout, tpc};
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared};
use tpc::mesh::{Device, Mesh};
use tpc::pipeline::schedule::{self, ScheduleKind};
use tpc::pipeline::Where;
use tpc::plan::{Options, Plan};

fn plan(mesh: &str, l: i64, b: i64, m: Option<u64>, kind: ScheduleKind) -> Plan {
    plan_on(mesh, l, b, m, kind, Device::default())
}

fn plan_on(mesh: &str, l: i64, b: i64, m: Option<u64>, kind: ScheduleKind, dev: Device) -> Plan {
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").unwrap();
    let src = SourceFile::new("gpt_pipe.tpl", text);
    let sets = [("L".to_string(), l), ("B".to_string(), b)];
    let c = compile_step(&src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let options = Options {
        microbatches: m,
        schedule: kind,
        ..Default::default()
    };
    plan_declared(c.graph, Some(Mesh::parse(mesh).unwrap()), dev, &options)
        .unwrap_or_else(|e| panic!("{}", e.render(None)))
}

#[test]
fn stages_are_contiguous_non_empty_runs_of_the_instances() {
    for (mesh, l, p) in [
        ("pp=2", 4, 2),
        ("pp=4", 8, 4),
        ("dp=2,pp=2,tp=2", 8, 2),
        ("pp=4", 4, 4),
    ] {
        let plan = plan(mesh, l, 8, None, ScheduleKind::OneFOneB);
        let pl = plan.pipeline.as_ref().expect("a pipeline");
        assert_eq!(pl.stages, p);
        assert_eq!(pl.microbatches, p, "default: one microbatch per stage");
        let mut next = 0;
        for &(a, b) in &pl.instances {
            assert_eq!(a, next, "{mesh}: contiguous");
            assert!(b > a, "{mesh}: a stage without instances");
            next = b;
        }
        assert_eq!(next, l as u32, "{mesh}: every instance has a stage");
        // Every instance's nodes (forward and backward) run on its stage.
        for (id, n) in plan.local.nodes().filter(|(_, n)| !n.op.is_leaf()) {
            let path = &plan.local.region(n.region).path;
            let Some(k) = path
                .strip_prefix("layer.")
                .and_then(|r| r.split(['.', '/']).next())
                .and_then(|k| k.parse::<u32>().ok())
            else {
                continue;
            };
            let s = pl
                .instances
                .iter()
                .position(|&(a, b)| a <= k && k < b)
                .unwrap() as u32;
            assert_eq!(pl.place[id.index()], Where::Stage(s), "{mesh}: {path}");
        }
        // Only the pipeline's messages cross stages per microbatch, between neighbours.
        assert_eq!(pl.summary.messages.len(), 2 * (p as usize - 1));
        for m in &pl.summary.messages {
            assert_eq!(m.from.abs_diff(m.to), 1);
            assert!(m.bytes > 0);
        }
    }
}

#[test]
fn schedules_hold_what_they_promise() {
    let (p, m) = (4u32, 8u32);
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::GPipe] {
        let plan = plan("pp=4", 8, 8, Some(u64::from(m)), kind);
        let pl = plan.pipeline.as_ref().unwrap();
        schedule::check(&pl.actions, m).expect("a sound schedule");
        let s = &pl.summary;
        assert_eq!(s.sends_per_step, u64::from(2 * (p - 1) * m));
        for st in &s.per_stage {
            let want = match kind {
                ScheduleKind::OneFOneB => (p - st.stage).min(m),
                ScheduleKind::GPipe => m,
            };
            assert_eq!(
                st.peak_activation_microbatches, want,
                "{kind} stage {}",
                st.stage
            );
            assert_eq!(
                st.activation_bytes,
                st.activation_bytes_per_microbatch * u64::from(want)
            );
            assert!(st.activation_bytes_per_microbatch > 0);
            // AdamW keeps two moments per trained param (every param of gpt_pipe is trained)
            // and a step count.
            let moments = 2 * st.gradient_bytes;
            assert!((moments..=moments + 16).contains(&st.optimizer_bytes));
            assert!(st.gradient_bytes <= st.param_bytes);
            assert_eq!(
                st.memory_bytes,
                st.param_bytes + st.gradient_bytes + st.optimizer_bytes + st.activation_bytes
            );
        }
        assert!(
            (0.0..1.0).contains(&s.bubble_fraction),
            "{}",
            s.bubble_fraction
        );
        assert!(s.step_time_s >= s.schedule_s && s.schedule_s > 0.0);
    }
}

#[test]
fn more_microbatches_shrink_the_bubble() {
    // With free messages the bubble is the schedule's own; priced messages add their latency
    // on every hop (on a model this small, most of the step).
    let free = Device {
        latency: 0.0,
        bandwidth: 1e16,
        ..Device::default()
    };
    let bubble = |m| {
        let plan = plan_on("pp=4", 8, 16, Some(m), ScheduleKind::OneFOneB, free);
        plan.pipeline.unwrap().summary.bubble_fraction
    };
    let (b4, b8, b16) = (bubble(4), bubble(8), bubble(16));
    assert!(b4 > b8 && b8 > b16, "{b4} {b8} {b16}");
}

#[test]
fn no_pipeline_without_stages_or_training() {
    assert!(plan("dp=2,tp=2", 4, 8, None, ScheduleKind::OneFOneB)
        .pipeline
        .is_none());
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--forward-only",
    ]);
    assert_exit(&o, 0);
    assert!(!stdout(&o).contains("# pipeline:"));
}

#[test]
fn the_plan_shows_and_keeps_its_schedule() {
    let dir = scratch("pipeline_plan");
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--schedule",
        "gpipe",
    ]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    assert!(
        text.contains("# pipeline: pp=2 stages, 2 microbatches, gpipe"),
        "{text}"
    );
    assert!(text.contains("#   stage 0 | F0 F1"), "{text}");
    let json = dir.join("p.json");
    let j = json.to_str().unwrap();
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--emit",
        "json",
        "-o",
        j,
    ]);
    assert_exit(&o, 0);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["pipeline"]["actions"][0][0], "F0");
    // The shapes: `schedule: [{stage, actions}]` and `summary.pipeline`.
    assert_eq!(doc["schedule"][0]["stage"], 0);
    assert_eq!(doc["schedule"][1]["stage"], 1);
    assert_eq!(doc["schedule"][0]["actions"], doc["pipeline"]["actions"][0]);
    assert_eq!(doc["schedule"][1]["actions"][0], "RF0");
    let sp = &doc["summary"]["pipeline"];
    assert_eq!(sp["stages"], 2);
    assert_eq!(sp["microbatches"], 2);
    assert!(sp["bubble_fraction"]
        .as_f64()
        .is_some_and(|b| b > 0.0 && b < 1.0));
    assert_eq!(
        sp["peak_activation_microbatches"],
        serde_json::json!([2, 1])
    );
    assert_eq!(sp["per_stage"].as_array().map(Vec::len), Some(2));
    let mut d = doc.clone();
    d["schedule"][1]["actions"][0] = "F0".into();
    std::fs::write(&json, serde_json::to_string(&d).unwrap()).unwrap();
    let o = tpc(&["run", j]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "its schedule is not its pipeline's actions");
    std::fs::write(&json, serde_json::to_string(&doc).unwrap()).unwrap();
    // The plan document runs one training step; --check compares the updated params as a
    // training run does (AdamW on near-zero gradients moves with any rounding).
    let o = tpc(&["run", j, "--check"]);
    assert_exit(&o, 0);
    let original = std::fs::read_to_string(&json).unwrap();
    let tampered = original.replacen("\"SF1+RB0\"", "\"SF1\"", 1);
    std::fs::write(&json, tampered).unwrap();
    let o = tpc(&["run", j]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "pipeline schedule");
    // Every field of the stored pipeline must be the one recomputed from the programs.
    let doc: serde_json::Value = serde_json::from_str(&original).unwrap();
    let edits: [(&str, Edit); 4] = [
        ("microbatches", |p| p["microbatches"] = 4.into()),
        ("instances", |p| {
            p["instances"] = serde_json::json!([[0, 1], [1, 4]])
        }),
        ("transfers", |p| p["transfers"] = serde_json::json!([])),
        ("summary", |p| p["summary"]["sends_per_step"] = 999.into()),
    ];
    for (field, edit) in edits {
        let mut d = doc.clone();
        edit(&mut d["pipeline"]);
        std::fs::write(&json, serde_json::to_string(&d).unwrap()).unwrap();
        let o = tpc(&["run", j]);
        assert_exit(&o, 1);
        assert_stderr_has(
            &o,
            &format!("its pipeline {field} is not the one of its program"),
        );
    }
    let mut d = doc.clone();
    d.as_object_mut().unwrap().remove("pipeline");
    std::fs::write(&json, serde_json::to_string(&d).unwrap()).unwrap();
    let o = tpc(&["run", j]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "its pipeline (present or absent)");
}

/// A change to a JSON document.
type Edit = fn(&mut serde_json::Value);

#[test]
fn impossible_pipelines_are_clear_errors() {
    let o = tpc(&["compile", "examples/gpt_pipe.tpl", "--mesh", "pp=8"]);
    assert_exit(&o, 1);
    assert_stderr_has(
        &o,
        "pipeline axis pp=8 needs at least one instance of `layer` per stage; the repeat makes 4",
    );
    assert_stderr_has(&o, "gpt_pipe.tpl:50:5");
    let o = tpc(&["compile", "examples/gpt_pipe.tpl", "--mesh", "pp=4,dp=2"]);
    assert_exit(&o, 1);
    assert_stderr_has(
        &o,
        "--microbatches 4 (the default: one per pipeline stage) does not divide",
    );
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--schedule",
        "zigzag",
    ]);
    assert_exit(&o, 2);
}

#[test]
fn balance_is_optimal_against_brute_force() {
    use tpc::pipeline::stages::balance;
    let mut seed = 7u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % 100) as f64 + 1.0
    };
    for _ in 0..300 {
        let n = 1 + (rnd() as usize % 8);
        let p = 1 + (rnd() as usize % n);
        let costs: Vec<f64> = (0..n).map(|_| rnd()).collect();
        let (pre, post) = (rnd() - 1.0, rnd() - 1.0);
        let got = balance(&costs, p, pre, post);
        let worst = |r: &[(usize, usize)]| {
            r.iter()
                .enumerate()
                .map(|(s, &(a, b))| {
                    costs[a..b].iter().sum::<f64>()
                        + if s == 0 { pre } else { 0.0 }
                        + if s == p - 1 { post } else { 0.0 }
                })
                .fold(0.0, f64::max)
        };
        assert_eq!(got.len(), p);
        assert!(got.iter().all(|&(a, b)| a < b) && got[p - 1].1 == n && got[0].0 == 0);
        let best = splits(n, p)
            .iter()
            .map(|r| worst(r))
            .fold(f64::INFINITY, f64::min);
        assert_eq!(worst(&got), best, "{costs:?} p={p} pre={pre} post={post}");
    }
}

/// Every split of 0..n into p non-empty contiguous runs.
fn splits(n: usize, p: usize) -> Vec<Vec<(usize, usize)>> {
    if p == 1 {
        return vec![vec![(0, n)]];
    }
    (p - 1..n)
        .flat_map(|cut| {
            splits(cut, p - 1).into_iter().map(move |mut r| {
                r.push((cut, n));
                r
            })
        })
        .collect()
}

#[test]
fn the_timeline_draws_the_plans_schedule() {
    let dir = scratch("pipeline_timeline");
    let svg = dir.join("t.svg");
    let out = svg.to_str().unwrap();
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=4",
        "--set",
        "L=8",
        "--set",
        "B=16",
        "--microbatches",
        "8",
        "--emit",
        "timeline",
        "-o",
        out,
    ]);
    assert_exit(&o, 0);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("valid XML");
    let class = |c: &str| {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some(c))
            .count()
    };
    assert_eq!(class("stage"), 4);
    assert_eq!((class("f"), class("b")), (32, 32));
    assert_eq!(class("send-f") + class("send-b"), 2 * 3 * 8);
    assert!(
        text.contains("stage 0: layer.0–1"),
        "stage labels name the instances"
    );
    let o = tpc(&[
        "compile",
        "examples/gpt_train.tpl",
        "--mesh",
        "tp=2",
        "--emit",
        "timeline",
    ]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "this plan has none");
}
