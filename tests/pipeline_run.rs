//! `tpc run` on a pipelined training step: each device runs its stage's share, the boundary
//! messages go between the ranks of adjacent stages by the schedule, and the step must equal
//! the unsharded reference (and, bit for bit, the same program run without stages), whatever
//! the schedule and the number of microbatches; a failing stage stops every rank.

mod cli_support;

use cli_support::{assert_exit, assert_stderr_has, scratch, tpc};
use std::time::{Duration, Instant};
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::leaves::LeafSource;
use tpc::exec::train::{train_threads, Steps, Trained};
use tpc::mesh::{Device, Mesh};
use tpc::pipeline::schedule::ScheduleKind;
use tpc::plan::Plan;

fn compiled(sets: &[(&str, i64)]) -> Compiled {
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").expect("example");
    let src = SourceFile::new("examples/gpt_pipe.tpl", text);
    let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    compile_step(&src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn planned(c: &Compiled, mesh: &str, m: u64, schedule: ScheduleKind) -> Plan {
    let options = tpc::plan::Options {
        microbatches: Some(m),
        schedule,
        ..Default::default()
    };
    let mesh = Mesh::parse(mesh).unwrap();
    plan_declared(c.graph.clone(), Some(mesh), Device::default(), &options).expect("plans")
}

fn train(c: &Compiled, plan: &Plan, steps: usize) -> Trained {
    let stepped = Default::default();
    let spec = Steps {
        count: steps,
        start: &LeafSource::Seed(3),
        stepped: &stepped,
        reseed: Some(3),
        carried: &c.carried,
        loss: "loss",
        keep_first: true,
    };
    train_threads(plan, &spec, None).expect("trains")
}

/// Every loss, kept first-step output and final output, as bits.
fn bits(t: &Trained) -> Vec<(String, Vec<u32>)> {
    let mut out = vec![(
        "losses".to_string(),
        t.losses.iter().map(|l| l.0.to_bits()).collect(),
    )];
    for (name, x) in t.first.iter().chain(&t.last) {
        let v = match x {
            tpc::exec::Tensor::F32(a) => a.iter().map(|v| v.to_bits()).collect(),
            tpc::exec::Tensor::I32(a) => a.iter().map(|v| *v as u32).collect(),
        };
        out.push((name.clone(), v));
    }
    out
}

fn same_bits(a: &Trained, b: &Trained, what: &str) {
    let (a, b) = (bits(a), bits(b));
    assert_eq!(a.len(), b.len(), "{what}: outputs");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0, "{what}");
        assert!(x.1 == y.1, "{what}: `{}` differs", x.0);
    }
}

/// The meshes and depths, through the binary: two steps equal the reference.
#[test]
fn pipelined_training_equals_the_reference() {
    for mesh in ["pp=2", "pp=4", "dp=2,pp=2,tp=2", "pp=2,tp=4"] {
        for l in ["4", "8"] {
            let o = tpc(&[
                "run",
                "examples/gpt_pipe.tpl",
                "--mesh",
                mesh,
                "--set",
                &format!("L={l}"),
                "--steps",
                "2",
                "--check",
            ]);
            assert_exit(&o, 0);
            let out = String::from_utf8_lossy(&o.stdout);
            let checks = out.lines().filter(|l| l.starts_with("check ")).count();
            assert!(checks > 10, "{mesh} L={l}: {checks} checks\n{out}");
            assert!(
                out.lines()
                    .filter(|l| l.starts_with("check "))
                    .all(|l| l.ends_with(" ok")),
                "{mesh} L={l}:\n{out}"
            );
        }
    }
}

/// Stages change where the work runs, not one bit of the result: the pipelined step equals
/// the same microbatched step on one device bit for bit, under either schedule, run to run.
#[test]
fn stages_and_schedules_do_not_change_a_bit() {
    let c = compiled(&[("L", 8), ("B", 8)]);
    for m in [1, 2, 4, 8] {
        let whole = train(&c, &planned(&c, "pp=1", m, ScheduleKind::OneFOneB), 3);
        for kind in [ScheduleKind::OneFOneB, ScheduleKind::GPipe] {
            for mesh in ["pp=2", "pp=4"] {
                let plan = planned(&c, mesh, m, kind);
                assert!(plan.pipeline.is_some(), "{mesh}: a pipeline");
                let got = train(&c, &plan, 3);
                same_bits(&got, &whole, &format!("{mesh} M={m} {kind:?}"));
            }
        }
    }
    let plan = planned(&c, "dp=2,pp=2,tp=2", 2, ScheduleKind::OneFOneB);
    same_bits(&train(&c, &plan, 2), &train(&c, &plan, 2), "run to run");
}

/// The measured messages: 2(pp−1)M boundary sends per step over all stages, the forward ones
/// each one microbatch's activations; 1F1B holds at most pp − s microbatches on stage s, GPipe
/// all M.
#[test]
fn the_runtime_sends_and_holds_what_the_schedule_says() {
    let c = compiled(&[("L", 8), ("B", 16)]);
    for (p, m) in [(4u64, 8u64), (4, 2), (2, 4), (4, 16)] {
        for kind in [ScheduleKind::OneFOneB, ScheduleKind::GPipe] {
            let plan = planned(&c, &format!("pp={p}"), m, kind);
            let got = train(&c, &plan, 2);
            let stages = &got.stats.pipeline;
            assert_eq!(stages.len() as u64, p, "one figure per stage");
            let sends: u64 = stages.iter().map(|s| s.sends).sum();
            assert_eq!(sends, 2 * (p - 1) * m, "pp={p} M={m} {kind:?}");
            let pipe = plan.pipeline.as_ref().unwrap();
            assert_eq!(sends, pipe.summary.sends_per_step);
            for s in stages {
                let want = match kind {
                    ScheduleKind::OneFOneB => (p - u64::from(s.stage)).min(m),
                    ScheduleKind::GPipe => m,
                };
                assert_eq!(u64::from(s.max_in_flight), want, "stage {}", s.stage);
                assert_eq!(
                    u64::from(s.max_in_flight),
                    u64::from(pipe.summary.peak_activation_microbatches[s.stage as usize])
                );
            }
            // One microbatch's activations: [B/M, S, H] f32 per forward message.
            let fwd = 16 / m * 16 * 64 * 4;
            let first = &stages[0];
            assert_eq!(first.send_bytes, m * fwd, "stage 0 sends only activations");
        }
    }
}

/// 1F1B keeps fewer microbatches' activations than GPipe: the measured peak says so.
#[test]
fn one_f_one_b_peaks_lower_than_gpipe() {
    let c = compiled(&[("L", 8), ("B", 16)]);
    let peak = |kind| {
        let plan = planned(&c, "pp=2", 8, kind);
        train(&c, &plan, 1).stats.peak_bytes_per_rank
    };
    let (one, all) = (peak(ScheduleKind::OneFOneB), peak(ScheduleKind::GPipe));
    assert!(one < all, "1F1B {one} B, GPipe {all} B");
}

/// A token past the vocabulary in microbatch 3's rows fails stage 0's forward of microbatch
/// 3: the run stops on every rank, names the stage, the microbatch, the step and the op, and
/// exits 1.
#[test]
fn a_failing_stage_stops_every_rank() {
    let dir = scratch("pipeline_fails");
    let mut tokens = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4, 16]), 3i32);
    tokens[[3, 5]] = 5000;
    let inputs = dir.join("tokens.npz");
    let arrays = [("tokens".to_string(), tpc::exec::Tensor::I32(tokens))].into();
    tpc::exec::npz::write(inputs.to_str().unwrap(), &arrays).unwrap();
    for mesh in ["pp=2", "dp=2,pp=2,tp=2"] {
        let t0 = Instant::now();
        let o = tpc(&[
            "run",
            "examples/gpt_pipe.tpl",
            "--mesh",
            mesh,
            "--microbatches",
            if mesh == "pp=2" { "4" } else { "2" },
            "--steps",
            "2",
            "--inputs",
            inputs.to_str().unwrap(),
        ]);
        assert_exit(&o, 1);
        let mb = if mesh == "pp=2" { 3 } else { 1 };
        assert_stderr_has(&o, &format!("stage 0, microbatch {mb}, forward"));
        assert_stderr_has(&o, "step 1: ");
        assert_stderr_has(&o, "embedding");
        assert_stderr_has(&o, "out of range");
        assert!(t0.elapsed() < Duration::from_secs(60), "{mesh}: no hang");
    }
}

/// Fewer microbatches than stages (a known hang elsewhere) runs and checks.
#[test]
fn fewer_microbatches_than_stages() {
    for m in ["1", "2"] {
        let o = tpc(&[
            "run",
            "examples/gpt_pipe.tpl",
            "--mesh",
            "pp=4",
            "--microbatches",
            m,
            "--steps",
            "2",
            "--check",
        ]);
        assert_exit(&o, 0);
    }
}

/// The once-per-step traffic the plan lists is what the ranks send: the tied table's
/// embedding-side gradient to the stage updating it, the updated table back to the stage that
/// reads it, and the loss reported to stage 0; the boundary messages carry activations and
/// their gradients alone.
#[test]
fn once_per_step_transfers_are_the_plans() {
    use tpc::pipeline::Crossing;
    let c = compiled(&[("L", 8)]);
    let plan = planned(&c, "dp=2,pp=4,tp=2", 2, ScheduleKind::OneFOneB);
    let pipe = plan.pipeline.as_ref().unwrap();
    let count = |k: Crossing| pipe.transfers.iter().filter(|t| t.crossing == k).count();
    assert_eq!(count(Crossing::Step), 1, "wte's embedding term");
    assert_eq!(count(Crossing::Carry), 1, "next(wte)");
    let name = |t: &tpc::pipeline::Transfer| {
        let outs = plan.local.outputs();
        outs.iter()
            .find(|o| o.value == t.value)
            .map(|o| o.name.clone())
    };
    let carry = pipe
        .transfers
        .iter()
        .find(|t| t.crossing == Crossing::Carry);
    assert_eq!(carry.and_then(name).as_deref(), Some("next(wte)"));
    // Boundary messages hold one microbatch's [B/(dp·M), S, H] = [1, 16, 64] f32 activation
    // (or its gradient).
    let one = 16 * 64 * 4;
    for m in &pipe.summary.messages {
        assert_eq!(m.values, 1, "{m:?}");
        assert_eq!(m.bytes, one as u64, "{m:?}");
    }
    let got = train(&c, &plan, 2);
    let step_sends: u64 = got.stats.pipeline.iter().map(|s| s.step_sends).sum();
    // The last step: the gradient term and the loss (no carry after the last update).
    assert_eq!(step_sends, 2);
}

/// A pipelined plan document runs by stages too (`tpc run plan.json`), and checks.
#[test]
fn a_pipelined_plan_document_runs_by_stages() {
    let dir = scratch("pipeline_plan_doc");
    let plan = dir.join("plan.json");
    let stats = dir.join("stats.json");
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2,tp=2",
        "--emit",
        "json",
        "-o",
        plan.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let o = tpc(&[
        "run",
        plan.to_str().unwrap(),
        "--check",
        "--stats",
        stats.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(doc["pipeline"]["sends_per_step"], 4, "{doc}");
    assert_eq!(doc["pipeline"]["stages"].as_array().map(Vec::len), Some(2));
}

/// A skip connection around the whole repeat (`h + h0` after the last layer): the last stage
/// computes h0 again from the params (and receives the updated position table each step), and
/// h0's gradient goes back to stage 0 through every stage between (relayed in their backward
/// messages). The step still equals the reference.
#[test]
fn a_skip_around_the_stages_is_relayed() {
    let dir = scratch("pipeline_skip");
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").unwrap();
    let text = text
        .replace(
            "h = embedding(tokens, wte) + wpe\n",
            "h0 = embedding(tokens, wte) + wpe\nh = h0\n",
        )
        .replace(
            "h = repeat(L, layer, h) @ pp",
            "h = repeat(L, layer, h) @ pp\nh = h + h0",
        );
    assert!(text.contains("h = h + h0"), "the example changed");
    let file = dir.join("skip.tpl");
    std::fs::write(&file, text).unwrap();
    let o = tpc(&[
        "run",
        file.to_str().unwrap(),
        "--mesh",
        "pp=4",
        "--steps",
        "2",
        "--check",
    ]);
    assert_exit(&o, 0);
    let o = tpc(&["compile", file.to_str().unwrap(), "--mesh", "pp=4"]);
    assert_exit(&o, 0);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("stage 3 -> 0 backward"),
        "a relayed gradient:\n{text}"
    );
    assert!(text.contains("next(wpe)"), "the position table carried");
}

/// Outputs that are not the loss or the params' next values: an activation (on dp × pp with one
/// microbatch, whose dp gather sits after the backward in the program but runs in the forward
/// pass) and a value made from params alone (with microbatches, made by the once-per-step
/// part). Both train as the reference, and every output is bit for bit the unstaged run's.
#[test]
fn extra_outputs_of_activations_and_params() {
    let dir = scratch("pipeline_outputs");
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").unwrap();
    let cases = [
        (
            "activation",
            "hs = h\noutput hs\n",
            "dp=2,pp=2",
            "dp=2",
            "1",
        ),
        (
            "activation_tp",
            "hs = h\noutput hs\n",
            "dp=2,pp=2,tp=2",
            "dp=2,tp=2",
            "1",
        ),
        (
            "params",
            "hs = sum(wte * wte, 1)\noutput hs\n",
            "pp=2",
            "pp=1",
            "2",
        ),
    ];
    for (name, extra, mesh, unstaged, m) in cases {
        let file = dir.join(format!("{name}.tpl"));
        let text = text.replace("train loss", &format!("{extra}train loss"));
        assert!(text.contains("output hs"), "the example changed");
        std::fs::write(&file, text).unwrap();
        let out = |mesh: &str| {
            let path = dir.join(format!("{name}-{mesh}.npz"));
            let o = tpc(&[
                "run",
                file.to_str().unwrap(),
                "--mesh",
                mesh,
                "--microbatches",
                m,
                "--steps",
                "2",
                "--check",
                "--out",
                path.to_str().unwrap(),
            ]);
            assert_exit(&o, 0);
            std::fs::read(path).unwrap()
        };
        assert!(out(mesh) == out(unstaged), "{name}: outputs differ");
    }
}

/// A plan document is run as compiled: the planner's flags are refused, the mesh may be
/// given (without the microbatch axis) and must be the plan's, and --steps points to the .tpl.
#[test]
fn a_plan_document_refuses_the_planners_flags() {
    let dir = scratch("pipeline_plan_flags");
    let plan = dir.join("plan.json");
    let p = plan.to_str().unwrap();
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--emit",
        "json",
        "-o",
        p,
    ]);
    assert_exit(&o, 0);
    for (flags, says) in [
        (
            &["--microbatches", "4"][..],
            "--microbatches applies to .tpl programs",
        ),
        (
            &["--schedule", "gpipe"][..],
            "--schedule applies to .tpl programs",
        ),
        (&["--latency", "0"][..], "the cost model's flags"),
        (&["--bucket-mb", "1"][..], "the cost model's flags"),
        (&["--steps", "2"][..], "train from the .tpl program"),
        (&["--mesh", "pp=4"][..], "was compiled for mesh"),
    ] {
        let mut args = vec!["run", p];
        args.extend_from_slice(flags);
        let o = tpc(&args);
        assert_exit(&o, 1);
        assert_stderr_has(&o, says);
    }
    let o = tpc(&["run", p, "--mesh", "pp=2"]);
    assert_exit(&o, 0);
}
